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
  reads the prefix and generated text with the start token removed (as the public code
  removes BOS), cut at the first EOS string (so the EOS candidate reads "stop here"; a
  prompt format with EOS in it, the story LM's, would leave CLIP the part before it).
* The end token is the LM's EOS unless ``end_token`` says otherwise (public: ".").
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

Not in the decoder registry (:mod:`magic_edu.registry`) yet: call :func:`zerocap_search`.

Cost (:mod:`magic_edu.costs`): per live beam and step, the context forward, one forward of the
last id for p0, num_iterations forwards and backwards (``lm_backwards`` counts rows, as
``lm_forwards`` does) and one steered forward; CLIP embeds n texts per beam and iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .costs import Cost
from .errors import MagicEduError
from .inputs import ImageLike, check_int
from .models import ImageTextMatcher, KeysValues, LanguageModel
from .registry import MAX_NEW_TOKENS, Param

PROMPT = "Image of a"  # ZeroCap's cond_text
START_FACTOR = 1.6  # ZeroCLIP.py: at the first step the end token is damped by this
NORM_EPS = 1e-15  # added to a gradient's norm before the power
RECENT = 4  # the repetition penalty looks at this many last ids
TRACE_TOP = 10  # candidates per beam shown in a step's record

PARAMS: tuple[Param, ...] = (
    Param("num_iterations", int, 5, 0, None, "gradient steps on the keys and values per token", (0, 10, 1)),
    Param("stepsize", float, 0.3, 0.0, None, "size of a normalised gradient step", (0.0, 1.0, 0.05)),
    Param("grad_norm_factor", float, 0.9, 0.0, None, "a step is g / ||g|| ** grad_norm_factor", (0.0, 1.0, 0.05)),
    Param("ce_scale", float, 0.2, 0.0, None, "weight of the fluency loss KL(p || p0)", (0.0, 2.0, 0.05)),
    Param("clip_scale", float, 1.0, 0.0, None, "weight of the CLIP loss", (0.0, 5.0, 0.1)),
    Param("clip_temperature", float, 0.01, 0.0, None, "CLIP's target is softmax(cos / clip_temperature)",
          (0.005, 0.1, 0.005), low_open=True),
    Param("fusion_factor", float, 0.99, 0.0, 1.0, "q = p_shift ** fusion_factor * p0 ** (1 - fusion_factor)",
          (0.0, 1.0, 0.01)),
    Param("end_factor", float, 1.01, 0.0, None, "the end token's logit is multiplied by this (> 0 logit)",
          (0.5, 2.0, 0.01), low_open=True),
    Param("forbidden_factor", float, 20.0, 0.0, None, "forbidden tokens' logits are divided by this (> 0 logit)",
          (1.0, 50.0, 1.0), low_open=True),
    Param("repetition_penalty", float, 1.0, 0.0, None, "the last 4 ids' logits are divided by this (1: off)",
          (1.0, 3.0, 0.1), low_open=True),
    Param("candidates", int, 512, 1, None, "tokens CLIP scores per beam and iteration (at most the vocabulary)",
          (1, 512, 1)),
    Param("num_beams", int, 1, 1, "vocab", "beams (MAGIC's baseline runs 1; ZeroCap's default 5)", (1, 10, 1)),
)


@dataclass(frozen=True)
class ZeroCapSettings:
    """ZeroCap's settings (:data:`PARAMS`: defaults and ranges; the defaults are ZeroCLIP.py's
    and, for num_beams, the MAGIC paper's baseline script's)."""

    num_iterations: int = 5
    stepsize: float = 0.3
    grad_norm_factor: float = 0.9
    ce_scale: float = 0.2
    clip_scale: float = 1.0
    clip_temperature: float = 0.01
    fusion_factor: float = 0.99
    end_factor: float = 1.01
    forbidden_factor: float = 20.0
    repetition_penalty: float = 1.0
    candidates: int = 512
    num_beams: int = 1

    @classmethod
    def checked(cls, vocab_size: int, **given: Any) -> ZeroCapSettings:
        """The settings with ``given`` values (None: the default) checked against their ranges."""
        names = [p.name for p in PARAMS]
        unknown = [name for name in given if name not in names]
        if unknown:
            raise MagicEduError(f"{unknown[0]}: ZeroCap has no such parameter; its parameters are {', '.join(names)}")
        return cls(**{p.name: p.check(p.default if given.get(p.name) is None else given[p.name], vocab_size)
                      for p in PARAMS})


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
    p: torch.Tensor, texts: Sequence[str], lm: LanguageModel, clip: ImageTextMatcher,
    image_embedding: torch.Tensor, candidates: int, temperature: float,
) -> torch.Tensor:
    """CLIP's target distribution (B, V) float64 for next-token probabilities ``p`` (B, V):
    softmax over the n = min(candidates, V) most probable tokens v of row b of
    cos(I, CLIP_text(texts[b] + v)) / temperature, 0 for every other token. The text is cut
    at the LM's EOS string."""
    n = min(candidates, p.shape[-1])
    top = p.topk(n, dim=-1).indices  # (B, n)
    groups = [[(text + lm.token_text(v)).split(lm.eos_token, 1)[0] for v in row]
              for text, row in zip(texts, top.tolist())]
    text_emb = clip.embed_text_groups(groups).double()  # (B, n, d), L2-normalised
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
    texts = [_clip_prefix_text(lm, r) for r in rows]
    last = ids[:, -1:]
    if ids.shape[1] > 1:
        context = lm.forward(ids[:, :-1])[2]
        log_p0 = torch.log_softmax(lm.forward(last, cache=context)[0][:, -1].double(), dim=-1)
        delta, log_ps, targets = shift_context(
            lm, context, last, log_p0,
            lambda p: clip_target(p, texts, lm, clip, image_embedding, s.candidates, s.clip_temperature), s)
        shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(context, delta)]
        logits = lm.forward(last, cache=shifted)[0][:, -1].double()
    else:  # no context to shift
        logits = lm.forward(ids)[0][:, -1].double()
        log_p0, log_ps, targets = torch.log_softmax(logits, dim=-1), [], []
    log_ps.append(torch.log_softmax(logits, dim=-1))
    log_p_shift = torch.log_softmax(special_token_logits(logits, step, rows, end_token, s, forbidden), dim=-1)
    return StepMath(log_p0, log_ps, targets, log_p_shift, fuse(log_p_shift, log_p0, s.fusion_factor))


def _clip_prefix_text(lm: LanguageModel, ids: Sequence[int]) -> str:
    """The text CLIP reads before a candidate: the ids decoded, start token removed."""
    text = lm.decode(ids)
    return text.replace(lm.sos_token, "") if lm.sos_token else text


# -- the search -------------------------------------------------------------------------------
@dataclass
class Beam:
    """A hypothesis: its generated ids, summed log q, length (ZeroCLIP counts the first id as 1
    and stops counting once the beam has finished) and whether it has taken the end token."""

    ids: list[int]
    score: float
    length: int
    finished: bool = False


@dataclass
class ZeroCapStepRecord:
    """One step, for every live beam (the beams that had not finished): its ids before the
    step, and for its TRACE_TOP best candidates by q: their ids, p0, p at the start of every
    iteration and after the last, CLIP's target of every iteration, p_shift and q. Then the
    beams after the step and the step's cost."""

    step: int
    beam_ids: list[list[int]]
    token_ids: list[list[int]]
    p0: list[list[float]]
    p_steered: list[list[list[float]]]  # [beam][iteration][candidate]
    clip_target: list[list[list[float]]]
    p_shift: list[list[float]]
    q: list[list[float]]
    beams: list[Beam]
    cost: Cost = field(default_factory=Cost)


@dataclass
class ZeroCapResult:
    """ZeroCap's output: ``text`` (the library's output parser), the generated ids, the final
    beams best first (by score / length), every step's record, the settings and the setup's
    cost (the image's embedding)."""

    text: str
    token_ids: list[int]
    beams: list[Beam]
    steps: list[ZeroCapStepRecord]
    settings: ZeroCapSettings
    setup_cost: Cost


def select_beams(beams: list[Beam], log_q: torch.Tensor, num_beams: int, end_token: int) -> list[Beam]:
    """ZeroCLIP's beam update. ``log_q`` (L, V) holds log q for the L live beams, in order.
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


def zerocap_search(
    lm: LanguageModel, clip: ImageTextMatcher, image: ImageLike, *, prompt: str | None = PROMPT,
    num_iterations: int | None = None, stepsize: float | None = None, grad_norm_factor: float | None = None,
    ce_scale: float | None = None, clip_scale: float | None = None, clip_temperature: float | None = None,
    fusion_factor: float | None = None, end_factor: float | None = None, forbidden_factor: float | None = None,
    repetition_penalty: float | None = None, candidates: int | None = None, num_beams: int | None = None,
    end_token: int | None = None, forbidden_tokens: Sequence[int] = (), max_new_tokens: int | None = None,
) -> ZeroCapResult:
    """Caption ``image`` with ZeroCap (module docstring); None takes ZeroCLIP.py's default
    (:data:`PARAMS`), max_new_tokens 16 (the MSCOCO script's target_seq_length), the end token
    the LM's EOS. Slow by nature: every token costs num_iterations forward and backward passes
    and num_iterations x candidates CLIP texts per beam."""
    s = ZeroCapSettings.checked(lm.vocab_size, num_iterations=num_iterations, stepsize=stepsize,
                                grad_norm_factor=grad_norm_factor, ce_scale=ce_scale, clip_scale=clip_scale,
                                clip_temperature=clip_temperature, fusion_factor=fusion_factor,
                                end_factor=end_factor, forbidden_factor=forbidden_factor,
                                repetition_penalty=repetition_penalty, candidates=candidates, num_beams=num_beams)
    top_id = lm.vocab_size - 1
    end = lm.eos_token_id if end_token is None else check_int(end_token, "end_token", 0, top_id)
    forbidden = [check_int(t, "forbidden_tokens", 0, top_id) for t in forbidden_tokens]
    if isinstance(image, (list, tuple)):
        raise MagicEduError(f"image: ZeroCap captions one image at a time; got a {type(image).__name__} of "
                            f"{len(image)}")
    prefix = lm.prefix_ids(prompt)
    n_new = MAX_NEW_TOKENS.check(MAX_NEW_TOKENS.default if max_new_tokens is None else max_new_tokens)
    if len(prefix) + n_new > lm.context_length:
        raise MagicEduError(f"max_new_tokens must be at most {lm.context_length - len(prefix)} for this prompt "
                            f"and model; got {n_new}")

    before, started = lm.cost + clip.cost, time.perf_counter()
    image_embedding = clip.embed_image(image)
    setup = _since(lm, clip, before, started)
    beams: list[Beam] = []
    records: list[ZeroCapStepRecord] = []
    for step in range(n_new):
        before, started = lm.cost + clip.cost, time.perf_counter()
        live = [b for b in beams if not b.finished] if beams else [Beam([], 0.0, 0)]
        rows = [prefix + b.ids for b in live]
        computed = zerocap_step(lm, clip, image_embedding, rows, step, s, end, forbidden)
        beams = select_beams(beams, computed.log_q, s.num_beams, end)
        records.append(_record(step, live, computed, beams, _since(lm, clip, before, started)))
        if all(b.finished for b in beams):
            break
    beams = sorted(beams, key=lambda b: -b.score / b.length)  # stable: the earlier first on a tie
    best = beams[0].ids
    return ZeroCapResult(lm.output_text(best), best, beams, records, s, setup)


def _since(lm: LanguageModel, clip: ImageTextMatcher, before: Cost, started: float) -> Cost:
    cost = lm.cost + clip.cost - before
    cost.seconds = time.perf_counter() - started
    return cost


def _record(step: int, live: list[Beam], computed: StepMath, beams: list[Beam], cost: Cost) -> ZeroCapStepRecord:
    """A step's record: every live beam's TRACE_TOP best candidates by q."""
    top = computed.log_q.topk(min(TRACE_TOP, computed.log_q.shape[-1]), dim=-1).indices.cpu()

    def at(t: torch.Tensor) -> list[list[float]]:  # (B, V) -> [beam][candidate]
        return t.cpu().gather(1, top).tolist()

    def per_beam(ts: list[torch.Tensor]) -> list[list[list[float]]]:  # [iteration](B, V) -> [beam][iteration][cand]
        return [list(x) for x in zip(*[at(t) for t in ts])] if ts else [[] for _ in live]

    return ZeroCapStepRecord(
        step=step, beam_ids=[list(b.ids) for b in live], token_ids=top.tolist(), p0=at(computed.log_p0.exp()),
        p_steered=per_beam([lp.exp() for lp in computed.log_p_steered]), clip_target=per_beam(computed.targets),
        p_shift=at(computed.log_p_shift.exp()), q=at(computed.log_q.exp()),
        beams=[Beam(list(b.ids), b.score, b.length, b.finished) for b in beams], cost=cost)
