"""Presets through the real loading path, offline, against local stand-ins.

The stand-ins are tiny random models written where the real ones would be: a GPT-2 under
``cambridgeltl/magic_mscoco`` (etc.) in a temporary Hugging Face hub cache, and open_clip
weights under the hub repository open_clip itself downloads ``ViT-B-32-quickgelu``/``openai``
from. The one thing shrunk is open_clip's built-in ``ViT-B-32-quickgelu`` architecture (a
random full-size ViT-B/32 would be 600 MB); the lookup of the tag, the hub download from
the cache and the strict weight loading are open_clip's own. Nothing touches the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import magic_edu.presets as presets
from magic_edu import MagicEduError, Stepper, magic_search
from magic_edu.presets import (
    PAPER_PAD,
    PAPER_SOS,
    ModelNotDownloadedError,
    ModelSet,
    list_presets,
    load_models,
)
from magic_edu.tools.random_models import EOS, byte_level_tokenizer, clip_config

from conftest import make_image

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip 3.x reads the openai ViT-B/32
TINY_CLIP_CFG = {**clip_config(), "quick_gelu": True}


# -- stand-ins ----------------------------------------------------------------------------
def save_tiny_gpt2(folder: Path, special_tokens: bool, seed: int = 0) -> Path:
    """A tiny GPT-2 + byte-level tokenizer saved like a hub checkpoint; with the paper's
    start / pad tokens already added (as the authors' checkpoints have them) or without."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_level_tokenizer()
    if special_tokens:
        tok.add_tokens([PAPER_SOS, PAPER_PAD])
        tok.pad_token = PAPER_PAD
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_open_clip_weights(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """Random weights of ``cfg`` as open_clip_model.safetensors (the file open_clip fetches first)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


class HubCache:
    """A Hugging Face hub cache folder in the hub's own layout (blobs, snapshots, refs)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, repo_id: str, folder: Path, files: list[str] | None = None) -> None:
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / COMMIT
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder).as_posix()
            if not src.is_file() or (files is not None and rel not in files):
                continue
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand_ins")
    return {
        "with_tokens": save_tiny_gpt2(root / "with_tokens", special_tokens=True, seed=0),
        "plain": save_tiny_gpt2(root / "plain", special_tokens=False, seed=1),
        "clip": save_tiny_open_clip_weights(root / "clip", TINY_CLIP_CFG),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubCache:
    """An empty hub cache in tmp_path, offline; HF_HOME etc. point at it."""
    import open_clip
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, when imported: mirror them there too
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-B-32-quickgelu", json.loads(json.dumps(TINY_CLIP_CFG)))
    return HubCache(cache)


@pytest.fixture
def paper_hub(hub, stand_ins) -> HubCache:
    """Every hub preset's stand-in in the cache: magic_mscoco with the paper's tokens, the
    others (magic_flickr30k, simctg_rocstories, gpt2) without them."""
    hub.add("cambridgeltl/magic_mscoco", stand_ins["with_tokens"])
    for repo in ("cambridgeltl/magic_flickr30k", "cambridgeltl/simctg_rocstories", "gpt2"):
        hub.add(repo, stand_ins["plain"])
    hub.add(CLIP_REPO, stand_ins["clip"])
    return hub


# -- the registry --------------------------------------------------------------------------
def test_list_presets_names_and_descriptions():
    listed = list_presets()
    assert list(listed) == ["toy", "toy-mle", "toy-story", "paper-mscoco", "paper-flickr30k", "story", "gpt2"]
    assert all(isinstance(d, str) and d and "\n" not in d for d in listed.values())


def test_paper_settings_are_the_papers():
    p = presets.PRESETS
    assert p["paper-mscoco"].defaults == {"k": 45, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 15}
    assert p["paper-flickr30k"].defaults == {"k": 25, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 19}
    assert p["story"].defaults == {"k": 5, "alpha": 0.6, "beta": 0.15} and p["story"].max_length == 100
    assert p["story"].prompt_format == "{prompt} {eos}" and p["story"].max_sentences == 5
    for name in ("paper-mscoco", "paper-flickr30k", "story", "gpt2"):
        assert (p[name].clip, p[name].clip_pretrained) == ("ViT-B-32-quickgelu", "openai")
    assert p["paper-mscoco"].sos_token == "<-start_of_text->" and p["paper-mscoco"].pad_token == "<-pad->"


def test_open_clip_reads_the_openai_weights_from_the_repo_the_stand_in_uses():
    import open_clip

    assert open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")["hf_hub"].rstrip("/") == CLIP_REPO
    assert open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")["quick_gelu"] is True


def test_unknown_preset_lists_the_names():
    with pytest.raises(MagicEduError, match="paper-mscoco") as err:
        load_models("paper-coco")
    assert "toy" in str(err.value)


# -- hub presets, offline, through the real code path -------------------------------------------
def test_paper_mscoco_loads_by_name_and_decodes(paper_hub, stand_ins):
    models = load_models("paper-mscoco")
    assert isinstance(models, ModelSet) and models.name == "paper-mscoco" and models.kind == "caption"
    assert models.defaults == {"k": 45, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 15}
    lm = models.lm
    # the checkpoint already has the paper's tokens: nothing added, nothing resized
    saved_vocab = json.loads((stand_ins["with_tokens"] / "config.json").read_text())["vocab_size"]
    assert len(lm.tokenizer) == saved_vocab == lm.vocab_size
    assert lm.sos_token == PAPER_SOS and lm.tokenizer.pad_token == PAPER_PAD and lm.eos_token == EOS
    assert lm.prefix_ids() == [lm.sos_token_id]
    # CLIP: open_clip's own ViT-B-32-quickgelu + openai path, weights from the hub cache
    assert models.clip.name == "ViT-B-32-quickgelu/openai"
    assert models.clip.model.visual.conv1.weight.shape[0] == TINY_CLIP_CFG["vision_cfg"]["width"]

    gen = magic_search(lm, models.clip, make_image(0), **models.settings())
    assert 1 <= len(gen.token_ids) <= 15
    assert gen.trace.settings["k"] == 45 and gen.trace.settings["beta"] == 2.0
    assert gen.text == lm.output_text(gen.token_ids)


def test_loader_adds_the_papers_tokens_when_the_checkpoint_lacks_them(paper_hub, stand_ins):
    saved_vocab = json.loads((stand_ins["plain"] / "config.json").read_text())["vocab_size"]
    models = load_models("paper-flickr30k")
    lm = models.lm
    vocab = lm.tokenizer.get_vocab()
    assert PAPER_SOS in vocab and PAPER_PAD in vocab
    assert len(lm.tokenizer) == saved_vocab + 2 == lm.vocab_size  # embeddings resized
    assert lm.model.get_input_embeddings().weight.shape[0] == saved_vocab + 2
    assert lm.tokenizer.pad_token == PAPER_PAD and lm.prefix_ids() == [vocab[PAPER_SOS]]
    assert models.defaults == {"k": 25, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 19}
    gen = magic_search(lm, models.clip, make_image(1), **models.settings())
    assert 1 <= len(gen.token_ids) <= 19


def test_gpt2_preset_is_plain_gpt2_with_its_own_bos(paper_hub, stand_ins):
    saved_vocab = json.loads((stand_ins["plain"] / "config.json").read_text())["vocab_size"]
    models = load_models("gpt2")
    assert len(models.lm.tokenizer) == saved_vocab  # nothing added
    assert models.lm.prefix_ids() == [models.lm.tokenizer.bos_token_id]
    gen = magic_search(models.lm, models.clip, make_image(2), **models.settings())
    assert 1 <= len(gen.token_ids) <= 15


def test_device_argument_reaches_both_models(paper_hub):
    models = load_models("paper-mscoco", device="cpu")
    assert models.lm.device.type == "cpu" and models.clip.device.type == "cpu"


# -- the missing-model error -------------------------------------------------------------------
def test_nothing_cached_offline_gives_one_clear_error(hub):
    start = time.perf_counter()
    with pytest.raises(ModelNotDownloadedError) as info:
        load_models("paper-mscoco")
    assert time.perf_counter() - start < 10
    err = info.value
    assert isinstance(err, MagicEduError)
    msg = str(err)
    for needed in ("cambridgeltl/magic_mscoco", CLIP_REPO, "HF_HUB_OFFLINE",
                   "python -c \"import magic_edu; magic_edu.load_models('paper-mscoco')\"",
                   "hf download cambridgeltl/magic_mscoco", f"hf download {CLIP_REPO} open_clip_model.safetensors",
                   "load_models('toy')", str(hub.root)):
        assert needed in msg, needed
    assert err.missing == ["cambridgeltl/magic_mscoco", CLIP_REPO] and err.preset == "paper-mscoco"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_only_clip_missing_names_only_clip(hub, stand_ins):
    hub.add("cambridgeltl/magic_mscoco", stand_ins["with_tokens"])
    with pytest.raises(ModelNotDownloadedError) as info:
        load_models("paper-mscoco")
    assert info.value.missing == [CLIP_REPO]
    assert "cambridgeltl/magic_mscoco" not in str(info.value)


def test_partly_cached_lm_is_reported_as_missing(hub, stand_ins):
    """config.json and a safetensors *index* cached, shards missing: transformers' own
    offline failure becomes the same one error."""
    folder = stand_ins["with_tokens"]
    hub.add(CLIP_REPO, stand_ins["clip"])
    hub.add("cambridgeltl/magic_mscoco", folder, files=["config.json", "tokenizer.json", "tokenizer_config.json"])
    index = hub.root / "partial"
    index.mkdir()
    (index / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    hub.add("cambridgeltl/magic_mscoco", index)
    with pytest.raises(ModelNotDownloadedError) as info:
        load_models("paper-mscoco")
    assert info.value.missing == ["cambridgeltl/magic_mscoco"]


def test_unreachable_hub_without_offline_mode(hub, monkeypatch):
    """Network down but HF_HUB_OFFLINE unset: the hub's connection error becomes the same error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the hub's retry back-off
    with pytest.raises(ModelNotDownloadedError) as info:
        load_models("story")
    assert "cannot be reached" in str(info.value)
    assert info.value.missing == ["cambridgeltl/simctg_rocstories", CLIP_REPO]


def test_other_errors_are_not_disguised_as_missing_models():
    assert not presets._unavailable(ValueError("bad config"))
    try:
        try:
            raise ConnectionError("no route")
        except ConnectionError:
            raise OSError("transformers wrapper")  # noqa: B904 (chained implicitly, as transformers does)
    except OSError as err:
        assert presets._unavailable(err)


# -- the story preset ------------------------------------------------------------------------
def test_story_prompt_format_and_length_budget(paper_hub):
    models = load_models("story")
    lm = models.lm
    assert models.kind == "story" and lm.max_sentences == 5
    title = "the boy"
    prefix = lm.prefix_ids(title)
    assert prefix == lm.tokenizer(f"{title} {EOS}", add_special_tokens=False)["input_ids"]
    assert prefix[-1] == lm.eos_token_id and PAPER_SOS not in lm.tokenizer.get_vocab()
    assert models.settings(title) == {"k": 5, "alpha": 0.6, "beta": 0.15, "max_new_tokens": 100 - len(prefix)}
    assert models.defaults["max_new_tokens"] == 100 - len(lm.prefix_ids(None))
    with pytest.raises(MagicEduError, match="counting the prompt"):
        models.settings("word " * 120)


def test_story_clip_scores_only_the_continuation(paper_hub):
    models = load_models("story")
    lm, clip = models.lm, models.clip
    seen: list[str] = []
    embed_text_groups = clip.embed_text_groups

    def spy(groups, remember=None):
        seen.extend(t for group in groups for t in group)
        return embed_text_groups(groups, remember)

    clip.embed_text_groups = spy
    title = "the boy kicked the ball"
    settings = models.settings(title)
    assert settings["max_new_tokens"] == 100 - len(lm.prefix_ids(title))
    settings["max_new_tokens"] = 24  # a shorter run: the test is about what CLIP sees
    gen = magic_search(lm, clip, make_image(3), prompt=title, **settings)
    expected: list[str] = []
    for t, step in enumerate(gen.trace.steps):
        expected += [lm.clip_text((gen.token_ids[:t] + [v])[-60:]) for v in step.token_ids]
    assert seen == expected  # exactly the generated ids + candidate, never the title or its EOS
    assert gen.text == lm.output_text(gen.token_ids)


@pytest.mark.slow
def test_story_text_excludes_prompt_and_keeps_five_sentences(paper_hub):
    models = load_models("story")
    lm = models.lm
    title = "a day at the park"
    story = " a man. the ball. a. the. a. the. a."
    wanted = lm.tokenizer(story, add_special_tokens=False)["input_ids"] + [lm.eos_token_id]
    # force the story token by token through MAGIC's own decode loop (k = whole vocabulary, so
    # every token is a candidate), with the preset's CLIP scoring each step
    stepper = Stepper(lm, "magic", clip=models.clip, image=make_image(4), prompt=title,
                      k=lm.vocab_size, alpha=0.6, beta=0.15, max_new_tokens=len(wanted) + 5)
    for token in wanted:
        stepper.step(force=token)
    assert stepper.done  # stopped at the generated EOS
    gen = stepper.generation()
    assert gen.token_ids == wanted
    assert gen.text == "a man. the ball. a. the. a."
    assert title not in gen.text


# -- the toy presets -----------------------------------------------------------------------------
TOY_WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "small",
             "large", "on", "left", "right", ".", ","]


def save_toy_lm(folder: Path, seed: int) -> Path:
    """A tiny GPT-2 with a word-level tokenizer, like the toy world's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([EOS, *TOY_WORDS])}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    wrapped.add_tokens([PAPER_SOS, PAPER_PAD])
    config = GPT2Config(vocab_size=len(wrapped), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=wrapped.bos_token_id, eos_token_id=wrapped.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


TOY_DEFAULTS = {"k": 8, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 12,
                "story": {"k": 6, "alpha": 0.5, "beta": 0.5, "max_new_tokens": 30, "prompt": "a red circle"}}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from magic_edu.tools.random_models import save_random_clip

    data = tmp_path_factory.mktemp("toy_data")
    toy = data / "toy"
    save_toy_lm(toy / "lm", seed=0)
    save_toy_lm(toy / "lm-mle", seed=1)
    save_random_clip(toy / "clip", context_length=32)
    (toy / "defaults.json").write_text(json.dumps(TOY_DEFAULTS))
    return data


@pytest.fixture
def toy_env(toy_data, tmp_path, monkeypatch) -> Path:
    """A private copy of the toy stand-in data, MAGIC_EDU_DATA pointing at it."""
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    monkeypatch.setenv("MAGIC_EDU_DATA", str(data))
    return data


def test_data_dir_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MAGIC_EDU_DATA", raising=False)
    assert presets.data_dir() == Path(presets.__file__).resolve().parent.parent / "data"
    monkeypatch.setenv("MAGIC_EDU_DATA", str(tmp_path))
    assert presets.data_dir() == tmp_path.resolve()


def test_toy_loads_and_decodes(toy_env):
    models = load_models()  # "toy" is the default
    assert models.name == "toy" and models.kind == "caption" and models.prompt is None
    assert models.defaults == {k: TOY_DEFAULTS[k] for k in ("k", "alpha", "beta", "max_new_tokens")}
    assert models.lm.sos_token == PAPER_SOS and models.lm.tokenizer.pad_token == PAPER_PAD
    assert Path(models.lm.name) == toy_env / "toy" / "lm"
    assert models.clip.name == f"local-dir:{toy_env / 'toy' / 'clip'}"
    gen = magic_search(models.lm, models.clip, make_image(5), **models.settings())
    assert 1 <= len(gen.token_ids) <= 12


def test_toy_mle_uses_the_mle_twin(toy_env):
    models = load_models("toy-mle")
    assert Path(models.lm.name) == toy_env / "toy" / "lm-mle"
    assert not torch.equal(models.lm.model.transformer.wte.weight, load_models("toy").lm.model.transformer.wte.weight)


def test_toy_story_falls_back_to_the_caption_lm_then_uses_its_own(toy_env):
    models = load_models("toy-story")
    assert Path(models.lm.name) == toy_env / "toy" / "lm"
    assert models.kind == "story" and models.lm.prompt_format == "{prompt} {eos}" and models.lm.max_sentences == 5
    assert models.defaults == {"k": 6, "alpha": 0.5, "beta": 0.5, "max_new_tokens": 30}
    assert models.prompt == "a red circle"  # the suggested title, kept out of the settings
    assert models.settings(models.prompt) == models.defaults
    gen = magic_search(models.lm, models.clip, make_image(6), prompt=models.prompt, **models.settings())
    assert len(gen.token_ids) <= 30

    save_toy_lm(toy_env / "toy" / "lm-story", seed=2)
    assert Path(load_models("toy-story").lm.name) == toy_env / "toy" / "lm-story"


def test_toy_story_budget_may_count_the_prompt(toy_env):
    defaults = dict(TOY_DEFAULTS, story={"k": 6, "alpha": 0.5, "beta": 0.5, "max_length": 40})
    (toy_env / "toy" / "defaults.json").write_text(json.dumps(defaults))
    models = load_models("toy-story")
    prefix = models.lm.prefix_ids("a red circle")
    assert models.settings("a red circle")["max_new_tokens"] == 40 - len(prefix)


def test_missing_toy_files_give_a_clear_error(toy_env):
    shutil.rmtree(toy_env / "toy" / "clip")
    (toy_env / "toy" / "defaults.json").unlink()
    with pytest.raises(MagicEduError) as info:
        load_models("toy")
    msg = str(info.value)
    assert str(toy_env / "toy") in msg and "clip" in msg and "defaults.json" in msg and "MAGIC_EDU_DATA" in msg


def test_toy_defaults_must_be_complete(toy_env):
    (toy_env / "toy" / "defaults.json").write_text(json.dumps({"k": 8, "alpha": 0.3}))
    with pytest.raises(MagicEduError, match="beta, max_new_tokens"):
        load_models("toy")
    with pytest.raises(MagicEduError, match="story"):
        load_models("toy-story")


# -- a fresh process: only the environment variables, as a user sets them -----------------------
@pytest.mark.slow
def test_fresh_process_honours_hf_home_and_offline(tmp_path, stand_ins):
    home = tmp_path / "hf_home"
    cache = HubCache(home / "hub")
    cache.add("cambridgeltl/magic_mscoco", stand_ins["with_tokens"])
    cache.add(CLIP_REPO, stand_ins["clip"])
    script = textwrap.dedent(f"""
        import json, open_clip
        open_clip.factory._MODEL_CONFIGS["ViT-B-32-quickgelu"] = json.loads({json.dumps(json.dumps(TINY_CLIP_CFG))})
        from magic_edu.presets import load_models, ModelNotDownloadedError
        m = load_models("paper-mscoco")
        print("LOADED", m.lm.sos_token, m.clip.name)
        try:
            load_models("paper-flickr30k")
        except ModelNotDownloadedError as err:
            print("MISSING", err.missing)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LOADED {PAPER_SOS} ViT-B-32-quickgelu/openai" in out.stdout
    assert "MISSING ['cambridgeltl/magic_flickr30k']" in out.stdout


def test_decoders_follow_the_presets_settings_unless_told_otherwise():
    """`magic_search(models.lm, models.clip, image)` uses the preset's tuned settings (not the
    paper's k = 45, beta = 2 on a toy world); explicit arguments still win; the trace says
    which settings came from the preset; top-k sampling's own k is not the candidates' k."""
    from magic_edu import contrastive_search, magic_search, top_k_sampling
    from magic_edu.toyworld import shapes

    models = load_models("toy")
    image = shapes.make_scene(9_000_003, n_objects=1).image
    plain = magic_search(models.lm, models.clip, image)
    spelled_out = magic_search(models.lm, models.clip, image, **models.defaults)
    assert plain.token_ids == spelled_out.token_ids
    used = plain.trace.settings
    assert {name: used[name] for name in models.defaults} == models.defaults
    assert sorted(used["from_preset"]) == sorted(models.defaults)
    mine = magic_search(models.lm, models.clip, image, k=3).trace.settings
    assert mine["k"] == 3 and "k" not in mine["from_preset"] and mine["beta"] == models.defaults["beta"]
    assert contrastive_search(models.lm).trace.settings["k"] == models.defaults["k"]
    sampled = top_k_sampling(models.lm, seed=0).trace.settings
    assert sampled["k"] == 40 and "k" not in sampled["from_preset"]


def test_a_model_without_preset_takes_the_registrys_defaults(tiny_lm, tiny_clip):
    from magic_edu import magic_search
    from magic_edu.registry import DECODERS

    assert tiny_lm.defaults == {}
    settings = magic_search(tiny_lm, tiny_clip, make_image(0)).trace.settings
    magic = DECODERS["magic"]
    assert {p.name: settings[p.name] for p in magic.params} == {p.name: p.default for p in magic.params}
    assert settings["from_preset"] == [] and settings["max_new_tokens"] == 16


@pytest.mark.parametrize("bad, name", [({"k": 0}, "k"), ({"alpha": 5}, "alpha"), ({"beta": -1}, "beta"),
                                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"k": "ten"}, "k")])
def test_toy_defaults_out_of_range_are_refused_at_load(toy_env, bad, name):
    (toy_env / "toy" / "defaults.json").write_text(json.dumps(dict(TOY_DEFAULTS, **bad)))
    with pytest.raises(MagicEduError, match=f"out of range: {name} must be"):
        load_models("toy")


@pytest.mark.slow
def test_a_hub_that_never_answers_is_reported_within_seconds(tmp_path):
    """The hardening probe: a server that accepts connections and never answers kept
    load_models waiting 398 s (the hub's downloader retries with back-off); now one request
    with a short timeout decides, and the usual "not downloaded" error follows."""
    import socket
    import threading

    from magic_edu.presets import HUB_PROBE_TIMEOUT_S

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HOME=str(tmp_path),
               HF_HUB_CACHE=str(tmp_path / "hub"))
    code = ("import magic_edu\ntry:\n    magic_edu.load_models('gpt2')\n"
            "except magic_edu.ModelNotDownloadedError as e:\n    print('NOT DOWNLOADED', e.missing)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    elapsed = time.perf_counter() - start
    assert "NOT DOWNLOADED" in out.stdout and "gpt2" in out.stdout, out.stderr[-2000:]
    assert elapsed < HUB_PROBE_TIMEOUT_S + 60  # the interpreter's start and imports, plus one timeout
    server.close()
