"""What a sampling decoder draws from: the LM's logits, tempered, then filtered.

Each function takes logits of shape (..., V) (the last dimension is the vocabulary) and
returns logits of the same shape with the removed tokens set to -inf; :func:`filtered_probs`
turns them back into a distribution (softmax: the kept tokens' probabilities renormalised).
Sampling applies them in transformers' order: temperature first, then one filter.

* :func:`temperature`: logits / t (t < 1 sharpens the distribution, t > 1 flattens it).
* :func:`top_k_filter`: keep the k most probable tokens (Fan et al. 2018).
* :func:`nucleus_filter`: keep the smallest set of most probable tokens holding at least p of
  the probability (Holtzman et al. 2020).
* :func:`typical_filter`: keep the tokens whose surprise -log p(v) is closest to the expected
  surprise (the entropy H), until they hold ``mass`` of the probability (Meister et al. 2023).

Each is exact to its transformers warper (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``TypicalLogitsWarper``, ``min_tokens_to_keep=1``), ties included; where
they differ in a corner (``mass = 1``) the docstring says so.
"""

from __future__ import annotations

import math

import torch

from .errors import MagicEduError
from .inputs import check_float, check_int

REMOVED = float("-inf")


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits / t, for a finite t > 0: softmax(logits / t) is p(v)^(1/t), renormalised."""
    return logits / check_temperature(t)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every token whose logit is at least the k-th largest one.

    Tokens tied with the k-th keep their place, so more than k may be kept; k >= V keeps all.
    """
    k = min(check_int(k, "k", 1), logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, REMOVED)


def nucleus_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probabilities sum to at least p.

    Computed from the least probable token up: sort ascending, and remove tokens while the
    running sum of their probabilities is <= 1 - p (so what is left holds at least p). The most
    probable token always stays. Among tokens of equal logit at the cut, ``torch.sort``'s order
    decides which go (as in transformers). p = 1 removes only tokens of probability 0.
    """
    p = check_unit_interval(p, "p")
    ascending, order = torch.sort(logits, dim=-1)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = mass_below <= 1 - p
    remove[..., -1] = False  # the most probable token
    return logits.masked_fill(remove.scatter(-1, order, remove), REMOVED)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling's filter: with H = -sum_v p(v) log p(v), rank the tokens by
    |-log p(v) - H| (closest to the expected surprise first) and keep them in that order until
    their probabilities sum to at least ``mass``; every token as close as the last one kept
    stays too, and so does the closest one.

    mass = 1 keeps every token: transformers' ``generate(typical_p=1.0)`` leaves the filter out
    (its warper refuses 1).
    """
    mass = check_unit_interval(mass, "mass")
    if mass == 1.0:
        return logits.clone()
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p * log_p.exp()).nansum(dim=-1, keepdim=True)  # 0 * log 0 = nan: left out
    distance, order = torch.sort((-log_p - entropy).abs(), dim=-1)
    running = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (running < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    remove = distance > distance.gather(-1, last)
    remove[..., 0] = False  # the closest token
    return logits.masked_fill(remove.scatter(-1, order, remove), REMOVED)


def filtered_probs(filtered_logits: torch.Tensor) -> torch.Tensor:
    """The distribution a filter leaves: softmax over the kept tokens, 0 for the removed ones."""
    return torch.softmax(filtered_logits, dim=-1)


def check_temperature(t: object) -> float:
    """``t`` as a float if it is finite and > 0, else a MagicEduError naming ``temperature``."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise MagicEduError(f"temperature must be a number > 0 (finite); got {t!r}")
    return float(t)


def check_unit_interval(value: object, name: str) -> float:
    """``value`` as a float in (0, 1], else a MagicEduError naming ``name``."""
    try:
        value = check_float(value, name, 0.0, 1.0)
    except MagicEduError:
        raise MagicEduError(f"{name} must be a number in (0, 1]; got {value!r}") from None
    if value == 0.0:
        raise MagicEduError(f"{name} must be a number in (0, 1]; got 0.0")
    return value
