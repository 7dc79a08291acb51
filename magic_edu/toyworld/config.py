"""The toy world's training settings, and the two things both trainings share: seeding and
the learning-rate schedule.

Seeds: training scenes come from seeds below 1,000,000; tuning uses :data:`TUNE_SEED` and up;
the results table and the tests use :data:`~magic_edu.toyworld.shapes.HELD_OUT_SEED` and up.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

TUNE_SEED = 5_000_000  # validation scenes: the tuning of the decoding settings, CLIP's zero-shot check
STORY_PROMPT = "a new friend"  # a title naming no colour or shape: what the story says comes from the image


@dataclass
class TrainConfig:
    """Sizes, steps and learning rates of one training run (:data:`QUICK`: a miniature, for tests)."""

    seed: int = 0
    threads: int = 2
    # language model (GPT-2)
    lm_layers: int = 3
    lm_width: int = 128
    lm_heads: int = 4
    lm_positions: int = 96
    lm_captions: int = 60_000
    lm_stories: int = 20_000
    lm_steps: int = 600
    lm_batch: int = 48
    lm_lr: float = 2e-3
    margin: float = 0.5
    # CLIP
    clip_image_size: int = 64
    clip_vision_width: int = 16  # ModifiedResNet, layers (1, 1, 1, 1)
    clip_text_width: int = 64
    clip_text_layers: int = 2  # a shallow text tower starts telling shapes apart much sooner
    clip_text_heads: int = 4
    clip_embed_dim: int = 64
    clip_context: int = 64
    clip_pool: int = 16_000  # rendered training images (pairs: a scene and its perturbed twin)
    clip_first_steps: int = 300  # first, single-object scenes only: whole captions + counterfactuals
    clip_first_batch: int = 64
    clip_steps: int = 400  # then scene pairs, captions, prefixes, stories, counterfactuals, junk
    clip_batch: int = 128  # images per step; clip_texts_per_image texts each, plus junk texts
    clip_texts_per_image: int = 2
    clip_lr: float = 2e-3
    clip_text_lr_mult: float = 1.0  # the text tower's learning rate is clip_lr times this
    clip_idf: bool = False
    # tuning of the decoding settings
    tune_scenes: int = 50


QUICK = TrainConfig(
    lm_layers=1, lm_width=32, lm_heads=2, lm_captions=600, lm_stories=200, lm_steps=15, lm_batch=16,
    clip_vision_width=8, clip_text_width=32, clip_text_layers=1, clip_text_heads=2, clip_embed_dim=32,
    clip_pool=256, clip_first_steps=4, clip_first_batch=16, clip_steps=6, clip_batch=32, tune_scenes=0,
)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05):
    """Linear warm-up over the first ``warmup_frac`` of ``steps``, then a cosine down to zero."""
    warmup = max(1, int(steps * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
