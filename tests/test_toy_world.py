"""The bundled toy models (data/toy): they load through the real transformers / open_clip
paths, CLIP sees colour and shape, MAGIC grounds its captions, and the training code runs."""

import json
from pathlib import Path

import pytest
import torch

from magic_edu import ImageTextMatcher, LanguageModel, greedy_search, magic_search
from magic_edu.presets import PAPER_PAD, PAPER_SOS
from magic_edu.toyworld import report, shapes
from magic_edu.toyworld.config import STORY_PROMPT

TOY = Path(__file__).resolve().parent.parent / "data" / "toy"


@pytest.fixture(scope="module")
def toy():
    return report.load_toy(TOY)


def test_files_are_there_and_small():
    for rel in ("lm/config.json", "lm/model.safetensors", "lm/tokenizer.json", "lm-mle/model.safetensors",
                "lm-mle/tokenizer.json", "clip/open_clip_config.json", "clip/open_clip_model.safetensors",
                "defaults.json"):
        assert (TOY / rel).is_file(), rel
    total = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert total < 60e6, f"{total / 1e6:.1f} MB"
    assert not list(TOY.rglob("*.bin")) and not list(TOY.rglob("*.pt"))


def test_defaults():
    d = json.loads((TOY / "defaults.json").read_text())
    for settings in (d, d["story"]):
        assert {"k", "alpha", "beta", "max_new_tokens"} <= set(settings)
        assert 1 <= settings["k"] <= 50 and 0 <= settings["alpha"] <= 1 and settings["beta"] >= 0


def test_tokenizer_is_word_level_with_the_paper_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "lm")
    assert tok.bos_token == "<-start_of_text->" and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<-pad->"
    text = "there is a small orange star on the left."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(shapes.words_of(text))  # one token per word and per full stop
    assert tok.decode(ids) == text
    ids = tok("<-start_of_text-> a red circle. <|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6


def test_lms_load_through_transformers():
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    a = AutoModelForCausalLM.from_pretrained(TOY / "lm")
    b = AutoModelForCausalLM.from_pretrained(TOY / "lm-mle")
    assert isinstance(a, GPT2LMHeadModel) and isinstance(b, GPT2LMHeadModel)
    assert a.config.to_dict()["n_layer"] == b.config.to_dict()["n_layer"]
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)


def test_clip_loads_through_open_clip():
    import open_clip
    from safetensors.torch import load_file

    name = f"local-dir:{TOY.resolve() / 'clip'}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    assert tokenizer.context_length == json.loads((TOY / "clip/open_clip_config.json").read_text())[
        "model_cfg"]["text_cfg"]["context_length"]
    stored = load_file(TOY / "clip/open_clip_model.safetensors")
    state = model.state_dict()
    assert set(stored) == set(state)
    assert all(torch.equal(state[k].to(v.dtype), v) for k, v in stored.items())  # the weights were loaded
    x = preprocess(shapes.make_scene(1).image).unsqueeze(0)
    assert model.encode_image(x).shape[-1] == model.encode_text(tokenizer(["a red circle."])).shape[-1]


def test_clip_tells_colour_and_shape_apart(toy):
    """CLIP alone (no language model): is 'a <colour> <shape>.' the best of the 24 for
    held-out single-object scenes?"""
    _, _, clip, _ = toy
    scenes = report.held_out_scenes(48, multi=False)
    labels = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    text = clip.embed_texts([f"{'an' if c == 'orange' else 'a'} {c} {s}." for c, s in labels])
    pred = (clip.embed_image([s.image for s in scenes]) @ text.T).argmax(1).tolist()
    right = [labels[p] == (s.objects[0].colour, s.objects[0].shape) for p, s in zip(pred, scenes, strict=True)]
    assert sum(right) / len(right) >= 0.85


def test_magic_caption_through_the_library(toy):
    lm, _, clip, defaults = toy
    scene = report.held_out_scenes(1, multi=False)[0]
    g = magic_search(lm, clip, scene.image, **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    assert g.text and g.text.endswith(".")
    assert g.token_ids[-1] == lm.eos_token_id


def test_story_lm_writes_a_story(toy):
    _, story_lm, clip, defaults = toy
    st = defaults["story"]
    scene = shapes.make_scene(shapes.HELD_OUT_SEED + 200_000, n_captions=1)
    g = magic_search(story_lm, clip, scene.image, prompt=st.get("prompt", STORY_PROMPT),
                     **{k: st[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    assert g.text.count(".") >= 2
    assert shapes.named_pairs(g.text)


@pytest.mark.slow
def test_magic_grounds_held_out_single_object_scenes(toy):
    """The issue's floor: MAGIC names colour and shape right on >= 70% of held-out
    single-object scenes, fluently; the image-blind greedy caption is far below."""
    lm, _, clip, defaults = toy
    scenes = report.held_out_scenes(100, multi=False)
    texts = [g.text for g in magic_search(lm, clip, [s.image for s in scenes], record=False,
                                          **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})]
    score = report.score_captions(texts, scenes)
    assert score["any"] >= 0.7, score
    assert score["fluent"] >= 0.9, score
    greedy = greedy_search(lm, max_new_tokens=defaults["max_new_tokens"]).text
    assert report.score_captions([greedy] * len(scenes), scenes)["any"] <= 0.3


@pytest.mark.slow
def test_miniature_training_runs(tmp_path, capsys):
    """The training code end to end at a miniature size; its output loads like the real one."""
    from magic_edu.tools import cli

    assert cli.main(["toy", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0  # `magic-edu toy`
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["megabytes"] < 60
    lm = LanguageModel.from_pretrained(str(tmp_path / "lm"), sos_token=PAPER_SOS, pad_token=PAPER_PAD)
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{tmp_path / 'clip'}")
    g = magic_search(lm, clip, shapes.make_scene(0).image, k=4, max_new_tokens=5)
    assert len(g.token_ids) <= 5
    assert json.loads((tmp_path / "defaults.json").read_text())["story"]
    capsys.readouterr()
    assert cli.main(["toy", "--report", "--out", str(tmp_path), "--scenes", "3", "--threads", "1"]) == 0
    report = capsys.readouterr().out
    assert "| MAGIC" in report and "A toy MAGIC caption takes" in report
    assert "| ZeroCap |" in report and "MAGIC" in report.split("per caption: MAGIC ")[1]  # its row and speed-up


def test_training_needs_an_explicit_output_folder(capsys):
    """`magic-edu toy` alone must not retrain into ./data/toy (the bundled models, from the repository root)."""
    from magic_edu.tools import cli

    assert cli.main(["toy", "--threads", "1"]) == 2
    assert "--out: give the folder to train into" in capsys.readouterr().err


def test_write_defaults_is_atomic_and_keeps_the_committed_format(tmp_path):
    import os

    from magic_edu.toyworld.train import write_defaults

    committed = (TOY / "defaults.json").read_bytes()
    scores = {"caption": [0.5]}
    assert write_defaults(tmp_path, {**json.loads(committed), "tuning": scores}) == scores
    assert (tmp_path / "defaults.json").read_bytes() == committed  # same bytes: indent 2 and a newline
    assert os.listdir(tmp_path) == ["defaults.json"]  # no temporary file left
    assert oct((tmp_path / "defaults.json").stat().st_mode & 0o777) == oct(0o644)
