"""CLIP retrieval (magic_edu.retrieval): indexes of captions and images against brute force in numpy,
chunked search, float16 safetensors files, mismatched models and bad input; the clip_retrieval
decoder in the command line, CompareDecoders and stories."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import magic_edu
from magic_edu import MagicEduError, ModelSet, Stepper
from magic_edu import retrieval as R
from magic_edu.registry import DECODERS, get_decoder
from magic_edu.tools import cli
from magic_edu.tools.random_models import random_clip, save_random_clip
from magic_edu.toyworld import shapes

from conftest import make_image

CAPTIONS = sorted(set(shapes.caption_corpus(range(60), per_scene=2))) + ["une fête — 雪 ☃"]


def brute_force(queries: torch.Tensor, embeddings: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best rows by cosine, in numpy: every score (float32 query, float16 entries, summed in
    float64, rounded to float32), sorted (ties: the lower row first)."""
    scores = (queries.float().double().numpy() @ embeddings.double().numpy().T).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def text_index(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "captions.safetensors"
    return R.build_text_index(tiny_clip, CAPTIONS, path, batch_size=16, progress=False)


def test_a_text_index_holds_float16_clip_embeddings_and_the_texts(tiny_clip, text_index):
    from safetensors import safe_open

    with safe_open(str(text_index.path), framework="pt") as f:
        assert f.get_slice("embeddings").get_dtype() == "F16"
        assert f.get_slice("embeddings").get_shape() == [len(CAPTIONS), 32]
        assert f.metadata()["kind"] == "text" and f.metadata()["clip"] == tiny_clip.name
    want = tiny_clip.embed_texts(CAPTIONS)
    assert torch.allclose(text_index.embeddings().float(), want, atol=2e-3)  # float16 of the same embeddings
    assert text_index.entries() == CAPTIONS  # unicode too
    again = R.load_index(text_index.path)
    assert again.entries([3, 0]) == [CAPTIONS[3], CAPTIONS[0]] and torch.equal(again.embeddings(),
                                                                                text_index.embeddings())
    memory = R.build_text_index(tiny_clip, CAPTIONS, batch_size=16, progress=False)  # in memory
    assert memory.path is None and torch.equal(memory.embeddings(), text_index.embeddings())
    batched = R.build_text_index(tiny_clip, CAPTIONS, batch_size=7, progress=False)  # (rounding may differ)
    assert torch.allclose(batched.embeddings().float(), memory.embeddings().float(), atol=1e-3)
    saved = memory.save(text_index.path.with_name("saved.safetensors"))
    assert saved.entries() == CAPTIONS and torch.equal(saved.embeddings(), text_index.embeddings())


def test_clip_retrieval_is_the_exact_top_n(tiny_clip, text_index):
    images = [make_image(s) for s in range(5)]
    found = R.clip_retrieval(tiny_clip, images, text_index, top_n=7)
    rows, scores = brute_force(tiny_clip.embed_image(images), text_index.embeddings(), 7)
    assert [f.rows for f in found] == rows.tolist()
    assert np.allclose([f.scores for f in found], scores, atol=1e-6)
    assert [f.text for f in found] == [CAPTIONS[r[0]] for r in rows]
    assert found[0].entries == [CAPTIONS[r] for r in rows[0]]
    one = R.clip_retrieval(tiny_clip, images[0], text_index.path)  # one image, the index by its path
    assert one.rows == [int(rows[0, 0])] and one.best == one.text


def test_chunked_search_equals_unchunked_ties_included():
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(50, 8)), dtype=torch.float32), dim=1)
    emb[[10, 31, 47]] = emb[5].clone()  # exact ties: the lower row goes first
    index = R.ClipIndex("text", 50, 8, "x", torch.zeros(8), torch.zeros(8), _embeddings=emb.half(),
                        _entries=[str(i) for i in range(50)])
    queries = torch.cat([emb[5:6], torch.nn.functional.normalize(torch.randn(3, 8), dim=1)])
    whole = R.search(index, queries, top_n=6, chunk_size=1000)
    for chunk in (1, 3, 7, 49):
        scores, rows = R.search(index, queries, top_n=6, chunk_size=chunk)
        assert torch.equal(rows, whole[1]) and torch.equal(scores, whole[0]), chunk
    assert whole[1][0, :4].tolist() == [5, 10, 31, 47]
    want, _ = brute_force(queries, index.embeddings(), 6)
    assert whole[1].tolist() == want.tolist()
    assert R.search(index, queries, top_n=80)[1].shape == (4, 50)  # top_n beyond the index: all of it


def test_a_large_index_is_searched_in_bounded_chunks(tmp_path, monkeypatch):
    """120,000 entries written through the streaming writer; a search reads at most chunk_size rows
    at a time and still finds the exact top 5."""
    n, d = 120_000, 16
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(1)), dim=1)
    path = tmp_path / "big.safetensors"
    with R._IndexWriter(path) as writer:
        for start in range(0, n, 10_000):
            writer.add(emb[start:start + 10_000])
        writer.finish("text", [f"caption {i}" for i in range(n)], "synthetic", emb[0], emb[1], None)
    index = R.load_index(path)
    assert len(index) == n and index.dim == d
    header = int.from_bytes(path.read_bytes()[:8], "little")
    texts = sum(len(f"caption {i}") for i in range(n))
    # the data: offsets (int64), the two float32 probes, the embeddings as float16 (2 bytes each), the texts
    assert path.stat().st_size - 8 - header == 8 * (n + 1) + 2 * 4 * d + 2 * n * d + texts
    reads = []
    real = R.ClipIndex.embeddings

    def counted(self, start=0, stop=None):
        out = real(self, start, stop)
        reads.append(len(out))
        return out

    monkeypatch.setattr(R.ClipIndex, "embeddings", counted)
    queries = emb[[7, 99_999]] + 0.01
    scores, rows = R.search(index, torch.nn.functional.normalize(queries, dim=1), top_n=5, chunk_size=16_384)
    assert max(reads) == 16_384 and sum(reads) == n
    monkeypatch.setattr(R.ClipIndex, "embeddings", real)
    want, want_scores = brute_force(torch.nn.functional.normalize(queries, dim=1), index.embeddings(), 5)
    assert rows.tolist() == want.tolist() and rows[:, 0].tolist() == [7, 99_999]
    assert np.array_equal(scores.numpy(), want_scores)
    assert index.entries([119_999]) == ["caption 119999"]


def test_another_clip_is_refused(tiny_clip, text_index, tmp_path):
    same_shape = random_clip(tmp_path / "other", seed=5)  # same architecture, other weights
    with pytest.raises(MagicEduError, match="built with CLIP .* it is another CLIP"):
        R.clip_retrieval(same_shape, make_image(0), text_index)
    wider = random_clip(tmp_path / "wide", seed=0, embed_dim=48)
    with pytest.raises(MagicEduError, match="32-dimensional embeddings.*makes 48-dimensional ones"):
        R.clip_retrieval(wider, make_image(0), text_index)
    reloaded = magic_edu.ImageTextMatcher.from_pretrained(tiny_clip.name)  # the same weights, loaded again: fine
    assert R.clip_retrieval(reloaded, make_image(0), text_index).rows == \
        R.clip_retrieval(tiny_clip, make_image(0), text_index).rows


def test_bad_input_gets_a_clear_error(tiny_clip, text_index, tmp_path):
    with pytest.raises(MagicEduError, match="caption pool is empty"):
        R.build_text_index(tiny_clip, [], progress=False)
    with pytest.raises(MagicEduError, match="caption 1 must be a non-empty string"):
        R.build_text_index(tiny_clip, ["a", "  "], progress=False)
    with pytest.raises(MagicEduError, match="captions .*: no such file"):
        R.build_text_index(tiny_clip, str(tmp_path / "none.txt"), progress=False)
    with pytest.raises(MagicEduError, match="index .*: no such file"):
        R.load_index(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(MagicEduError, match="not a readable safetensors file"):
        R.load_index(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MagicEduError, match="not a magic_edu CLIP index"):
        R.load_index(tmp_path / "model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(text_index.path.read_bytes()[:-100])
    with pytest.raises(MagicEduError, match="cut.safetensors: not a readable safetensors file"):
        R.load_index(cut)
    with pytest.raises(MagicEduError, match="needs an index of images .* this one holds texts"):
        R.retrieve_image(tiny_clip, "a title", text_index)
    with pytest.raises(MagicEduError, match="top_n must be an integer >= 1"):
        R.clip_retrieval(tiny_clip, make_image(0), text_index, top_n=0)
    with pytest.raises(MagicEduError, match="out .* is a folder"):
        R.build_text_index(tiny_clip, ["a"], tmp_path, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left behind by the failures


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    for s in range(5):
        make_image(s, (36, 30)).save(folder / ("more" if s % 2 else ".") / f"photo{s}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_an_image_index_and_a_title_s_image(tiny_clip, photo_folder, tmp_path):
    index = R.build_image_index(tiny_clip, photo_folder, tmp_path / "images.safetensors", batch_size=2,
                                progress=False)
    assert len(index) == 5 and [Path(p).name for p, _ in index.skipped] == ["broken.jpg"]
    paths = index.entries()
    assert all(Path(p).is_file() for p in paths) and sum("more" in p for p in paths) == 2
    want = tiny_clip.embed_image([Image.open(p) for p in paths])
    assert torch.allclose(index.embeddings().float(), want, atol=2e-3)
    titles = ["a new friend", "the lost red ball"]
    found = R.retrieve_image(tiny_clip, titles, index, top_n=3)
    rows, _ = brute_force(tiny_clip.embed_texts(titles), index.embeddings(), 3)
    assert [f.rows for f in found] == rows.tolist() and found[0].best == paths[rows[0, 0]]
    memory = R.build_image_index(tiny_clip, photo_folder, progress=False, recursive=False)
    assert len(memory) == 3 and all(Path(p).is_file() for p in memory.entries())
    saved = memory.save(tmp_path / "memory.safetensors")
    assert saved.entries() == memory.entries() and saved.entries(stored=True) == ["photo0.png", "photo2.png",
                                                                                   "photo4.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MagicEduError, match="no image files in it"):
        R.build_image_index(tiny_clip, empty, progress=False)
    (empty / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MagicEduError, match="none of its 1 image files could be read"):
        R.build_image_index(tiny_clip, empty, tmp_path / "none.safetensors", progress=False)
    assert not (tmp_path / "none.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(MagicEduError, match="no such folder"):
        R.build_image_index(tiny_clip, tmp_path / "missing", progress=False)


# -- the decoder --------------------------------------------------------------------------------
def test_clip_retrieval_is_a_registry_decoder_without_steps(tiny_lm, tiny_clip, text_index):
    d = get_decoder("clip-retrieval")
    assert d is DECODERS["clip_retrieval"] and d.retrieves and d.needs_image and d.label == "CLIP retrieval"
    image = make_image(2)
    gen = magic_edu.clip_retrieval_search(tiny_lm, tiny_clip, image, index=text_index)
    best = R.clip_retrieval(tiny_clip, image, text_index, top_n=5)
    assert gen.text == best.text and gen.trace.steps == []
    assert gen.token_ids == [*tiny_lm.tokenizer(best.text, add_special_tokens=False)["input_ids"],
                             tiny_lm.eos_token_id]
    assert gen.trace.settings["retrieved"] == [[t, s] for t, s in best]
    gens = magic_edu.clip_retrieval_search(tiny_lm, tiny_clip, [image, make_image(3)], index=str(text_index.path),
                                           record=False)
    assert gens[0].text == gen.text and "retrieved" not in gens[0].trace.settings
    with pytest.raises(MagicEduError, match="index: CLIP retrieval needs an index of captions"):
        magic_edu.clip_retrieval_search(tiny_lm, tiny_clip, image)
    with pytest.raises(MagicEduError, match="takes no steps"):
        Stepper(tiny_lm, "clip_retrieval", clip=tiny_clip, image=image)


def test_compare_decoders_shows_clip_retrieval_given_an_index(tiny_lm, tiny_clip, text_index, photo_folder):
    from magic_edu.views.widgets import NO_INDEX, CompareDecoders, StepThrough, Sweep

    models = ModelSet(name="tiny", kind="caption", lm=tiny_lm, clip=tiny_clip,
                      defaults={"k": 4, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 4})
    image = make_image(1)
    w = CompareDecoders(models, image, index=text_index.path)
    assert "Problem" not in w.message.value and w.note.value == ""
    assert list(w.frame["decoder"]) == ["greedy", "beam", "contrastive", "magic", "top_k", "clip_retrieval"]
    assert w.generations["clip_retrieval"].text == R.clip_retrieval(tiny_clip, image, text_index).text
    assert "clip_retrieval" in w.table.value and "clip_retrieval" not in w.leaves
    assert w.snapshot() is not None
    plain = CompareDecoders(models, image)
    assert "clip_retrieval" not in plain.generations and "index=" in plain.note.value
    assert html.escape(NO_INDEX) in plain.note.value
    images = R.build_image_index(tiny_clip, photo_folder, progress=False)  # the wrong kind of index
    other = CompareDecoders(models, image, index=images)
    assert "CLIP retrieval is left out: index: needs an index of texts" in other.message.value
    assert list(other.frame["decoder"])[-1] == "top_k"  # the decoders are compared all the same
    assert ("CLIP retrieval", "clip_retrieval") not in StepThrough(models, image, plot=False).decoder.options
    assert ("CLIP retrieval", "clip_retrieval") not in Sweep(models, image).decoder.options
    with pytest.raises(MagicEduError, match="takes no steps"):
        StepThrough(models, image, decoder="clip-retrieval")


# -- the command line and stories -------------------------------------------------------------------
@pytest.fixture
def toy_like(tiny_lm, tiny_clip, monkeypatch):
    """load_models / load_clip of any preset give the tiny models."""
    models = ModelSet(name="tiny", kind="story", lm=tiny_lm, clip=tiny_clip,
                      defaults={"k": 4, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 6})
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: models)
    monkeypatch.setattr("magic_edu.presets.load_clip", lambda preset: tiny_clip)
    return models


def test_the_commands(toy_like, tiny_clip, photo_folder, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    index = tmp_path / "captions.safetensors"
    assert cli.main(["index-text", str(captions), "-o", str(index)]) == 0
    assert f"{len(CAPTIONS)} captions" in capsys.readouterr().out
    assert R.load_index(index).entries() == CAPTIONS
    images = tmp_path / "images"
    images.mkdir()
    for s in range(3):
        make_image(s).save(images / f"img{s}.png")
    out = tmp_path / "results.json"
    assert cli.main(["caption", str(images), "--out", str(out), "--decoder", "clip-retrieval", "--index",
                     str(index)]) == 0
    results = json.loads(out.read_text())
    want = R.clip_retrieval(tiny_clip, [make_image(s) for s in range(3)], index)
    assert [r["prediction"] for r in results] == [w.text for w in want]
    settings = json.loads((tmp_path / "results.settings.json").read_text())
    assert settings["decoder"] == "clip_retrieval" and settings["params"]["index"] == str(index.resolve())
    capsys.readouterr()
    # a resume with another index is refused; a missing index, or one given to another decoder, too
    other = tmp_path / "other.safetensors"
    assert cli.main(["index-text", str(captions), "-o", str(other)]) == 0
    assert cli.main(["caption", str(images), "--out", str(out), "--decoder", "clip_retrieval", "--index",
                     str(other)]) == 2
    assert "other settings (index" in capsys.readouterr().err
    assert cli.main(["caption", str(images), "--out", str(tmp_path / "r2.json"), "--decoder", "clip_retrieval"]) == 2
    assert "--index: --decoder clip_retrieval (CLIP retrieval) needs an index" in capsys.readouterr().err
    assert cli.main(["caption", str(images), "--out", str(tmp_path / "r3.json"), "--index", str(index)]) == 2
    assert "--index: only --decoder clip_retrieval takes it" in capsys.readouterr().err
    assert cli.main(["caption", str(images), "--out", str(tmp_path / "r4.json"), "--decoder", "clip_retrieval",
                     "--index", str(captions)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    # images and a story from a title alone
    image_index = tmp_path / "images.safetensors"
    assert cli.main(["index-images", str(photo_folder), "-o", str(image_index)]) == 0
    printed = capsys.readouterr()
    assert "5 images" in printed.out and "broken.jpg" in printed.err
    assert cli.main(["story", "a new friend", "--index", str(image_index), "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    best = R.retrieve_image(tiny_clip, "a new friend", image_index).best
    assert f"image: {best}" in printed and "a new friend: " in printed
    assert cli.main(["index-text", str(tmp_path / "none.txt"), "-o", str(other)]) == 2
    assert "captions " in capsys.readouterr().err


def test_a_story_from_a_title_alone(toy_like, tiny_clip, photo_folder):
    index = R.build_image_index(tiny_clip, photo_folder, progress=False)
    story = magic_edu.tell_story(toy_like, "a new friend", index=index, max_new_tokens=6)
    best = R.retrieve_image(tiny_clip, "a new friend", index)
    assert story.image_path == best.best and story.retrieved.rows[0] == best.rows[0]
    same = magic_edu.magic_search(toy_like.lm, tiny_clip, Image.open(best.best), prompt="a new friend",
                                  max_new_tokens=6)
    assert story.generation.token_ids == same.token_ids and story.text == same.text
    given = magic_edu.tell_story(toy_like, "a new friend", Image.open(best.best), max_new_tokens=6)
    assert given.text == story.text and given.image_path is None
    with pytest.raises(MagicEduError, match="give image= .* or index="):
        magic_edu.tell_story(toy_like, "a new friend")
    with pytest.raises(MagicEduError, match="title must be a non-empty string"):
        magic_edu.tell_story(toy_like, " ", index=index)


def test_an_index_built_with_the_other_clip_is_refused_by_caption(toy_like, tmp_path, capsys):
    clip = save_random_clip(tmp_path / "clip", seed=9)
    other = magic_edu.ImageTextMatcher.from_pretrained(f"local-dir:{clip}")
    index = R.build_text_index(other, CAPTIONS, tmp_path / "i.safetensors", progress=False)
    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "a.png")
    assert cli.main(["caption", str(images), "--out", str(tmp_path / "r.json"), "--decoder", "clip_retrieval",
                     "--index", str(index.path)]) == 2
    assert "--index: built with CLIP" in capsys.readouterr().err
