"""The model wrappers and input checking."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from magic_edu import LanguageModel, MagicEduError, load_image, magic_search
from magic_edu.fast import clip_prefix
from magic_edu.fast.candidate_texts import CandidateTexts, decoder_kind
from magic_edu.models import cache_length, keep_sentences

from conftest import make_image


# -- ImageTextMatcher --------------------------------------------------------------------
def test_trimmed_text_encoding_equals_open_clips_full_context(tiny_clip):
    texts = ["a red circle", "", "there is a green triangle next to a yellow star on the left", "ok"]
    trimmed = tiny_clip.embed_texts(texts)
    full = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), dim=-1)
    assert tiny_clip.tokenize(texts).shape[1] < 77
    assert torch.allclose(trimmed, full, atol=1e-5)


def test_text_scores_is_a_softmax_of_scaled_cosines(tiny_clip):
    image = make_image(0)
    emb = tiny_clip.embed_image(image)
    assert emb.shape == (32,) and abs(emb.norm().item() - 1) < 1e-5
    texts = ["a", "a red", "a red circle"]
    raw = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), dim=-1) @ emb
    expected = torch.softmax(tiny_clip.model.logit_scale.exp() * raw, dim=0)
    assert torch.allclose(tiny_clip.text_scores(emb, texts), expected, atol=1e-5)
    assert torch.allclose(tiny_clip.text_cosines(emb, texts), raw, atol=1e-5)


def test_embed_image_of_a_list(tiny_clip):
    imgs = [make_image(s) for s in range(3)]
    batch = tiny_clip.embed_image(imgs)
    assert batch.shape == (3, 32)
    assert torch.allclose(batch[1], tiny_clip.embed_image(imgs[1]), atol=1e-5)


# -- LanguageModel -----------------------------------------------------------------------
def test_hidden_states_are_after_the_final_layer_norm(tiny_lm):
    ids = torch.tensor([tiny_lm.prefix_ids("a red circle")])
    logits, hidden, cache = tiny_lm.forward(ids)
    assert torch.allclose(hidden, tiny_lm.model.transformer(ids).last_hidden_state, atol=1e-6)
    assert torch.allclose(logits, tiny_lm.model.lm_head(hidden), atol=1e-5)
    assert cache_length(cache) == ids.shape[1] and len(cache) == tiny_lm.model.config.n_layer


def test_candidates_side_by_side_equal_one_full_forward_each(tiny_lm64):
    """forward_candidates (one sequence, block-diagonal mask) against a cache-free forward of
    prefix + candidate, for every row and candidate; then the cache that keeps the chosen one."""
    lm = tiny_lm64
    prefix = torch.tensor([lm.prefix_ids("a red circle")] * 2)
    _, _, cache = lm.forward(prefix)
    candidates = torch.tensor([[5, 9, 13], [7, 5, 2]])
    hidden, cache_k = lm.forward_candidates(candidates, cache)
    assert cache_length(cache) == prefix.shape[1]  # the earlier state is untouched
    assert cache_length(cache_k) == prefix.shape[1] + 3 and hidden.shape == (2, 3, 48)
    for b in range(2):
        for i in range(3):
            logits, h, _ = lm.forward(torch.cat([prefix[b], candidates[b, i:i + 1]])[None])
            assert torch.allclose(hidden[b, i], h[0, -1], atol=1e-10)
            assert torch.allclose(lm.logits(hidden[b, i]), logits[0, -1], atol=1e-9)
    chosen = torch.tensor([2, 0])  # row 0 keeps 13, row 1 keeps 7
    past, rows = prefix.shape[1], torch.arange(2)
    kept = [tuple(torch.cat([t[:, :, :past], t[rows, :, past + chosen][:, :, None]], dim=2) for t in kv)
            for kv in cache_k]  # the past positions plus each row's chosen candidate
    nxt = torch.tensor([[4], [6]])
    logits, h, _ = lm.forward(nxt, cache=kept)
    for b, token in enumerate([13, 7]):
        full_logits, full_h, _ = lm.forward(torch.cat([prefix[b], torch.tensor([token]), nxt[b]])[None])
        assert torch.allclose(h[b, -1], full_h[0, -1], atol=1e-10)
        assert torch.allclose(logits[b, -1], full_logits[0, -1], atol=1e-9)


def test_extending_a_decoded_text_equals_decoding_it_whole(tiny_lm):
    """CandidateTexts (decode c once, append each candidate's text) against decoding
    every c + [v] in full: random ids, so partial UTF-8 bytes, EOS and the start token occur."""
    from magic_edu.presets import load_models

    assert CandidateTexts(tiny_lm).kind == "bytes"
    gen = torch.Generator().manual_seed(0)
    from magic_edu.tools.random_models import random_language_model, word_tokenizer

    # byte-level BPE; word-level with a WordPiece decoder; word-level without a decoder
    lms = [tiny_lm, load_models("toy").lm, random_language_model(tokenizer=word_tokenizer(3000))]
    assert CandidateTexts(lms[1]).kind == CandidateTexts(lms[2]).kind == "pieces"
    assert lms[2].tokenizer.backend_tokenizer.decoder is None
    multibyte = tiny_lm.tokenizer("éè — ok", add_special_tokens=False)["input_ids"]
    for lm in lms:
        extended = CandidateTexts(lm)
        whole = torch.tensor([i for i in range(lm.vocab_size) if "\ufffd" not in lm.token_text(i)])
        fast, rows, row_candidates, expected_rows = 0, [], [], []
        for trial in range(300):
            length = int(torch.randint(0, 12, (1,), generator=gen))
            if trial % 2:  # any ids: mostly byte pieces that end inside a character
                ids = torch.randint(0, lm.vocab_size, (length,), generator=gen).tolist()
            else:  # whole characters only: the text is extended, not decoded again
                ids = whole[torch.randint(0, len(whole), (length,), generator=gen)].tolist()
            candidates = torch.randint(0, lm.vocab_size, (6,), generator=gen).tolist() + [lm.eos_token_id]
            if lm is tiny_lm and trial % 3 == 0:
                ids = ids + multibyte[: trial % len(multibyte)]  # sometimes cut inside a character
            expected = lm.clip_texts([ids + [v] for v in candidates])
            assert extended([ids], [candidates]) == [expected]
            fast += extended.kind == "pieces" or "\ufffd" not in lm.decode(ids)
            rows.append(ids), row_candidates.append(candidates), expected_rows.append(expected)
        assert fast > 100
        assert extended(rows, row_candidates) == expected_rows  # a batch mixing both kinds


def test_decoder_kind_only_promises_what_it_knows(tiny_lm):
    from types import SimpleNamespace

    from magic_edu.tools.random_models import word_tokenizer

    assert decoder_kind(tiny_lm.tokenizer) == "bytes"
    assert decoder_kind(word_tokenizer(300)) == "pieces"  # no decoder: tokens joined with spaces
    assert decoder_kind(SimpleNamespace(decode=lambda ids: "")) is None  # a slow tokenizer: decoded in full


def test_decode_is_the_tokenizers_decode(tiny_lm):
    from magic_edu.presets import load_models
    from magic_edu.tools.random_models import random_language_model, word_tokenizer

    gen = torch.Generator().manual_seed(1)
    for lm in (tiny_lm, load_models("toy").lm, random_language_model(tokenizer=word_tokenizer(3000))):
        for _ in range(50):
            ids = torch.randint(0, lm.vocab_size, (int(torch.randint(0, 15, (1,), generator=gen)),),
                                generator=gen).tolist()
            assert lm.decode(ids) == lm.tokenizer.decode(ids, skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)


def test_clip_texts_equal_decode(tiny_lm):
    ids = [tiny_lm.prefix_ids("a red circle") + [5, 6], [tiny_lm.eos_token_id, 7], [], [9, tiny_lm.eos_token_id, 10]]
    expected = [tiny_lm.decode(i).split(tiny_lm.eos_token, 1)[0] for i in ids]
    assert tiny_lm.clip_texts(ids) == expected and expected[1] == "" and expected[0].startswith("<-start_of_text->")


def test_prefix_is_start_token_then_prompt(tiny_lm):
    sos = tiny_lm.sos_token_id
    assert tiny_lm.prefix_ids(None) == [sos]
    prompt_ids = tiny_lm.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert tiny_lm.prefix_ids("a red circle") == [sos] + prompt_ids


def test_story_prefix_format(tiny_lm):
    story = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, sos_token=tiny_lm.sos_token,
                          prompt_format="{prompt} {eos}", max_sentences=5)
    ids = story.prefix_ids("The red ball")
    assert ids == tiny_lm.tokenizer("The red ball " + tiny_lm.eos_token, add_special_tokens=False)["input_ids"]
    assert ids[-1] == story.eos_token_id and tiny_lm.sos_token_id not in ids


def test_sos_defaults_to_bos_and_must_exist(tiny_lm):
    plain = LanguageModel(tiny_lm.model, tiny_lm.tokenizer)
    assert plain.sos_token == tiny_lm.tokenizer.bos_token
    with pytest.raises(MagicEduError, match="sos_token"):
        LanguageModel(tiny_lm.model, tiny_lm.tokenizer, sos_token="<-never-seen->")


def test_output_text_when_start_token_is_eos(tiny_lm):
    """GPT-2's BOS is its EOS: the parser must still cut at the first generated EOS."""
    plain = LanguageModel(tiny_lm.model, tiny_lm.tokenizer)
    assert plain.sos_token_id == plain.eos_token_id
    a = tiny_lm.tokenizer("a red", add_special_tokens=False)["input_ids"]
    b = tiny_lm.tokenizer(" star", add_special_tokens=False)["input_ids"]
    assert plain.output_text(a + [plain.eos_token_id] + b) == "a red"


def test_keep_sentences():
    assert keep_sentences("One. Two. Three.", 5) == "One. Two. Three."
    assert keep_sentences("A. B. C. D. E. F. G.", 5) == "A. B. C. D. E."
    assert keep_sentences("no full stop", 2) == "no full stop"


def test_from_pretrained_adds_missing_tokens(tiny_lm, tmp_path):
    from magic_edu.tools.random_models import byte_level_tokenizer, random_language_model

    lm = random_language_model(sos_token=None, tokenizer=byte_level_tokenizer())
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    n = lm.vocab_size
    loaded = LanguageModel.from_pretrained(str(tmp_path), sos_token="<-start_of_text->", pad_token="<-pad->")
    assert loaded.vocab_size == n + 2 and len(loaded.tokenizer) == n + 2
    assert loaded.prefix_ids(None) == [loaded.sos_token_id]
    assert loaded.tokenizer.pad_token == "<-pad->"
    again = LanguageModel.from_pretrained(str(tmp_path), sos_token="<|endoftext|>")
    assert again.vocab_size == n  # nothing added when the token exists


# -- images ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_any_pil_mode_becomes_rgb(mode, tiny_lm, tiny_clip):
    base = make_image(0)
    img = base.convert("L").convert(mode) if mode in ("I;16", "I", "F") else base.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == base.size


def test_transparency_goes_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_image_from_path_array_and_tensor(tmp_path):
    img = make_image(1)
    img.save(tmp_path / "x.png")
    arr = np.array(img)
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), arr, torch.from_numpy(arr),
                   torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr).permute(2, 0, 1).float() / 255):
        assert np.array_equal(np.asarray(load_image(source)), arr)


def test_decoders_accept_every_image_kind(tiny_lm, tiny_clip, tmp_path):
    img = make_image(2)
    img.save(tmp_path / "x.png")
    base = magic_search(tiny_lm, tiny_clip, img, k=4, alpha=0.2, beta=1.0, max_new_tokens=4).token_ids
    for source in (tmp_path / "x.png", np.asarray(img), torch.from_numpy(np.array(img)), img.convert("RGBA")):
        assert magic_search(tiny_lm, tiny_clip, source, k=4, alpha=0.2, beta=1.0, max_new_tokens=4).token_ids == base


def test_bad_images_are_named(tmp_path, tiny_lm, tiny_clip):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    buf = io.BytesIO()
    make_image(0).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    cases = {tmp_path / "missing.png": "no such file", tmp_path / "empty.png": "empty",
             tmp_path / "corrupt.png": "not a readable image", tmp_path / "cut.png": "not a readable image",
             tmp_path: "folder"}
    for path, words in cases.items():
        with pytest.raises(MagicEduError, match=f"image.*{words}"):
            magic_search(tiny_lm, tiny_clip, path, k=3, alpha=0.1, beta=1.0, max_new_tokens=2)
    for bad in (np.zeros((4, 4, 5), np.uint8), np.zeros((0, 4, 3), np.uint8), np.full((4, 4, 3), 7.0),
                torch.full((3, 4, 4), 2.0), 42):
        with pytest.raises(MagicEduError, match="image"):
            load_image(bad)


def test_shared_prefix_encoding_equals_open_clips_full_context(tiny_clip):
    """MAGIC's candidate texts share the caption so far; encoding that prefix once is exact."""
    groups = [["a red circle", "a red circ", "a red circle on the", "a red"],
              ["the blue", "the blue star", "the bl", "something else entirely"],
              ["x", "x", "x", "x"]]
    shared = tiny_clip.embed_text_groups(groups)
    flat = [t for g in groups for t in g]
    full = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(flat)), dim=-1).view(3, 4, -1)
    assert shared.shape == (3, 4, 32)
    assert torch.allclose(shared, full, atol=1e-5)
    with pytest.raises(MagicEduError, match="groups"):
        tiny_clip.embed_text_groups([["a"], ["b", "c"]])


def test_prefix_reuse_across_calls_is_exact_and_saves_work(tmp_path, monkeypatch):
    """Step after step (the caption grows), the prefix keys and values of the previous call are
    reused: the same embeddings as open_clip's full encode, for fewer token forwards; and a
    change to the weights is noticed."""
    from magic_edu.tools.random_models import random_clip

    clip = random_clip(tmp_path, seed=3)
    clip.model.double()
    encoded = []
    attend = clip_prefix.attend
    monkeypatch.setattr(clip_prefix, "attend", lambda block, x, past, mask: (
        encoded.append(x.shape[0] * x.shape[1]), attend(block, x, past, mask))[1])
    caption = "a"
    work = {}
    for remember in (True, False):
        clip.remember_prefixes = remember
        clip.prefix_memo.clear()
        encoded.clear()
        caption = "a"
        for word in [" red", " circle", " on", " the", " left", " of", " two", " blue", " stars"]:
            group = [caption + piece for piece in (word, " dog", "s", "", ",")]
            emb = clip.embed_text_groups([group])[0]
            full = F.normalize(clip.model.encode_text(clip.tokenizer(group)), dim=-1)
            assert torch.allclose(emb, full, atol=1e-12)
            caption += word
        work[remember] = sum(encoded)
    assert work[True] < 0.85 * work[False]  # the suffixes (5 per call) are the same work either way

    clip.remember_prefixes = True
    group = [caption + " and", caption + " or"]
    clip.embed_text_groups([group])
    with torch.no_grad():
        clip.model.token_embedding.weight.mul_(1.5)  # changed in place: the memo must not be used
    full = F.normalize(clip.model.encode_text(clip.tokenizer(group)), dim=-1)
    assert torch.allclose(clip.embed_text_groups([group])[0], full, atol=1e-12)
    state = {name: t * 0.9 if t.is_floating_point() else t for name, t in clip.model.state_dict().items()}
    clip.model.load_state_dict(state, assign=True)  # new parameter objects altogether
    full = F.normalize(clip.model.encode_text(clip.tokenizer(group)), dim=-1)
    assert torch.allclose(clip.embed_text_groups([group])[0], full, atol=1e-12)


def test_text_towers_without_prefix_sharing_fall_back_exactly(tiny_clip):
    from magic_edu import ImageTextMatcher

    plain = ImageTextMatcher(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer)
    plain.text_encoder.blocks = None  # as for blocks of another kind: trimmed ids, open_clip's own blocks
    switched_off = ImageTextMatcher(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer)
    switched_off.share_prefix = False  # the public switch: the same path
    texts = ["a red circle", "a red"]
    full = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), dim=-1)
    for clip in (plain, switched_off, tiny_clip):
        assert torch.allclose(clip.embed_texts(texts), full, atol=1e-5)


def test_packing_plan_counts_the_positions_the_tower_runs(tiny_clip):
    """The packed layout's size (what decides sharing on a GPU), worked out row by row here."""
    groups = [["a red circle", "a red circ", "a red circle on the", "a red"],
              ["the blue", "the blue star", "the bl", "the blue something else entirely"]]
    ids = tiny_clip._clip_tokenizer([t for g in groups for t in g]).view(2, 4, -1)
    rows = [[[int(i) for i in row if i != 0] for row in group] for group in ids.tolist()]  # start .. end, no padding
    p = 0
    while all(len(row) > p + 1 and row[p] == group[0][p] for group in rows for row in group):
        p += 1  # positions equal within every group, each row keeping at least its end token after them
    packed_lengths = [sum(len(row) - p for row in group) for group in rows]
    packed = clip_prefix.pack_rows(ids)
    assert p == 2  # start, then "a" in one group, "the" in the other
    assert packed.prefix_ids.shape == (2, p) and packed.tokens.shape == (2, max(packed_lengths))
    assert packed.positions == 2 * p + 2 * max(packed_lengths)
    assert packed.positions < ids.numel()  # fewer positions than encoding every row in full


@pytest.mark.parametrize("threshold, path", [(0, "encode_packed"), (10**9, "encode_text_trimmed")])
def test_text_encoding_off_the_cpu_moves_everything_to_the_model(tmp_path, monkeypatch, threshold, path):
    """The GPU branch of the text encoding (sharing chosen by the tokens it saves), run on the
    "meta" device: a tensor left on the CPU that meets a meta one in arithmetic raises (index
    tensors are let through there, as on a GPU for indexing, but not for embedding lookups)."""
    from magic_edu.tools.random_models import random_clip

    clip = random_clip(tmp_path)
    clip.model.to("meta")
    monkeypatch.setattr(clip_prefix, "SHARE_ON_GPU_SAVED_TOKENS", threshold)
    taken = []
    for name in ("encode_packed", "encode_text_trimmed"):
        original = getattr(clip_prefix, name)
        monkeypatch.setattr(clip_prefix, name, lambda *a, _f=original, _n=name, **kw: taken.append(_n) or _f(*a, **kw))
    for _ in range(2):  # the second call reuses the first one's prefix keys and values
        emb = clip.embed_text_groups([["a red circle", "a red square"], ["a red star", "a red"]])
        assert emb.device.type == "meta" and emb.shape == (2, 2, 32)
    assert taken == [path, path]
