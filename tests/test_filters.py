"""The sampling filters against transformers' own warpers (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, TypicalLogitsWarper with min_tokens_to_keep=1), bit for bit, on random logits in
float64 and float32, on logits full of ties (so that ties fall on every cut), and at the ends of
every range; plus the few corners where the definitions say more than the warpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from magic_edu import MagicEduError, filtered_probs, nucleus_filter, temperature, top_k_filter, typical_filter

DTYPES = [torch.float64, torch.float32]
VOCABS = [2, 7, 50, 401]  # sorting is not stable on the CPU from about 20 tokens up: the tie cases need it


def logit_batches(dtype: torch.dtype, vocab: int) -> list[torch.Tensor]:
    """(rows, vocab) logits: peaked, flat, and tied (a few distinct values, so many tokens share a
    logit and ties fall at every cut), some with -inf entries (a filter applied before)."""
    g = torch.Generator().manual_seed(vocab)
    peaked = torch.randn(6, vocab, generator=g, dtype=torch.float64) * 4
    flat = torch.randn(6, vocab, generator=g, dtype=torch.float64) * 0.3
    tied = torch.randint(0, 4, (6, vocab), generator=g).double() * 0.7
    blocked = peaked.clone()
    blocked[:, ::3] = -math.inf
    blocked[:, 1] = 0.0  # at least one token left in every row
    return [x.to(dtype) for x in (peaked, flat, tied, blocked)]


def warped(warper, logits: torch.Tensor) -> torch.Tensor:
    return warper(None, logits.clone())  # (the warpers do not look at the ids)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, -inf included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_temperature_is_transformers_temperature_warper(dtype, vocab):
    for logits in logit_batches(dtype, vocab):
        for t in (0.05, 0.3, 0.7, 1.0, 1.7, 10.0):
            assert same(temperature(logits, t), warped(TemperatureLogitsWarper(t), logits)), t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_top_k_filter_is_transformers_top_k_warper(dtype, vocab):
    kept_more_than_k = 0
    for logits in logit_batches(dtype, vocab):
        for k in sorted({1, 2, 3, 5, 37, vocab - 1, vocab, vocab + 10} - {0}):
            ours = top_k_filter(logits, k)
            assert same(ours, warped(TopKLogitsWarper(k), logits)), k
            kept = torch.isfinite(ours).sum(-1)
            kept_more_than_k += int((kept > min(k, vocab)).sum())  # ties at the cut all stay
            if k >= vocab:
                assert same(ours, logits)
    if vocab > 2:
        assert kept_more_than_k > 0, "no tie fell at the cut: this test no longer tests ties"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_nucleus_filter_is_transformers_top_p_warper(dtype, vocab):
    for logits in logit_batches(dtype, vocab):
        for p in (1e-12, 1e-3, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0):
            assert same(nucleus_filter(logits, p), warped(TopPLogitsWarper(p), logits)), p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_typical_filter_is_transformers_typical_warper(dtype, vocab):
    for logits in logit_batches(dtype, vocab):
        for mass in (1e-12, 1e-3, 0.1, 0.5, 0.9, 0.95, 0.999):
            assert same(typical_filter(logits, mass), warped(TypicalLogitsWarper(mass), logits)), mass
        # mass = 1: transformers' generate(typical_p=1.0) leaves the warper out (the warper refuses 1)
        assert same(typical_filter(logits, 1.0), logits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_chain_temperature_then_filter_is_transformers_order(dtype):
    for logits in logit_batches(dtype, 50):
        for t in (0.5, 2.0):
            for ours, theirs in ((top_k_filter(temperature(logits, t), 5), TopKLogitsWarper(5)),
                                 (nucleus_filter(temperature(logits, t), 0.8), TopPLogitsWarper(0.8)),
                                 (typical_filter(temperature(logits, t), 0.8), TypicalLogitsWarper(0.8))):
                assert same(ours, warped(theirs, warped(TemperatureLogitsWarper(t), logits)))


def test_leading_dimensions_are_rows():
    logits = logit_batches(torch.float64, 50)[0].reshape(2, 3, 50)
    for ours, theirs in ((top_k_filter(logits, 4), TopKLogitsWarper(4)), (nucleus_filter(logits, 0.7),
                         TopPLogitsWarper(0.7)), (typical_filter(logits, 0.7), TypicalLogitsWarper(0.7))):
        assert same(ours.reshape(6, 50), warped(theirs, logits.reshape(6, 50)))
    row = logits[0, 0]  # a single distribution (no batch dimension) works too
    assert same(nucleus_filter(row, 0.7), nucleus_filter(logits, 0.7)[0, 0])


def test_what_the_filters_keep_by_their_definitions():
    """Independently of transformers, on distributions worked out by hand."""
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    logits = probs.log()

    def kept(filtered):
        return torch.isfinite(filtered).nonzero()[:, 0].tolist()

    assert kept(top_k_filter(logits, 2)) == [0, 1]
    # nucleus: the smallest most-probable set holding at least p
    assert kept(nucleus_filter(logits, 0.5)) == [0]
    assert kept(nucleus_filter(logits, 0.6)) == [0, 1]
    assert kept(nucleus_filter(logits, 0.84)) == [0, 1, 2]
    assert kept(nucleus_filter(logits, 1e-9)) == [0]
    assert kept(nucleus_filter(logits, 1.0)) == [0, 1, 2, 3, 4]
    # typical: H = 1.3331 nats; -log p = 0.693, 1.609, 1.897, 2.303, 2.996, so |-log p - H| = 0.640, 0.276,
    # 0.564, 0.970, 1.663: tokens in the order 1, 2, 0, 3, 4, holding 0.2, 0.35, 0.85, 0.95, 1 on the way
    entropy = -(probs * probs.log()).sum()
    assert abs(float(entropy) - 1.3331) < 1e-4
    assert kept(typical_filter(logits, 0.1)) == [1]
    assert kept(typical_filter(logits, 0.3)) == [1, 2]
    assert kept(typical_filter(logits, 0.5)) == [0, 1, 2]
    assert kept(typical_filter(logits, 0.9)) == [0, 1, 2, 3]
    assert kept(typical_filter(logits, 1e-9)) == [1]  # the closest token always stays
    # the renormalised distribution: p over the kept tokens, 0 elsewhere
    q = filtered_probs(typical_filter(logits, 0.3))
    torch.testing.assert_close(q, torch.tensor([0, 0.2 / 0.35, 0.15 / 0.35, 0, 0], dtype=torch.float64))
    # temperature: softmax(logits / t) is p ** (1 / t), renormalised
    torch.testing.assert_close(filtered_probs(temperature(logits, 0.5)), probs**2 / (probs**2).sum())


def test_ties_at_the_cut():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 4  # the three tied with the 2nd all stay
    # typical: equally surprising tokens are all kept or all removed
    flat = torch.zeros(1, 6)
    assert torch.isfinite(typical_filter(flat, 0.1)).all()


@pytest.mark.parametrize("call, name, message", [
    (lambda x: temperature(x, 0.0), "temperature", "> 0"),
    (lambda x: temperature(x, -1.0), "temperature", "> 0"),
    (lambda x: temperature(x, math.inf), "temperature", "finite"),
    (lambda x: temperature(x, math.nan), "temperature", "finite"),
    (lambda x: temperature(x, True), "temperature", "> 0"),
    (lambda x: top_k_filter(x, 0), "k", "integer >= 1"),
    (lambda x: top_k_filter(x, 2.5), "k", "integer >= 1"),
    (lambda x: nucleus_filter(x, 0.0), "p", "(0, 1]"),
    (lambda x: nucleus_filter(x, 1.5), "p", "(0, 1]"),
    (lambda x: nucleus_filter(x, math.nan), "p", "(0, 1]"),
    (lambda x: typical_filter(x, 0.0), "mass", "(0, 1]"),
    (lambda x: typical_filter(x, 1.01), "mass", "(0, 1]"),
    (lambda x: typical_filter(x, "0.5"), "mass", "(0, 1]"),
])
def test_bad_settings_name_the_argument_and_the_range(call, name, message):
    with pytest.raises(MagicEduError) as err:
        call(torch.zeros(2, 5))
    assert str(err.value).startswith(f"{name} must be ") and message in str(err.value)
