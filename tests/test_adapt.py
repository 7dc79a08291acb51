"""magic-edu adapt-lm (magic_edu.training.adapt): the authors' token handling, SimCTG training of a
tiny random GPT-2, checkpoints that load like a preset, resuming, and two processes (gloo) giving
one process's loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import magic_edu
from magic_edu import LanguageModel, MagicEduError
from magic_edu.inputs import read_texts
from magic_edu.presets import PAPER_PAD, PAPER_SOS
from magic_edu.tools import cli
from magic_edu.tools.random_models import random_language_model, save_random_clip
from magic_edu.toyworld import shapes
from magic_edu.training import adapt
from magic_edu.training.adapt import AdaptConfig, adapt_lm
from magic_edu.training.simctg import IGNORE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A caption corpus, a tiny random GPT-2 without the start and pad tokens (``base``), the same
    pretrained with plain MLE for a few steps (``pretrained``: anisotropic, as a real LM is), and a
    random CLIP to pair with."""
    root = tmp_path_factory.mktemp("adapt")
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(sorted(set(shapes.caption_corpus(range(300), per_scene=2)))) + "\n")
    lm = random_language_model(n_layer=1, n_embd=32, sos_token=None, initializer_range=0.02, seed=0)
    lm.model.save_pretrained(root / "base")
    lm.tokenizer.save_pretrained(root / "base")
    clip = save_random_clip(root / "clip", seed=0)
    common = dict(batch_size=16, micro_batch_size=8, log_every=1000, progress=False, clip=f"local-dir:{clip}",
                  clip_pretrained=None)
    adapt_lm(AdaptConfig(corpus=str(corpus), out=str(root / "pretrained"), base=str(root / "base"), steps=60,
                         learning_rate=3e-3, contrastive=False, save_every=60, **common))
    return {"root": root, "corpus": corpus, "base": root / "base", "pretrained": root / "pretrained",
            "clip": clip, "common": common, "base_vocab": len(lm.tokenizer)}


def config(world, out, **kw) -> AdaptConfig:
    settings = {"corpus": str(world["corpus"]), "out": str(out), "base": str(world["pretrained"]), "steps": 12,
                "learning_rate": 1e-3, "save_every": 4, **world["common"]}
    settings.update(kw)
    return AdaptConfig(**settings)


# -- the data, as the authors prepare it -----------------------------------------------------------
def test_texts_become_start_token_text_eos(world):
    tok = LanguageModel.from_pretrained(str(world["base"]), sos_token=PAPER_SOS, pad_token=PAPER_PAD).tokenizer
    sos, eos = tok.convert_tokens_to_ids([PAPER_SOS])[0], tok.eos_token_id
    texts = ["a red circle.", "x", "a small blue square to the left of a large green star."]
    seqs, dropped = adapt.encode_texts(tok, texts, 5, sos, eos)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(ids[1]) == 1 and dropped == 1  # one token: dropped, as the authors' process_one_text
    assert seqs == [[sos, *ids[0][:5], eos], [sos, *ids[2][:5], eos]]
    inputs, labels, mask = adapt.collate([[7, 1, 2, 3], [7, 4, 9]], pad_id=0)
    assert inputs.tolist() == [[7, 1, 2], [7, 4, 0]]  # shifted per text, then padded
    assert labels.tolist() == [[1, 2, 3], [4, 9, IGNORE]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("a dog.\n\n  a   cat  \n")
    assert read_texts(tmp_path / "a.txt") == ["a dog.", "a cat"]
    (tmp_path / "b.json").write_text(json.dumps([{"image_name": "1.jpg", "captions": ["one", "two"]},
                                                 {"captions": ["three"]}]))
    assert read_texts(tmp_path / "b.json") == ["one", "two", "three"]  # the paper's caption format
    (tmp_path / "c.json").write_text(json.dumps(["x", "y"]))
    assert read_texts(tmp_path / "c.json") == ["x", "y"]
    for name, content, message in (("d.json", "{", "not valid JSON"), ("e.json", '{"a": 1}', "expected a JSON list"),
                                   ("f.json", '[{"text": "a"}]', 'item 0 has no list "captions"'),
                                   ("g.txt", "\n \n", "no texts"), ("h.json", "[1]", "text 0 must be a string")):
        (tmp_path / name).write_text(content)
        with pytest.raises(MagicEduError, match=message):
            read_texts(tmp_path / name, "corpus")
    (tmp_path / "i.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MagicEduError, match="UTF-8"):
        read_texts(tmp_path / "i.txt", "corpus")
    with pytest.raises(MagicEduError, match="corpus .*: no such file"):
        read_texts(tmp_path / "missing.txt", "corpus")


def test_the_schedule_is_transformers_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    cfg = AdaptConfig(corpus=["a b"], out="x", steps=50, learning_rate=2e-5, warmup=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * 50), 50)
    for step in range(50):
        assert adapt.lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15), step
        opt.step()
        sched.step()


def test_each_pass_is_a_permutation_and_depends_only_on_seed_and_step():
    order = adapt.TextOrder(10, 4, seed=3)
    seen = [i for step in range(5) for i in order.batch(step)]  # 20 = two passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert adapt.TextOrder(10, 4, seed=3).batch(3) == order.batch(3)
    assert adapt.TextOrder(10, 4, seed=4).batch(0) != order.batch(0)


# -- training -----------------------------------------------------------------------------------
def test_simctg_lowers_both_losses_and_flattens_the_representations(world, tmp_path):
    """From an MLE-pretrained tiny GPT-2 (anisotropic, like GPT-2): SimCTG lowers the MLE and the
    contrastive loss, on the training batches and held out, and leaves the token representations
    less self-similar than an MLE-only run of the same recipe."""
    r = adapt_lm(config(world, tmp_path / "simctg", steps=30, save_every=30))
    first, last = r.history[:5], r.history[-5:]
    for key in ("mle", "cl"):
        assert sum(h[key] for h in last) < sum(h[key] for h in first), key
    before, after = r.evals[0], r.evals[-1]
    assert r.evals[0]["step"] == 0 and r.evals[-1]["step"] == 30
    assert after["held_out_mle"] < before["held_out_mle"] and after["held_out_cl"] < before["held_out_cl"]
    assert after["held_out_ppl"] == pytest.approx(2.718281828 ** after["held_out_mle"])
    mle = adapt_lm(config(world, tmp_path / "mle", steps=30, save_every=30, contrastive=False))
    assert all(h["cl"] is None for h in mle.history)
    held = read_texts(world["corpus"])[:100]
    similarity = {name: adapt.self_similarity_of(LanguageModel.from_pretrained(str(tmp_path / name)), held)
                  for name in ("simctg", "mle")}
    assert similarity["simctg"] < similarity["mle"], similarity


def test_the_result_loads_like_a_preset_with_its_start_token_and_decodes(world, tmp_path):
    out = tmp_path / "lm"
    adapt_lm(config(world, out, base=str(world["base"]), steps=4, save_every=2))  # the base lacks both tokens
    lm = LanguageModel.from_pretrained(str(out), sos_token=PAPER_SOS, pad_token=PAPER_PAD)
    assert len(lm.tokenizer) == world["base_vocab"] + 2  # the start and pad tokens were added ...
    assert lm.vocab_size == len(lm.tokenizer)  # ... and the embeddings resized
    assert lm.prefix_ids() == [lm.tokenizer.convert_tokens_to_ids([PAPER_SOS])[0]]
    assert lm.eos_token == "<|endoftext|>"
    models = magic_edu.load_models(str(out))  # the folder is a preset: its LM, its CLIP, the MSCOCO settings
    assert models.lm.sos_token == PAPER_SOS and models.defaults == adapt.CAPTION_DEFAULTS
    assert models.clip.name == f"local-dir:{world['clip']}"
    gen = magic_edu.magic_search(models.lm, models.clip, shapes.make_scene(1).image, k=4, max_new_tokens=6)
    assert 1 <= len(gen.token_ids) <= 6 and gen.trace.prefix_ids == lm.prefix_ids()
    assert magic_edu.greedy_search(models.lm, max_new_tokens=5).token_ids
    # a checkpoint is a Hugging Face folder too
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    LanguageModel.from_pretrained(str(out / "checkpoints" / "step-000002"), sos_token=PAPER_SOS)
    log = json.loads((out / "training_log.json").read_text())
    assert [h["step"] for h in log["steps"]] == [1, 2, 3, 4] and [e["step"] for e in log["evals"]] == [0, 2, 4]


def test_resume_gives_the_uninterrupted_result(world, tmp_path, monkeypatch):
    whole = adapt_lm(config(world, tmp_path / "whole"))
    real_step = adapt.train_step

    def interrupted(cfg, model, raw, opt, procs, batch, pad_id, step):
        if step == 6:  # after the checkpoint of step 4, before the one of step 8
            raise KeyboardInterrupt
        return real_step(cfg, model, raw, opt, procs, batch, pad_id, step)

    monkeypatch.setattr(adapt, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapt_lm(config(world, tmp_path / "parts"))
    assert [s for s, _ in adapt.checkpoints(tmp_path / "parts")] == [4]
    monkeypatch.setattr(adapt, "train_step", real_step)
    resumed = adapt_lm(config(world, tmp_path / "parts"))
    assert resumed.resumed_from == 4
    assert [(h["mle"], h["cl"]) for h in resumed.history] == [(h["mle"], h["cl"]) for h in whole.history]
    assert resumed.evals == whole.evals
    a = LanguageModel.from_pretrained(str(tmp_path / "whole")).model.state_dict()
    b = LanguageModel.from_pretrained(str(tmp_path / "parts")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    again = adapt_lm(config(world, tmp_path / "parts"))  # finished: nothing more to do
    assert again.resumed_from == 12 and len(again.history) == 12


def test_bad_settings_and_folders_are_refused(world, tmp_path):
    adapt_lm(config(world, tmp_path / "run", steps=2, save_every=2))
    with pytest.raises(MagicEduError, match="other settings .*learning_rate 0.001 before, 0.002 now"):
        adapt_lm(config(world, tmp_path / "run", steps=2, save_every=2, learning_rate=2e-3))
    from filelock import FileLock

    with FileLock(str(tmp_path / "run" / ".adapt.lock")), \
            pytest.raises(MagicEduError, match="another adapt-lm is writing it"):
        adapt_lm(config(world, tmp_path / "run", steps=2, save_every=2))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MagicEduError, match="is not empty and holds no adaptation"):
        adapt_lm(config(world, other))
    with pytest.raises(MagicEduError, match=r"batch_size \(10\) must be a multiple of micro_batch_size \(4\)"):
        adapt_lm(config(world, tmp_path / "x", batch_size=10, micro_batch_size=4))
    with pytest.raises(MagicEduError, match="learning_rate"):
        adapt_lm(config(world, tmp_path / "x", learning_rate=0))
    with pytest.raises(MagicEduError, match="base .*cannot load it"):
        adapt_lm(config(world, tmp_path / "y", base=str(tmp_path / "no-such-model")))
    with pytest.raises(MagicEduError, match="name must be one of .*or a folder with a magic_edu_preset.json"):
        magic_edu.load_models(str(tmp_path))


def test_the_command_line(world, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["adapt-lm", "--corpus", str(world["corpus"]), "--base", str(world["pretrained"]), "--out", str(out),
            "--steps", "3", "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "3", "--no-progress",
            "--clip", f"local-dir:{world['clip']}", "--clip-pretrained", "none"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "held-out perplexity" in printed.out and "the adapted model is in" in printed.err
    assert json.loads((out / "adapt_config.json").read_text())["batch_size"] == 8
    assert cli.main([*argv[:-2], "--micro-batch-size", "3", "--clip-pretrained", "none"]) == 2
    assert "batch_size (8) must be a multiple of micro_batch_size (3)" in capsys.readouterr().err


# -- two processes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_give_one_process_s_loss_curve(world, tmp_path):
    """torchrun, two CPU processes (gloo, DDP), micro-batches of 4: the loss curve, the held-out
    figures and the weights of one process accumulating the same effective batch of 8."""
    settings = ["--corpus", str(world["corpus"]), "--base", str(world["pretrained"]), "--steps", "8",
                "--batch-size", "8", "--micro-batch-size", "4", "--learning-rate", "1e-3", "--save-every", "8",
                "--no-progress", "--clip", f"local-dir:{world['clip']}", "--clip-pretrained", "none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "magic_edu", "adapt-lm", *settings, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stderr
    one = adapt_lm(replace(config(world, tmp_path / "one"), steps=8, batch_size=8, micro_batch_size=4,
                           save_every=8))
    two = json.loads((tmp_path / "two" / "training_log.json").read_text())
    assert len(two["steps"]) == len(one.history) == 8
    for a, b in zip(one.history, two["steps"]):
        assert a["tokens"] == b["tokens"]  # the same texts
        assert b["mle"] == pytest.approx(a["mle"], rel=1e-5) and b["cl"] == pytest.approx(a["cl"], rel=1e-4)
    for a, b in zip(one.evals, two["evals"]):
        assert b["held_out_mle"] == pytest.approx(a["held_out_mle"], rel=1e-5)
    x = LanguageModel.from_pretrained(str(tmp_path / "one")).model.state_dict()
    y = LanguageModel.from_pretrained(str(tmp_path / "two")).model.state_dict()
    assert all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)
