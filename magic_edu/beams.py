"""Beam search's bookkeeping, one step at a time: which continuations become the next beams,
which end as finished hypotheses, and when the search stops. The LM forward that feeds it is
:class:`magic_edu.decoding.Stepper`'s.

Exact to the beam search of transformers 5.24 (``generate(num_beams=n, do_sample=False,
early_stopping=False, length_penalty=lp)``, its vectorised ``_beam_search``; transformers 4's
``BeamSearchScorer`` decided when to stop slightly differently). With n = num_beams and the
live beams b (at most n), each with the log-probability s_b of its generated tokens:

1. Every beam b and token v is a candidate of score s_b + log p(v | b), in float32 as
   transformers computes it (log-softmax of the float32 logits, float32 sums).
2. The 2n best candidates, best first, are looked at (2n, so that n can go on even if n end).
3. A candidate ends if v is the end-of-text token (with ``stop_at_eos``) or the step is the last
   (``max_new_tokens``). One that ends among the n best becomes a finished hypothesis of score
   s / L ** length_penalty, with L its generated length (end-of-text included); the n best
   finished hypotheses are kept (on a tie the earlier one first).
4. The n best candidates that do not end are the next beams.
5. The search stops when no beam goes on, or when n hypotheses have finished and the best
   beam's s / t ** length_penalty (t = tokens generated so far) is no better than the worst of
   them. (transformers' heuristic for early_stopping=False: it takes the beam's score at its
   current length as the best it can reach, which a positive length penalty can make wrong.)
6. The result is the best finished hypothesis.

Beams are kept as a tree: after step t, beam j is beam ``parents[j]`` of step t - 1 plus
``tokens[j]`` (a :class:`Layer` per step), so a step stores O(n) numbers and going back
forgets the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Layer:
    """The beams after one step: beam j is beam ``parents[j]`` of the step before plus
    ``tokens[j]``, with cumulative log-probability ``log_probs[j]`` (best first)."""

    tokens: list[int]
    parents: list[int]
    log_probs: list[float]  # float32 values


ROOT = Layer(tokens=[], parents=[], log_probs=[0.0])  # before the first step: one beam, the prefix


@dataclass(frozen=True)
class Hypothesis:
    """A finished hypothesis: beam ``parent`` of step ``step - 1`` plus ``token``."""

    score: float  # log_prob / (step + 1) ** length_penalty
    log_prob: float
    step: int
    parent: int
    token: int


@dataclass
class BeamStep:
    """What one step decided. The candidates (the 2n best continuations, best first): their
    ``token_ids``, the beam each extends (``parents``), their cumulative log-probabilities
    (``scores``), the beam each becomes (``next_beam``, -1: none) and the score of each that
    finished (``hypothesis_score``, NaN: did not). Then the beams that go on, the finished
    hypotheses (the n best so far, best first) and whether the search stops."""

    token_ids: list[int]
    parents: list[int]
    scores: list[float]
    next_beam: list[int]
    hypothesis_score: list[float]
    layer: Layer
    finished: list[Hypothesis] = field(default_factory=list)
    stop: bool = False


def select(log_p: torch.Tensor, beams: Layer, num_beams: int, step: int, last: bool, eos: int | None,
           length_penalty: float, finished: list[Hypothesis]) -> BeamStep:
    """One step of beam search: ``log_p`` (m, V) float32 holds log p(v | beam) for the m live
    ``beams``; ``step`` counts the tokens generated before it; ``last``: it is the last step;
    ``eos``: the token that ends a hypothesis (None: only the length does)."""
    n, vocab = num_beams, log_p.shape[-1]
    scores = torch.tensor(beams.log_probs, dtype=torch.float32)[:, None] + log_p  # (m, V)
    top, index = scores.flatten().topk(min(2 * n, scores.numel()))  # best first
    parents, tokens = (index // vocab).tolist(), (index % vocab).tolist()
    length = step + 1  # of a hypothesis that ends now, end-of-text included
    norm = length_norm(length, length_penalty)
    hypothesis = (top / norm).tolist()  # float32, as transformers divides

    nan = float("nan")
    next_beam, hypothesis_score, new = [-1] * len(tokens), [nan] * len(tokens), []
    kept = Layer([], [], [])
    for i, (parent, token, score) in enumerate(zip(parents, tokens, top.tolist())):
        if last or token == eos:
            if i < n:  # only the n best may end
                hypothesis_score[i] = hypothesis[i]
                new.append(Hypothesis(hypothesis[i], score, step, parent, token))
        elif len(kept.tokens) < n:
            next_beam[i] = len(kept.tokens)
            kept.tokens.append(token)
            kept.parents.append(parent)
            kept.log_probs.append(score)
    finished = sorted(finished + new, key=lambda h: -h.score)[:n]  # stable: an earlier one first on a tie

    stop = not kept.tokens
    if not stop and len(finished) == n:  # can the best beam still beat the worst finished hypothesis?
        best = (torch.tensor(kept.log_probs[0], dtype=torch.float32) / norm).item()
        stop = not best > finished[-1].score
    return BeamStep(tokens, parents, top.tolist(), next_beam, hypothesis_score, kept, finished, stop)


def length_norm(length: int, length_penalty: float) -> float:
    """length ** length_penalty, the divisor of a score (inf where a huge penalty overflows a float;
    transformers raises OverflowError there)."""
    try:
        return length**length_penalty
    except OverflowError:
        return math.inf


def ancestry(layers: list[Layer], beam: int) -> list[int]:
    """Which beam of every step beam ``beam`` of the last layer passed through (its own index last)."""
    path = []
    for layer in reversed(layers):
        path.append(beam)
        beam = layer.parents[beam]
    return path[::-1]


def beam_tokens(layers: list[Layer], beam: int) -> list[int]:
    """The generated ids of beam ``beam`` of the last layer."""
    return [layer.tokens[b] for layer, b in zip(layers, ancestry(layers, beam))]


def hypothesis_tokens(layers: list[Layer], hypothesis: Hypothesis) -> list[int]:
    """The generated ids of a finished hypothesis (its end-of-text token included)."""
    before = layers[: hypothesis.step]
    return (beam_tokens(before, hypothesis.parent) if before else []) + [hypothesis.token]
