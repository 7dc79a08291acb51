"""ZeroCap (Tewel et al. 2022, "ZeroCap: Zero-Shot Image-to-Text Generation for Visual-Semantic
Arithmetic"), the MAGIC paper's main baseline: at every step, nudge the LM's keys and values
with gradient steps so that its next-token distribution agrees with CLIP, then fuse.

This follows the public implementation the MAGIC paper ran (yxuansu/MAGIC,
image_captioning/zerocap/model/ZeroCLIP.py). One step, for every live beam (row):

1. context = the LM's keys and values of every id but the last; p0 = the LM's next-token
   distribution (no steering).
2. Context shift: delta starts at zero; num_iterations times: p = the LM's distribution for
   the last id read on context + delta, and

       loss = clip_scale * CLIP loss + ce_scale * sum_v p(v) (log p(v) - log p0(v))   (a KL)
       CLIP loss = - sum_v target(v) log p(v),
       target = softmax over the n most probable v of p of cos(I, CLIP_text(text + v)) / T,
                0 elsewhere (no gradient through it; n = ``candidates``, T = ``clip_temperature``)

   and every layer's keys and values tensor of the row takes a normalised gradient step
   delta <- delta - stepsize * g / (||g|| + 1e-15) ** grad_norm_factor.
3. The last id read on context + delta gives the steered logits; special tokens are
   adjusted (:func:`special_token_logits`); p_shift is their softmax.
4. Fusion: q(v) = p_shift(v) ** fusion_factor * p0(v) ** (1 - fusion_factor), normalised.

Beam search (ZeroCLIP's ``generate_text``): a beam's score is the sum of its log q; the
candidates of all beams are ranked by score / length; a finished beam (it took the end
token) stays as it is at no cost; the search stops when every beam has finished or after
``max_new_tokens`` steps. The result is the beam of best score / length.

Differences from the public code, by design:

* The prefix is the library's (``lm.prompt_format``, e.g. ``<-start_of_text->`` + prompt)
  rather than GPT-2's BOS + "Image of a"; the default prompt is still "Image of a". CLIP
  reads the prefix and generated ids without the leading start tokens (as the public code
  removes BOS) plus the candidate, decoded together (public: each token's string appended to
  the decoded prefix, the same text for GPT-2's tokenizer but words run together for one that
  joins words with spaces), cut at the first EOS string (so the EOS candidate reads "stop
  here"; a prompt format with EOS in it, the story LM's, would leave CLIP the part before it).
* The end token is the LM's EOS (public: "."); with ``stop_at_eos=False`` no beam finishes.
* Forbidden tokens are an optional list (public: a forbidden_tokens.npy made for GPT-2's
  vocabulary; there is none for other vocabularies, so by default nothing is forbidden).
* CLIP scores min(candidates, vocabulary size) tokens (public: 512; the toy LM has fewer).
* q is normalised per beam (the public code divides by the sum over the whole beam batch,
  which only matters with more than one beam); log p is a log-softmax.
* A beam with no context (a prefix of one id) is not steered (the public code fails there).
* Finished beams are not run through the LM again (their result would be thrown away).
* p0 is the last id read on the context's cache (public: a second forward of every id;
  the same numbers up to rounding).
* Left out as unused there: ``reset_context_delta`` (always True: delta restarts at every
  step), the per-beam ``tmp_weights`` (computed, never applied), the all-ones window mask.

A decoder like the others: its parameters are in :mod:`magic_edu.registry` (``"zerocap"``),
:class:`~magic_edu.decoding.Stepper` steps through it (:func:`search_step`, one step of the
search, and its trace columns) and :func:`~magic_edu.decoding.zerocap_search` runs it.

Cost (:mod:`magic_edu.costs`): per live beam and step, the context forward, one forward of the
last id for p0, num_iterations forwards and backwards (``lm_backwards`` counts rows, as
``lm_forwards`` does) and one steered forward; CLIP embeds n texts per beam and iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .fast.candidate_texts import CandidateTexts
from .models import ImageTextMatcher, KeysValues, LanguageModel
from .registry import DECODERS

PROMPT = "Image of a"  # ZeroCap's cond_text
START_FACTOR = 1.6  # ZeroCLIP.py: at the first step the end token is damped by this
NORM_EPS = 1e-15  # added to a gradient's norm before the power
RECENT = 4  # the repetition penalty looks at this many last ids
TRACE_TOP = 10  # candidates per beam shown in a step's record

PARAMS = DECODERS["zerocap"].params  # described once, in the registry
_DEFAULTS = {p.name: p.default for p in PARAMS}


@dataclass(frozen=True)
class ZeroCapSettings:
    """ZeroCap's settings, as the step functions read them; their defaults and ranges are the
    registry's (:data:`PARAMS`: ZeroCLIP.py's defaults and, for num_beams, the MAGIC paper's
    baseline script's)."""

    num_iterations: int = _DEFAULTS["num_iterations"]
    stepsize: float = _DEFAULTS["stepsize"]
    grad_norm_factor: float = _DEFAULTS["grad_norm_factor"]
    ce_scale: float = _DEFAULTS["ce_scale"]
    clip_scale: float = _DEFAULTS["clip_scale"]
    clip_temperature: float = _DEFAULTS["clip_temperature"]
    fusion_factor: float = _DEFAULTS["fusion_factor"]
    end_factor: float = _DEFAULTS["end_factor"]
    forbidden_factor: float = _DEFAULTS["forbidden_factor"]
    repetition_penalty: float = _DEFAULTS["repetition_penalty"]
    candidates: int = _DEFAULTS["candidates"]
    num_beams: int = _DEFAULTS["num_beams"]

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> ZeroCapSettings:
        """The settings among ``params`` (checked already, e.g. a Stepper's), the rest ignored."""
        return cls(**{name: params[name] for name in cls.__dataclass_fields__})


# -- one step, piece by piece -----------------------------------------------------------------
def special_token_logits(
    logits: torch.Tensor, step: int, recent: Sequence[Sequence[int]], end_token: int, s: ZeroCapSettings,
    forbidden: Sequence[int] = (),
) -> torch.Tensor:
    """ZeroCLIP's ``update_special_tokens_logits`` on (B, V) logits (a new tensor). With
    damp(l, f) = l / f if l > 0 else l * f, in this order: each of a row's last 4 ids (prompt
    included) is damped by repetition_penalty; the end token is damped by 1 / end_factor
    from step 1 on and by 1.6 at step 0; every forbidden token is damped by forbidden_factor."""
    out = logits.clone()
    for row, ids in enumerate(recent):
        for token in set(list(ids)[-RECENT:]):
            out[row, token] = _damp(out[row, token], s.repetition_penalty)
    out[:, end_token] = _damp(out[:, end_token], 1.0 / s.end_factor if step >= 1 else START_FACTOR)
    for token in forbidden:
        out[:, token] = _damp(out[:, token], s.forbidden_factor)
    return out


def _damp(logit: torch.Tensor, factor: float) -> torch.Tensor:
    """logit / factor where it is positive, logit * factor elsewhere."""
    return torch.where(logit > 0, logit / factor, logit * factor)


def fuse(log_p_shift: torch.Tensor, log_p0: torch.Tensor, fusion_factor: float) -> torch.Tensor:
    """log q with q = p_shift ** f * p0 ** (1 - f) normalised over each row's vocabulary."""
    return torch.log_softmax(fusion_factor * log_p_shift + (1.0 - fusion_factor) * log_p0, dim=-1)


@torch.no_grad()
def clip_target(
    p: torch.Tensor, rows: Sequence[Sequence[int]], lm: LanguageModel, clip: ImageTextMatcher,
    image_embedding: torch.Tensor, candidates: int, temperature: float,
) -> torch.Tensor:
    """CLIP's target distribution (B, V) float64 for next-token probabilities ``p`` (B, V):
    softmax over the n = min(candidates, V) most probable tokens v of row b of
    cos(I, CLIP_text(text of rows[b] + [v])) / temperature, 0 for every other token. ``rows``:
    the ids CLIP reads (:func:`clip_ids`); a text is cut at the LM's EOS string. The texts are
    the ids decoded (:class:`~magic_edu.fast.candidate_texts.CandidateTexts`, as MAGIC's): the
    public code appends each token's decoded string to the decoded prefix, the same text for
    GPT-2's byte-level BPE, but "a large" + "green" = "a largegreen" for a tokenizer that joins
    words with spaces (the toy LM's)."""
    n = min(candidates, p.shape[-1])
    top = p.topk(n, dim=-1).indices  # (B, n)
    groups = CandidateTexts(lm)(rows, top.tolist())
    # remember=False: every call encodes its texts afresh, so a step rounds the same whatever came
    # before it (Back and a step again replay it bit for bit)
    text_emb = clip.embed_text_groups(groups, remember=False).double()  # (B, n, d), L2-normalised
    cosines = text_emb @ image_embedding.to(text_emb.device, torch.float64)
    target = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
    return target.scatter_(1, top.to(p.device), torch.softmax(cosines / temperature, dim=-1).to(p.device))


def steering_loss(log_p: torch.Tensor, log_p0: torch.Tensor, target: torch.Tensor, s: ZeroCapSettings
                  ) -> torch.Tensor:
    """Per row: clip_scale * (- sum_v target log p) + ce_scale * sum_v p (log p - log p0)."""
    clip_loss = -(target * log_p).sum(-1)
    fluency = (log_p.exp() * (log_p - log_p0)).sum(-1)
    return s.clip_scale * clip_loss + s.ce_scale * fluency


def normalised_step(grad: torch.Tensor, stepsize: float, grad_norm_factor: float) -> torch.Tensor:
    """-stepsize * g / (||g|| + 1e-15) ** grad_norm_factor, the norm taken over each row's
    slice g[b] of one layer's keys (or values) gradient."""
    norm = grad.flatten(1).norm(dim=1) + NORM_EPS
    return -stepsize * grad / (norm ** grad_norm_factor).view(-1, *[1] * (grad.dim() - 1))


def shift_context(
    lm: LanguageModel, context: KeysValues, last: torch.Tensor, log_p0: torch.Tensor,
    target_of: Callable[[torch.Tensor], torch.Tensor], s: ZeroCapSettings,
) -> tuple[KeysValues, list[torch.Tensor], list[torch.Tensor]]:
    """ZeroCLIP's ``shift_context``: num_iterations normalised gradient steps on delta (one per
    layer's keys and values, starting at zero) of the summed :func:`steering_loss` of the rows.
    ``last`` (B, 1): the last ids; ``target_of(p)``: CLIP's target for (B, V) probabilities.
    Returns (delta, log p at the start of every iteration, the targets used); the LM's weights
    get no gradient."""
    delta = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in context]
    log_ps, targets = [], []
    mask = torch.ones(last.shape[0], context[0][0].shape[2] + 1, dtype=torch.long, device=last.device)
    for _ in range(s.num_iterations):
        leaves = [t.clone().requires_grad_(True) for pair in delta for t in pair]
        shifted = [(k + leaves[2 * i], v + leaves[2 * i + 1]) for i, (k, v) in enumerate(context)]
        with torch.enable_grad():
            logits = lm._forward(last, shifted, mask)[0][:, -1]
            log_p = torch.log_softmax(logits.double(), dim=-1)
            target = target_of(log_p.detach().exp())
            loss = steering_loss(log_p, log_p0, target, s).sum()
            grads = torch.autograd.grad(loss, leaves)  # only delta's gradient: the weights' .grad stays unset
        lm.cost.lm_backwards += int(last.shape[0])
        steps = [normalised_step(g, s.stepsize, s.grad_norm_factor) for g in grads]
        delta = [(dk + steps[2 * i], dv + steps[2 * i + 1]) for i, (dk, dv) in enumerate(delta)]
        log_ps.append(log_p.detach())
        targets.append(target)
    return delta, log_ps, targets


@dataclass
class StepMath:
    """What one ZeroCap step computed for B rows, each (B, V) float64: log p0, log p at the start
    of every iteration and after the last (num_iterations + 1), CLIP's target of every
    iteration, log p_shift (special tokens adjusted) and log q (fused)."""

    log_p0: torch.Tensor
    log_p_steered: list[torch.Tensor]
    targets: list[torch.Tensor]
    log_p_shift: torch.Tensor
    log_q: torch.Tensor


def zerocap_step(
    lm: LanguageModel, clip: ImageTextMatcher, image_embedding: torch.Tensor, rows: Sequence[Sequence[int]],
    step: int, s: ZeroCapSettings, end_token: int, forbidden: Sequence[int] = (),
) -> StepMath:
    """One ZeroCap step (module docstring, 1-4) for rows of ids of equal length (prefix and
    generated ids), ``step`` counting the generated ids."""
    ids = torch.tensor([list(r) for r in rows], device=lm.device)
    read = [clip_ids(lm, r) for r in rows]
    last = ids[:, -1:]
    if ids.shape[1] > 1:
        context = lm.forward(ids[:, :-1])[2]
        log_p0 = torch.log_softmax(lm.forward(last, cache=context)[0][:, -1].double(), dim=-1)
        delta, log_ps, targets = shift_context(
            lm, context, last, log_p0,
            lambda p: clip_target(p, read, lm, clip, image_embedding, s.candidates, s.clip_temperature), s)
        shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(context, delta)]
        logits = lm.forward(last, cache=shifted)[0][:, -1].double()
    else:  # no context to shift
        logits = lm.forward(ids)[0][:, -1].double()
        log_p0, log_ps, targets = torch.log_softmax(logits, dim=-1), [], []
    log_ps.append(torch.log_softmax(logits, dim=-1))
    log_p_shift = torch.log_softmax(special_token_logits(logits, step, rows, end_token, s, forbidden), dim=-1)
    return StepMath(log_p0, log_ps, targets, log_p_shift, fuse(log_p_shift, log_p0, s.fusion_factor))


def clip_ids(lm: LanguageModel, ids: Sequence[int]) -> list[int]:
    """The ids whose text CLIP reads before a candidate: ``ids`` without its leading start tokens
    (the public code removes the BOS string from the decoded text)."""
    start = 0
    while start < len(ids) and ids[start] == lm.sos_token_id:
        start += 1
    return list(ids[start:])


# -- the search -------------------------------------------------------------------------------
@dataclass
class Beam:
    """A hypothesis: its generated ids, summed log q, length (ZeroCLIP counts the first id as 1
    and stops counting once the beam has finished) and whether it has taken the end token."""

    ids: list[int]
    score: float
    length: int
    finished: bool = False


def select_beams(beams: list[Beam], log_q: torch.Tensor, num_beams: int, end_token: int | None) -> list[Beam]:
    """ZeroCLIP's beam update. ``log_q`` (L, V) holds log q for the L live beams, in order; a
    beam that takes ``end_token`` finishes (None: none does).
    Before the first step (``beams`` empty) the num_beams best tokens of one row start the
    beams. Later, every (beam, token) of a live beam scores (score + log q) / (length + 1), a
    finished beam is one candidate of unchanged score and length, and the num_beams best
    candidates go on. (A score is kept as a sum; ZeroCLIP multiplies the average back, which
    rounds differently.)"""
    log_q = log_q.double().cpu()
    if not beams:
        top = log_q[0].topk(num_beams)
        return [Beam([t], s, 1, t == end_token) for s, t in zip(top.values.tolist(), top.indices.tolist())]
    vocab = log_q.shape[-1]
    sums = torch.full((len(beams), vocab), -torch.inf, dtype=torch.float64)
    lengths = torch.tensor([b.length + (not b.finished) for b in beams], dtype=torch.float64)
    live = 0
    for j, b in enumerate(beams):
        if b.finished:
            sums[j, 0] = b.score  # ZeroCLIP pads with id 0; here that only marks "stays as it is"
        else:
            sums[j] = b.score + log_q[live]
            live += 1
    top = (sums / lengths[:, None]).flatten().topk(num_beams).indices.tolist()
    out = []
    for index in top:
        j, token = divmod(index, vocab)
        b = beams[j]
        if b.finished:
            out.append(Beam(list(b.ids), b.score, b.length, True))
        else:
            out.append(Beam(b.ids + [token], float(sums[j, token]), b.length + 1, token == end_token))
    return out


@dataclass
class SearchStep:
    """One step of the search: the beams after it (best first by score / length) and, for the
    trace, the shown candidates of every live beam, flattened (each a list, one entry per
    candidate): ``token_ids``; ``p0`` (no steering), ``p`` (after the last iteration),
    ``target`` (CLIP's target in the last iteration; NaN where nothing was steered), ``q``
    (fused); ``score`` = (beam's summed log q + log q(v)) / (its length + 1), what the beams are
    ranked by; ``beam``: the index of the beam it extends among the beams before the step;
    ``next_beam``: the beam it became (-1: none); ``chosen``: the candidate that became beam 0
    (0 if beam 0 is a finished beam kept as it was). ``iteration_p`` / ``iteration_target``:
    [iteration][candidate] p at the start of every iteration and the target it was pulled to.
    ``kept_beam``: for every beam after the step, the index before the step of the finished beam
    it is (kept as it was), or -1 for a beam extended by one of the step's candidates."""

    beams: list[Beam]
    token_ids: list[int]
    p0: list[float]
    p: list[float]
    target: list[float]
    q: list[float]
    score: list[float]
    beam: list[int]
    next_beam: list[int]
    chosen: int
    iteration_p: list[list[float]]
    iteration_target: list[list[float]]
    kept_beam: list[int]


def search_step(
    lm: LanguageModel, clip: ImageTextMatcher, image_embedding: torch.Tensor, prefix: Sequence[int],
    beams: list[Beam], step: int, s: ZeroCapSettings, end_token: int | None, forbidden: Sequence[int] = (),
) -> SearchStep:
    """Advance the search one step: :func:`zerocap_step` on the live beams (before the first
    step, ``beams`` is empty: one row, the prefix), then :func:`select_beams`. ``end_token``:
    the token that finishes a beam (None: only the length ends the search); the LM's EOS is
    damped as ZeroCLIP's end token either way."""
    before = beams or [Beam([], 0.0, 0)]
    live = [j for j, b in enumerate(before) if not b.finished]
    computed = zerocap_step(lm, clip, image_embedding, [list(prefix) + before[j].ids for j in live], step, s,
                        lm.eos_token_id, forbidden)
    after = select_beams(beams, computed.log_q, s.num_beams, end_token)
    shown = min(max(TRACE_TOP, s.num_beams), computed.log_q.shape[-1])
    top = computed.log_q.topk(shown, dim=-1).indices.cpu()  # (L, shown): each live beam's best by q

    def column(t: torch.Tensor) -> list[float]:  # (L, V) -> the shown candidates, flattened
        return t.detach().cpu().double().gather(1, top).flatten().tolist()

    became = {tuple(b.ids): i for i, b in enumerate(after) if len(b.ids) == step + 1}
    token_ids, beam, next_beam, score = [], [], [], []
    log_q = computed.log_q.cpu().double().gather(1, top)
    for row, j in enumerate(live):
        b = before[j]
        for token, lq in zip(top[row].tolist(), log_q[row].tolist()):
            token_ids.append(token)
            beam.append(j)
            next_beam.append(became.get((*b.ids, token), -1))
            score.append((b.score + lq) / (b.length + 1))
    finished_before = {tuple(b.ids): j for j, b in enumerate(before) if b.finished}
    kept_beam = [-1 if len(b.ids) == step + 1 else finished_before[tuple(b.ids)] for b in after]
    nan = torch.full_like(computed.log_p0, float("nan"))
    return SearchStep(
        after, token_ids, column(computed.log_p0.exp()), column(computed.log_p_steered[-1].exp()),
        column(computed.targets[-1] if computed.targets else nan), column(computed.log_q.exp()), score, beam, next_beam,
        next_beam.index(0) if 0 in next_beam else 0,
        [column(lp.exp()) for lp in computed.log_p_steered[:-1]], [column(t) for t in computed.targets], kept_beam)
