"""Every decoder gives the same tokens as the code before the architecture rework (commit
b1e26e2, recorded in tests/data/outputs_b1e26e2.json), on the toy world and on random
stand-ins of the toy's and the paper's sizes. The reference loop is the oracle for MAGIC and
contrastive search (tests/test_decoding.py); this file guards the decoders that have none
(greedy, sampling, batches, stories) against a refactor changing what they write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import magic_edu as me
from magic_edu.tools.random_models import clip_vit_b32, gpt2_small, random_clip, random_language_model
from magic_edu.toyworld import shapes

EXPECTED = json.loads((Path(__file__).parent / "data" / "outputs_b1e26e2.json").read_text())
NOISE = Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8"))


def _ids(gen):
    return [g.token_ids for g in gen] if isinstance(gen, list) else gen.token_ids


def _check(outputs: dict) -> None:
    for name, ids in outputs.items():
        assert _ids(ids) == EXPECTED[name], name


@pytest.fixture(scope="module")
def toy_images():
    return [shapes.make_scene(shapes.HELD_OUT_SEED + i, n_objects=1 + i % 3).image for i in range(4)]


@pytest.mark.slow
def test_toy_world_outputs_unchanged(toy_images):
    models = me.load_models("toy")
    lm, clip = models.lm, models.clip
    out = {}
    for i, im in enumerate(toy_images):
        out[f"toy/magic/{i}"] = me.magic_search(lm, clip, im, k=10, alpha=0.1, beta=0.5, max_new_tokens=32)
        out[f"toy/magic-k45/{i}"] = me.magic_search(lm, clip, im, k=45, alpha=0.1, beta=2.0, max_new_tokens=16)
    out["toy/magic-batch"] = me.magic_search(lm, clip, toy_images, k=10, alpha=0.1, beta=0.5, max_new_tokens=32)
    out["toy/greedy"] = me.greedy_search(lm, max_new_tokens=32)
    out["toy/contrastive"] = me.contrastive_search(lm, k=10, alpha=0.1, max_new_tokens=32)
    for s in range(5):
        out[f"toy/top_k/{s}"] = me.top_k_sampling(lm, k=40, seed=s, max_new_tokens=32)
        out[f"toy/nucleus/{s}"] = me.nucleus_sampling(lm, p=0.95, seed=s, max_new_tokens=32)
    story = me.load_models("toy-story")
    out["toy-story/magic"] = me.magic_search(story.lm, story.clip, toy_images[0], prompt="a new friend", k=8,
                                             alpha=0.3, beta=1.0, max_new_tokens=64)
    out["toy-story/contrastive"] = me.contrastive_search(story.lm, prompt="a new friend", k=5, alpha=0.6,
                                                         max_new_tokens=64)
    _check(out)


def test_tiny_stand_in_outputs_unchanged(tmp_path):
    lm, clip = random_language_model(seed=3), random_clip(tmp_path, seed=1)
    kw = dict(max_new_tokens=40, stop_at_eos=False)
    _check({
        "tiny/magic": me.magic_search(lm, clip, NOISE, k=6, alpha=0.3, beta=1.0, **kw),
        "tiny/greedy": me.greedy_search(lm, **kw),
        "tiny/contrastive": me.contrastive_search(lm, k=5, alpha=0.6, **kw),
        "tiny/top_k": me.top_k_sampling(lm, k=40, seed=7, **kw),
        "tiny/nucleus": me.nucleus_sampling(lm, p=0.9, seed=7, **kw),
    })


@pytest.mark.slow
def test_paper_size_stand_in_outputs_unchanged(toy_images):
    lm, clip = gpt2_small(), clip_vit_b32()
    kw = dict(stop_at_eos=False)
    _check({
        "paper-size/magic": me.magic_search(lm, clip, NOISE, k=45, alpha=0.1, beta=2.0, max_new_tokens=8, **kw),
        "paper-size/magic-batch": me.magic_search(lm, clip, [NOISE, toy_images[1]], k=45, alpha=0.1, beta=2.0,
                                                  max_new_tokens=6, **kw),
        "paper-size/contrastive": me.contrastive_search(lm, k=5, alpha=0.6, max_new_tokens=16, **kw),
        "paper-size/greedy": me.greedy_search(lm, max_new_tokens=16, **kw),
        "paper-size/top_k": me.top_k_sampling(lm, k=40, seed=1, max_new_tokens=16, **kw),
        "paper-size/nucleus": me.nucleus_sampling(lm, p=0.95, seed=1, max_new_tokens=16, **kw),
    })
