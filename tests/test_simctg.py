"""SimCTG's objective (magic_edu.training.simctg) against slow references written here: every pair
of positions enumerated with loops, padding left out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from magic_edu.toyworld import lm_training
from magic_edu.training.simctg import (
    IGNORE,
    contrastive_loss,
    mle_loss,
    pair_count,
    self_similarity,
    simctg_loss,
)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def reference_contrastive(hidden: torch.Tensor, lengths: list[int], margin: float) -> tuple[float, int]:
    """(sum over every ordered pair i != j of real positions of each sequence of
    max(0, margin - (s(h_i, h_i) - s(h_i, h_j))), the number of those pairs): plain loops."""
    total, pairs = 0.0, 0
    for b, n in enumerate(lengths):
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                h_i, h_j = hidden[b, i], hidden[b, j]
                total += max(0.0, margin - (cosine(h_i, h_i) - cosine(h_i, h_j)))
                pairs += 1
    return total, pairs


def batch(seed: int, lengths: list[int], d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 hidden states (B, T, d) with right padding after each length, and the mask."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    hidden = torch.randn(len(lengths), t, d, generator=g, dtype=torch.float64)
    hidden[:, :, 0] += 1.5  # a shared direction, so that many pairs are within the margin (as in a trained LM)
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths], dtype=torch.float64)
    return hidden, mask


@pytest.mark.parametrize("margin", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("lengths", [[5, 5, 5], [7, 3, 1, 6], [2, 8]])
def test_contrastive_loss_equals_the_loop_over_pairs(margin, lengths):
    hidden, mask = batch(len(lengths) * 10 + int(margin * 10), lengths)
    total, pairs = reference_contrastive(hidden, lengths, margin)
    assert pairs == pair_count(lengths)
    assert total > 0  # some pairs are inside the margin: the test compares real values
    assert float(contrastive_loss(hidden, mask, margin)) == pytest.approx(total / pairs, rel=1e-12)
    assert float(contrastive_loss(hidden, mask, margin, reduction="sum")) == pytest.approx(total, rel=1e-12)


def test_padding_never_counts():
    lengths = [6, 2, 4]
    hidden, mask = batch(1, lengths)
    before = contrastive_loss(hidden, mask, 0.5)
    changed = hidden.clone()
    for b, n in enumerate(lengths):
        changed[b, n:] = torch.randn_like(changed[b, n:]) * 100  # whatever sits at the padding
    assert torch.equal(contrastive_loss(changed, mask, 0.5), before)
    # a sequence of one real position has no pair: it adds nothing
    hidden1, mask1 = batch(2, [4, 1])
    only4, mask4 = hidden1[:1], mask1[:1]
    assert float(contrastive_loss(hidden1, mask1, 0.5)) == pytest.approx(float(contrastive_loss(only4, mask4, 0.5)))


def test_the_gradient_matches_finite_differences():
    hidden, mask = batch(3, [4, 3], d=4)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: contrastive_loss(h, mask, 0.5), (hidden,))


def test_mle_loss_equals_the_loop_over_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = IGNORE
    labels[2, 1:] = IGNORE
    terms = [-float(torch.log_softmax(logits[b, t], -1)[labels[b, t]])
             for b in range(3) for t in range(5) if labels[b, t] != IGNORE]
    assert float(mle_loss(logits, labels, "sum")) == pytest.approx(sum(terms), rel=1e-6)  # (computed in float32)
    assert float(mle_loss(logits, labels)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    hidden, mask = batch(4, [5, 3, 1])
    mle, cl = simctg_loss(logits, labels, hidden, mask, 0.5)
    assert torch.equal(mle, mle_loss(logits, labels)) and torch.equal(cl, contrastive_loss(hidden, mask, 0.5))


def test_self_similarity_equals_the_loop():
    lengths = [5, 3, 1]
    hidden, mask = batch(5, lengths)
    got = self_similarity(hidden, mask)
    for b, n in enumerate(lengths[:2]):
        want = [cosine(hidden[b, i], hidden[b, j]) for i in range(n) for j in range(n) if i != j]
        assert float(got[b]) == pytest.approx(sum(want) / len(want), rel=1e-12)
    assert math.isnan(float(got[2]))  # one position: no pair


def test_the_toy_world_trains_with_the_same_loss():
    """toyworld.lm_training's SimCTG loss is this module's, value and gradient bit for bit (its
    committed weights were trained with the formula this one keeps, operation for operation)."""
    hidden, mask = batch(6, [5, 4, 2])
    hidden = hidden.float().requires_grad_(True)
    mask = mask.float()
    toy = lm_training.simctg_loss(hidden, mask, 0.5)
    (g_toy,) = torch.autograd.grad(toy, hidden)
    shared = contrastive_loss(hidden, mask, 0.5)
    (g_shared,) = torch.autograd.grad(shared, hidden)
    assert torch.equal(toy, shared) and torch.equal(g_toy, g_shared)
    # and it is the formula: relu(margin - (1 - cos)) over the real, distinct pairs
    h = F.normalize(hidden.detach(), dim=-1)
    sim = h @ h.transpose(1, 2)
    pairs = [(b, i, j) for b, n in enumerate([5, 4, 2]) for i in range(n) for j in range(n) if i != j]
    want = sum(max(0.0, 0.5 - (float(sim[b, i, i]) - float(sim[b, i, j]))) for b, i, j in pairs) / len(pairs)
    assert float(toy.detach()) == pytest.approx(want, rel=1e-5)


def test_bad_reduction():
    hidden, mask = batch(7, [3])
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(hidden, mask, reduction="max")
