"""Shared fixtures: tiny randomly initialised models built offline (no download)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from magic_edu.tools.random_models import random_clip, random_language_model

# The test models are tiny: one thread is faster than two, and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm():
    """float32 tiny GPT-2 with a byte-level BPE tokenizer and <-start_of_text->."""
    return random_language_model(seed=0)


@pytest.fixture(scope="session")
def tiny_lm64():
    """The same kind of model in float64, where float32 rounding could flip near-ties."""
    return random_language_model(seed=1, n_layer=2, n_embd=48, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return random_clip(tmp_path_factory.mktemp("clip32"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip64(tmp_path_factory):
    clip = random_clip(tmp_path_factory.mktemp("clip64"), seed=1)
    clip.model.double()
    return clip


def make_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def images():
    return [make_image(s) for s in range(4)]
