"""SimCTG's training objective (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"): maximum likelihood plus a token-level contrastive loss, one implementation for
``magic-edu adapt-lm`` (:mod:`magic_edu.training.adapt`) and the toy world's LM
(:mod:`magic_edu.toyworld.lm_training`).

For a sequence x of |x| positions with last-layer hidden states h_1 .. h_|x| (after the final
layer norm, the ``h`` of the degeneration penalty) and s the cosine similarity:

    L_CL(x) = sum_i sum_{j != i} max(0, rho - s(h_i, h_i) + s(h_i, h_j))
    L_SimCTG = L_MLE + L_CL / (number of pairs)

with margin rho = 0.5 in the paper. Pairs are ordered pairs (i, j) of distinct real positions of
one sequence (padding excluded); the loss is averaged over every such pair of the batch, as in
the authors' code (yxuansu/MAGIC, ``image_captioning/language_model/loss_func.py``:
``contrastive_loss`` with the mask of ``build_mask_matrix``; the hidden states and the MLE term
come from ``simctg.py``, ``SimCTG.forward``). s(h_i, h_i) is 1 up to rounding; it stays in the
formula as the authors write it.

The contrastive loss pushes a sequence's token representations apart (by at least the margin
in cosine), which makes them isotropic: :func:`self_similarity` measures it (the SimCTG paper's
"self-similarity", lower is more isotropic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position with no target (padding), as transformers' loss uses it


def contrastive_loss(hidden: torch.Tensor, mask: torch.Tensor, margin: float = 0.5,
                     reduction: str = "mean") -> torch.Tensor:
    """SimCTG's token-level contrastive loss.

    ``hidden``: (B, T, d) last-layer hidden states; ``mask``: (B, T), 1 at real positions and 0
    at padding. For every ordered pair (i, j), i != j, of real positions of one sequence:
    max(0, margin - (s(h_i, h_i) - s(h_i, h_j))), s the cosine. ``reduction="mean"``: averaged over
    those pairs (the authors' loss); ``"sum"``: their sum (divide by :func:`pair_count` of a larger
    batch to average over it).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    mask = mask.to(hidden.dtype)
    h = F.normalize(hidden, dim=-1)
    sim = h @ h.transpose(1, 2)  # (B, T, T): s(h_i, h_j)
    gold = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # s(h_i, h_i)
    loss = F.relu(margin - (gold - sim))
    pair_mask = mask.unsqueeze(1) * mask.unsqueeze(2)  # both positions real ...
    pair_mask = pair_mask * (1 - torch.eye(sim.shape[1], device=sim.device)).unsqueeze(0)  # ... and distinct
    total = (loss * pair_mask).sum()
    if reduction == "sum":
        return total
    return total / pair_mask.sum().clamp(min=1)


def pair_count(lengths: torch.Tensor | list[int]) -> int:
    """The number of ordered pairs of distinct positions in sequences of these lengths: sum n (n - 1)."""
    return int(sum(int(n) * (int(n) - 1) for n in lengths))


def mle_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T), positions labelled
    :data:`IGNORE` left out: the mean over the others (``"mean"``) or their sum (``"sum"``).
    The labels are the next tokens (already shifted: ``labels[:, t]`` is the token after position t)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def simctg_loss(logits: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                margin: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_MLE, L_CL) of one batch, each a mean (see the module docstring); SimCTG trains on their sum."""
    return mle_loss(logits, labels), contrastive_loss(hidden, mask, margin)


@torch.no_grad()
def self_similarity(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean cosine between the hidden states of its distinct real positions,
    (B,): 1 / (n (n - 1)) sum_i sum_{j != i} s(h_i, h_j) (the SimCTG paper's self-similarity; a
    sequence with fewer than two real positions gets NaN). Lower means more isotropic."""
    mask = mask.to(torch.float64)
    h = F.normalize(hidden.double(), dim=-1)
    sim = h @ h.transpose(1, 2)
    pair_mask = mask.unsqueeze(1) * mask.unsqueeze(2) * (1 - torch.eye(sim.shape[1], dtype=torch.float64,
                                                                       device=sim.device)).unsqueeze(0)
    pairs = pair_mask.sum(dim=(1, 2))
    return (sim * pair_mask).sum(dim=(1, 2)) / pairs.where(pairs > 0, torch.nan)
