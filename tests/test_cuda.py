"""On a CUDA machine the decoders run where the models are and give the CPU's tokens."""

from __future__ import annotations

import pytest
import torch

from magic_edu import (
    beam_search,
    contrastive_search,
    greedy_search,
    magic_search,
    nucleus_sampling,
    top_k_sampling,
    typical_sampling,
)
from magic_edu.tools.random_models import random_clip, random_language_model

from conftest import make_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_decoders_on_cuda_match_cpu(tmp_path):
    lm_cpu, lm_gpu = random_language_model(seed=3, dtype=torch.float64), random_language_model(seed=3,
                                                                                             dtype=torch.float64)
    clip_cpu, clip_gpu = random_clip(tmp_path / "a", seed=3), random_clip(tmp_path / "b", seed=3)
    clip_cpu.model.double()
    clip_gpu.model.double()
    lm_gpu.model.to("cuda")
    clip_gpu.model.to("cuda")
    images = [make_image(s) for s in range(3)]
    kw = dict(k=6, alpha=0.3, beta=2.0, max_new_tokens=8)
    gpu = magic_search(lm_gpu, clip_gpu, images, **kw)
    cpu = magic_search(lm_cpu, clip_cpu, images, **kw)
    assert [g.token_ids for g in gpu] == [g.token_ids for g in cpu]
    assert contrastive_search(lm_gpu, k=5, alpha=0.6).token_ids == contrastive_search(lm_cpu, k=5, alpha=0.6).token_ids
    assert greedy_search(lm_gpu).token_ids == greedy_search(lm_cpu).token_ids
    assert len(top_k_sampling(lm_gpu, k=5, seed=1).token_ids) > 0


def test_shared_clip_prefix_on_cuda_matches_cpu(tmp_path, monkeypatch):
    """The prefix-sharing text encoder (and its memo across steps) on the GPU too."""
    from magic_edu.fast import clip_prefix

    monkeypatch.setattr(clip_prefix, "SHARE_ON_GPU_SAVED_TOKENS", 0)
    lm_cpu, lm_gpu = (random_language_model(seed=4, dtype=torch.float64) for _ in range(2))
    clip_cpu, clip_gpu = random_clip(tmp_path / "a", seed=4), random_clip(tmp_path / "b", seed=4)
    for lm, clip, device in ((lm_cpu, clip_cpu, "cpu"), (lm_gpu, clip_gpu, "cuda")):
        clip.model.double().to(device)
        lm.model.to(device)
    images = [make_image(s) for s in range(2)]
    kw = dict(k=5, alpha=0.2, beta=3.0, max_new_tokens=10)
    assert [g.token_ids for g in magic_search(lm_gpu, clip_gpu, images, **kw)] == \
        [g.token_ids for g in magic_search(lm_cpu, clip_cpu, images, **kw)]


def test_sampling_and_beam_search_on_cuda_match_cpu():
    """Sampling filters on the CPU from the GPU's logits; beam search's beams read their paths
    through the context on the GPU: both give the CPU's tokens, and beam search transformers'."""
    lm_cpu, lm_gpu = (random_language_model(seed=5, dtype=torch.float64) for _ in range(2))
    lm_gpu.model.to("cuda")
    for fn, kw in ((top_k_sampling, dict(k=8, temperature=0.7)), (nucleus_sampling, dict(p=0.9, temperature=1.3)),
                   (typical_sampling, dict(mass=0.6))):
        assert fn(lm_gpu, seed=2, **kw).token_ids == fn(lm_cpu, seed=2, **kw).token_ids
    for n, lp in ((3, 1.0), (5, -0.5)):
        gpu = beam_search(lm_gpu, num_beams=n, length_penalty=lp, max_new_tokens=10).token_ids
        assert gpu == beam_search(lm_cpu, num_beams=n, length_penalty=lp, max_new_tokens=10).token_ids
        prefix = torch.tensor([lm_gpu.prefix_ids(None)], device="cuda")
        out = lm_gpu.model.generate(prefix, attention_mask=torch.ones_like(prefix), num_beams=n, do_sample=False,
                                    early_stopping=False, length_penalty=lp, max_new_tokens=10,
                                    pad_token_id=lm_gpu.eos_token_id)
        assert gpu == out[0, prefix.shape[1]:].tolist()
