"""Checkers for the course's exercises: each says whether an answer is right, and never raises.

Every checker returns a :class:`Verdict`. Make it the last line of a cell and the notebook
shows one friendly line::

    ✅ Right: ...             the answer is correct (and why it matters)
    ❌ Not yet: ...           what is wrong, with a hint
    ✏️ No answer yet: ...     the answer cell still holds its placeholder

``bool(verdict)`` is ``verdict.ok``. Answers that are functions are called on small
examples whose right answers the checker computes itself; whatever the function raises
or returns, the checker reports it instead of failing.

The exercises, notebook by notebook:

==  ================================  =============================================
nb  checker                           the answer
==  ================================  =============================================
1   check_scene_caption               a caption naming every shape of a scene
1   check_mle_preset                  the preset name of the LM trained without SimCTG
2   check_top_k_filter                f(probs, k) -> top-k distribution, renormalised
2   check_nucleus_filter              f(probs, p) -> nucleus distribution, renormalised
3   check_degeneration_penalty        f(candidate_hidden, context_hidden) -> penalties
3   check_contrastive_pick            which candidate of CONTRASTIVE_TABLE is taken
4   check_clip_scores                 f(cosines, logit_scale) -> MAGIC's clip scores
4   check_temperature                 the first candidate's clip score at two scales
5   check_magic_score                 f(lm_prob, penalty, clip_score, alpha, beta)
5   check_pick_without_clip           which token contrastive search takes at a step
6   check_clip_retrieval              f(image_embedding, text_embeddings, texts)
6   check_decoders_that_see           the decoders that can name the shape's colour
7   check_k_equals_one                the decoder MAGIC becomes with k = 1
7   check_beta_limit                  what MAGIC takes as beta grows without bound
8   check_story_prefix                the ids the story LM sees before it writes
8   check_story_budget                new tokens left for a title under the paper's 100
9   check_rep_n                       f(texts, n) -> SimCTG's rep-n
9   check_gradient_free               what ZeroCap changes by gradient steps
9   check_candidate_mask              f(past, k) -> which keys each side-by-side candidate sees
==  ================================  =============================================
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RIGHT, WRONG, UNANSWERED = "right", "wrong", "unanswered"
_MARK = {RIGHT: "✅ Right", WRONG: "❌ Not yet", UNANSWERED: "✏️ No answer yet"}


@dataclass(frozen=True)
class Verdict:
    """A checker's answer: ``status`` is "right", "wrong" or "unanswered"."""

    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == RIGHT

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"{_MARK[self.status]}: {self.message}"

    __repr__ = __str__


def _right(msg: str) -> Verdict:
    return Verdict(RIGHT, msg)


def _wrong(msg: str) -> Verdict:
    return Verdict(WRONG, msg)


def _unanswered(msg: str = "replace the placeholder in the answer cell, run it, then run this cell again.") -> Verdict:
    return Verdict(UNANSWERED, msg)


def _is_placeholder(answer: Any) -> bool:
    return answer is None or answer is Ellipsis or (isinstance(answer, str) and not answer.strip())


def _never_raises(check: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """Whatever goes wrong inside a checker becomes a verdict, never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Verdict:
        try:
            return check(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a checker must never raise
            return _wrong(f"the checker could not read this answer ({type(err).__name__}: {err}).")

    wrapper.__name__, wrapper.__doc__ = check.__name__, check.__doc__
    wrapper.__wrapped__ = check  # type: ignore[attr-defined]
    return wrapper


class _Raised(Exception):
    """The learner's function raised; carries a verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


def _call(fn: Any, *args: Any) -> Any:
    """Call the learner's function; its exception becomes a verdict (via _Raised)."""
    if not callable(fn):
        raise _Raised(_wrong(f"the answer should be a function; got {type(fn).__name__}."))
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Raised(_unanswered("the function still raises NotImplementedError; write its body.")) from None
    except Exception as err:  # noqa: BLE001
        where = traceback.extract_tb(err.__traceback__)[-1]
        raise _Raised(_wrong(f"your function raised {type(err).__name__}: {err} "
                             f"(line {where.lineno}: {where.line!r}).")) from None


def _array(x: Any, name: str = "your function") -> np.ndarray:
    """A returned tensor / array / list as a float64 numpy array."""
    if x is None:
        raise _Raised(_unanswered("your function returns None: write its body (and return the result)."))
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Raised(_wrong(f"{name} returned a {type(x).__name__}, not numbers.")) from None


def _function_check(body: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """_never_raises, plus the learner's exceptions (_Raised) turned into their verdicts."""

    def run(*args: Any, **kwargs: Any) -> Verdict:
        try:
            return body(*args, **kwargs)
        except _Raised as r:
            return r.verdict

    run.__name__, run.__doc__ = body.__name__, body.__doc__
    return _never_raises(run)


def _choice(answer: Any, right: str, options: dict[str, str], why: str, hint: str) -> Verdict:
    """A multiple-choice question: ``answer`` is one key of ``options`` (any case)."""
    if _is_placeholder(answer):
        return _unanswered(f"set the answer to one of {', '.join(map(repr, options))}.")
    key = str(answer).strip().lower().strip("()").strip()
    if key not in options:
        return _wrong(f"{answer!r} is none of the options {', '.join(map(repr, options))}.")
    if key == right:
        return _right(why)
    return _wrong(f"({key}) {options[key]}: not quite. {hint}")


def _torch():
    import torch

    return torch


# =============================================================================
# 1. Tour and setup
# =============================================================================
@_never_raises
def check_scene_caption(caption: Any, scene: Any) -> Verdict:
    """Exercise 1.1: a caption of your own that names every shape of ``scene`` with its colour."""
    from ..toyworld import shapes

    if _is_placeholder(caption):
        return _unanswered("write your caption as a string, e.g. \"a red circle and a blue star.\"")
    if not isinstance(caption, str):
        return _wrong(f"the caption should be a string; got {type(caption).__name__}.")
    g = shapes.grounding(caption, scene.objects)
    truth = [f"{o.colour} {o.shape}" for o in scene.objects]
    named = [f"{c} {s}" for c, s in g.named]
    if g.all_right:
        extra = "" if shapes.is_template_caption(caption) else (
            " (The toy LM could not have written it: it is not one of the caption templates. MAGIC's LM can only "
            "propose what it learned to write; CLIP only chooses among those proposals.)")
        return _right(f"it names {', '.join(named)}: exactly what the image holds.{extra}")
    if not named:
        return _wrong("no colour-shape pair found. Write the colour just before the shape, as in \"a red circle\".")
    missing = [t for t in truth if t not in named]
    wrong = [n for n in named if n not in truth]
    parts = []
    if wrong:
        parts.append(f"the scene has no {' or '.join(wrong)}")
    if missing:
        parts.append(f"{len(missing)} shape(s) not named yet")
    if not wrong and not missing:
        parts.append("a shape is named more often than it appears")
    return _wrong("; ".join(parts) + ". Look at the picture (or scene.objects) again.")


@_never_raises
def check_mle_preset(answer: Any) -> Verdict:
    """Exercise 1.2: the preset whose LM was trained with plain MLE (no SimCTG loss)."""
    if _is_placeholder(answer):
        return _unanswered("set the answer to a preset name (see magic_edu.list_presets()).")
    from ..presets import PRESETS

    if answer == "toy-mle":
        return _right("'toy-mle' is the twin of 'toy': same data, same size, trained without the contrastive "
                      "loss. Notebook 3 compares the two.")
    if answer not in PRESETS:
        return _wrong(f"{answer!r} is not a preset name; magic_edu.list_presets() lists them.")
    return _wrong(f"{answer!r} is a preset, but read its description again: which one says plain MLE?")


# =============================================================================
# 2. Decoding basics
# =============================================================================
def _example_distributions() -> list[Any]:
    torch = _torch()
    g = torch.Generator().manual_seed(2)
    out = [torch.softmax(torch.randn(12, generator=g, dtype=torch.float64) * s, dim=0) for s in (0.5, 1.5, 3.0)]
    out.append(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
    return out


def _top_k_truth(probs: Any, k: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    keep = np.zeros_like(p, dtype=bool)
    keep[np.argsort(-p, kind="stable")[:k]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _nucleus_truth(probs: Any, p: float) -> np.ndarray:
    """The library's rule: keep a token (most probable first) while the mass before it is below p."""
    x = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    before = np.cumsum(x[order]) - x[order]
    keep = np.zeros_like(x, dtype=bool)
    keep[order[before < p]] = True
    q = np.where(keep, x, 0.0)
    return q / q.sum()


def _compare_distribution(got: np.ndarray, want: np.ndarray, what: str) -> Verdict | None:
    if got.shape != want.shape:
        return _wrong(f"{what}: expected a distribution over all {want.shape[0]} tokens (zeros for the tokens "
                      f"left out); got shape {tuple(got.shape)}.")
    if np.allclose(got, want, atol=1e-6):
        return None
    kept_right = np.array_equal(got > 1e-12, want > 0)
    if kept_right and not math.isclose(float(got.sum()), 1.0, abs_tol=1e-6):
        return _wrong(f"{what}: you keep the right tokens, but the result sums to {got.sum():.3f}; divide by "
                      "the kept mass so that it sums to 1.")
    if kept_right:
        return _wrong(f"{what}: the right tokens are kept, but their probabilities are off (expected "
                      f"{np.round(want[want > 0], 3).tolist()}).")
    return _wrong(f"{what}: you keep {int((got > 1e-12).sum())} tokens where {int((want > 0).sum())} should stay. "
                  f"Expected {np.round(want, 3).tolist()}, got {np.round(got, 3).tolist()}.")


@_function_check
def check_top_k_filter(fn: Any) -> Verdict:
    """Exercise 2.1: ``fn(probs, k)`` -> the top-k distribution (same length as probs, renormalised)."""
    if _is_placeholder(fn):
        return _unanswered()
    for probs in _example_distributions():
        for k in (1, 3, 5):
            got = _array(_call(fn, probs.clone(), k))
            bad = _compare_distribution(got, _top_k_truth(probs.numpy(), k), f"with k={k}")
            if bad is not None:
                return bad
    return _right("top-k sampling draws from exactly this distribution. With k = 1 it is greedy search.")


@_function_check
def check_nucleus_filter(fn: Any) -> Verdict:
    """Exercise 2.2: ``fn(probs, p)`` -> the nucleus distribution (same length as probs, renormalised)."""
    if _is_placeholder(fn):
        return _unanswered()
    for probs in _example_distributions():
        for p in (0.3, 0.5, 0.65, 0.9, 0.999):
            got = _array(_call(fn, probs.clone(), p))
            want = _nucleus_truth(probs.numpy(), p)
            bad = _compare_distribution(got, want, f"with p={p}")
            if bad is not None:
                if (got > 1e-12).sum() == (want > 0).sum() - 1:
                    return _wrong(bad.message + " Hint: the nucleus is the smallest set whose mass reaches p, "
                                  "so it includes the token that crosses p.")
                return bad
    return _right("the nucleus grows when the model is unsure and shrinks to a few tokens when it is sure: "
                  "an adaptive k (Holtzman et al. 2020).")


# =============================================================================
# 3. Contrastive search
# =============================================================================
@_function_check
def check_degeneration_penalty(fn: Any) -> Verdict:
    """Exercise 3.1: ``fn(candidate_hidden (k, d), context_hidden (T, d))`` -> (k,) max_j cos(h_v, h_j)."""
    if _is_placeholder(fn):
        return _unanswered()
    torch = _torch()
    g = torch.Generator().manual_seed(3)
    for k, t, d in ((4, 6, 8), (1, 3, 5), (6, 1, 16)):
        cand = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
        ctx = torch.randn(t, d, generator=g, dtype=torch.float64)
        ctx[0] = cand[0] * 5.0  # one candidate repeats a previous state exactly (cosine 1)
        got = _array(_call(fn, cand.clone(), ctx.clone()))
        cos = torch.nn.functional.normalize(cand, dim=-1) @ torch.nn.functional.normalize(ctx, dim=-1).T
        want = cos.max(dim=-1).values.numpy()
        if got.shape != want.shape:
            return _wrong(f"expected one penalty per candidate, shape ({k},); got {tuple(got.shape)}. "
                          "Take the max over the context positions (dim=-1 of the cosine matrix).")
        if not np.allclose(got, want, atol=1e-6):
            dots = (cand @ ctx.T).max(dim=-1).values.numpy()
            mean = cos.mean(dim=-1).numpy()
            if np.allclose(got, dots, atol=1e-4):
                return _wrong("these are dot products: normalise both sets of vectors to unit length first "
                              "(torch.nn.functional.normalize).")
            if np.allclose(got, mean, atol=1e-6):
                return _wrong("this is the mean similarity: the penalty is the max over previous positions "
                              "(one close repeat is enough to make a candidate degenerate).")
            return _wrong(f"for k={k}, T={t} expected {np.round(want, 4).tolist()}, got {np.round(got, 4).tolist()}.")
    return _right("a candidate whose hidden state is close to any earlier one would make the text repeat "
                  "itself, and contrastive search subtracts alpha times this from its score.")


CONTRASTIVE_TABLE = {
    "token": ["star", "circle", "square"],
    "lm_prob": [0.55, 0.30, 0.15],
    "degeneration_penalty": [0.95, 0.50, 0.45],
}
"""Exercise 3.2: three candidates at one step (alpha = 0.6)."""
CONTRASTIVE_ALPHA = 0.6


@_never_raises
def check_contrastive_pick(answer: Any) -> Verdict:
    """Exercise 3.2: the token contrastive search takes from :data:`CONTRASTIVE_TABLE` with alpha = 0.6."""
    if _is_placeholder(answer):
        return _unanswered("set the answer to one of the tokens, e.g. \"star\".")
    t = CONTRASTIVE_TABLE
    a = CONTRASTIVE_ALPHA
    scores = [(1 - a) * p - a * s for p, s in zip(t["lm_prob"], t["degeneration_penalty"])]
    best = t["token"][int(np.argmax(scores))]
    shown = ", ".join(f"{tok}: {sc:+.2f}" for tok, sc in zip(t["token"], scores))
    if str(answer).strip().lower() == best:
        return _right(f"the scores are {shown}. The most probable token loses because its hidden state "
                      "nearly repeats an earlier one.")
    if str(answer).strip().lower() not in t["token"]:
        return _wrong(f"{answer!r} is not one of the candidates {t['token']}.")
    return _wrong("compute (1 - alpha) * lm_prob - alpha * degeneration_penalty for each candidate and take the "
                  "largest.")


# =============================================================================
# 4. CLIP
# =============================================================================
@_function_check
def check_clip_scores(fn: Any) -> Verdict:
    """Exercise 4.1: ``fn(cosines (k,), logit_scale)`` -> softmax over the k of logit_scale * cosines."""
    if _is_placeholder(fn):
        return _unanswered()
    torch = _torch()
    g = torch.Generator().manual_seed(4)
    for k, scale in ((5, 100.0), (8, 100.0), (3, 1.0), (45, 100.0)):
        cos = 0.2 + 0.1 * torch.rand(k, generator=g, dtype=torch.float64)
        got = _array(_call(fn, cos.clone(), scale))
        want = torch.softmax(scale * cos, dim=0).numpy()
        if got.shape != want.shape:
            return _wrong(f"expected one score per candidate, shape ({k},); got {tuple(got.shape)}.")
        if np.allclose(got, want, atol=1e-6):
            continue
        if np.allclose(got, torch.softmax(cos, dim=0).numpy(), atol=1e-6):
            return _wrong("you left out the temperature: multiply the cosines by logit_scale before the softmax.")
        exp_taken = ("CLIP stores the logarithm of its logit scale, but the logit_scale given here (like "
                     "models.clip.logit_scale) is the scale itself, 1/tau, about 100 for ViT-B/32: multiply the "
                     "cosines by it as it is.")
        if np.allclose(got, torch.softmax(math.exp(scale) * cos, dim=0).numpy(), atol=1e-6):
            return _wrong(f"you took exp(logit_scale). {exp_taken}")
        if not np.isfinite(got).all():
            return _wrong("some scores are not finite (NaN or infinity). Did you take exp(logit_scale)? exp(100) "
                          f"overflows float32. {exp_taken}")
        if np.allclose(got, (scale * cos).numpy(), atol=1e-6) or np.allclose(got, cos.numpy(), atol=1e-6):
            return _wrong("these are not normalised over the candidates: apply a softmax over the k values.")
        return _wrong(f"with logit_scale={scale} expected {np.round(want, 4).tolist()[:6]}..., "
                      f"got {np.round(got, 4).tolist()[:6]}...")
    return _right("the scores sum to 1 over the candidates, and the temperature decides how sharply CLIP's "
                  "favourite stands out.")


@_never_raises
def check_temperature(answer: Any) -> Verdict:
    """Exercise 4.2: two candidates with cosines 0.30 and 0.25; the first one's clip score with
    logit_scale = 100 and with logit_scale = 1, as a pair ``(with_100, with_1)``."""
    if _is_placeholder(answer) or (isinstance(answer, (tuple, list)) and any(_is_placeholder(a) for a in answer)):
        return _unanswered("set the answer to a pair of numbers, (with_100, with_1).")
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return _wrong("the answer should be a pair of numbers: (score with logit_scale 100, score with 1).")
    want = [1 / (1 + math.exp(-s * 0.05)) for s in (100.0, 1.0)]
    got = [float(a) for a in answer]
    if all(abs(g - w) < 5e-3 for g, w in zip(got, want)):
        return _right(f"{want[0]:.3f} against {want[1]:.3f}. Without the temperature a 0.05 cosine gap is a coin "
                      "toss: the clip score would be nearly 1/k for every candidate, and beta would have to be "
                      "huge to matter.")
    if all(abs(g - w) < 5e-3 for g, w in zip(got[::-1], want)):
        return _wrong("the two numbers are swapped: the first is for logit_scale = 100.")
    return _wrong(f"got {got}. Each is softmax([s * 0.30, s * 0.25])[0] = 1 / (1 + exp(-s * 0.05)).")


# =============================================================================
# 5. MAGIC step by step
# =============================================================================
@_function_check
def check_magic_score(fn: Any) -> Verdict:
    """Exercise 5.1: ``fn(lm_prob, penalty, clip_score, alpha, beta)`` -> the magic score (elementwise)."""
    if _is_placeholder(fn):
        return _unanswered()
    torch = _torch()
    g = torch.Generator().manual_seed(5)
    for alpha, beta in ((0.1, 2.0), (0.6, 0.0), (0.0, 1.0), (0.3, 0.15)):
        p = torch.rand(6, generator=g, dtype=torch.float64) * 0.5
        pen = torch.rand(6, generator=g, dtype=torch.float64)
        cs = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), dim=0)
        got = _array(_call(fn, p.clone(), pen.clone(), cs.clone(), alpha, beta))
        want = ((1 - alpha) * p - alpha * pen + beta * cs).numpy()
        if got.shape != want.shape:
            return _wrong(f"expected one score per candidate, shape (6,); got {tuple(got.shape)}.")
        if not np.allclose(got, want, atol=1e-9):
            if np.allclose(got, (p - alpha * pen + beta * cs).numpy(), atol=1e-9):
                return _wrong("the model confidence is weighted by (1 - alpha), not 1.")
            if np.allclose(got, ((1 - alpha) * p + alpha * pen + beta * cs).numpy(), atol=1e-9):
                return _wrong("the degeneration penalty is subtracted: a candidate similar to the past loses.")
            return _wrong(f"with alpha={alpha}, beta={beta} expected {np.round(want, 4).tolist()}, "
                          f"got {np.round(got, 4).tolist()}.")
    return _right("this is Eq. 3 of the paper; with beta = 0 it is contrastive search's score.")


@_never_raises
def check_pick_without_clip(record: Any, alpha: Any, answer: Any) -> Verdict:
    """Exercise 5.2: at the step ``record`` (a StepRecord of MAGIC), which token would contrastive
    search (the same k and alpha, beta = 0) have taken? ``answer``: the token text or its rank (1 = most probable)."""
    if _is_placeholder(answer):
        return _unanswered("set the answer to a token (as in the table's token column) or its rank.")
    a = float(alpha)
    scores = [(1 - a) * p - a * s for p, s in zip(record.lm_prob, record.degeneration_penalty)]
    best = int(np.argmax(scores))
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        pick = int(answer) - 1
        if not 0 <= pick < record.k:
            return _wrong(f"a rank is between 1 and {record.k}; got {answer}.")
    else:
        text = str(answer)
        matches = [i for i, t in enumerate(record.tokens) if t == text or t.strip() == text.strip()]
        if not matches:
            return _wrong(f"{answer!r} is not among this step's candidates {record.tokens}.")
        pick = best if best in matches else matches[0]
    if pick == best:
        same = best == record.chosen
        tail = ("MAGIC takes it too: here the image agrees with the language model." if same else
                f"MAGIC took {record.chosen_token!r} instead: the clip score moved the choice.")
        return _right(f"{record.tokens[best]!r} has the best (1 - alpha) p - alpha penalty. {tail}")
    return _wrong(f"{record.tokens[pick]!r} scores {scores[pick]:.3f} without the clip term; another candidate "
                  "scores more. Recompute (1 - alpha) * lm_prob - alpha * degeneration_penalty for every row.")


# =============================================================================
# 6. Comparing decoders
# =============================================================================
@_function_check
def check_clip_retrieval(fn: Any) -> Verdict:
    """Exercise 6.1: ``fn(image_embedding (d,), text_embeddings (n, d), texts)`` -> the text CLIP
    matches best with the image (embeddings are L2-normalised)."""
    if _is_placeholder(fn):
        return _unanswered()
    torch = _torch()
    g = torch.Generator().manual_seed(6)
    texts = [f"caption {i}" for i in range(7)]
    for _ in range(4):
        img = torch.nn.functional.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
        txt = torch.nn.functional.normalize(torch.randn(7, 16, generator=g, dtype=torch.float64), dim=-1)
        want = texts[int((txt @ img).argmax())]
        got = _call(fn, img.clone(), txt.clone(), list(texts))
        if got is None:
            return _unanswered("your function returns None: return the best text.")
        if isinstance(got, (int, np.integer)) or (hasattr(got, "ndim") and getattr(got, "ndim", 1) == 0):
            return _wrong("you return an index; return the text itself (texts[index]).")
        if got != want:
            worst = texts[int((txt @ img).argmin())]
            if got == worst:
                return _wrong("that is the text CLIP matches *worst*: take the argmax of the cosines.")
            return _wrong(f"expected {want!r}, got {got!r}. The cosine of unit vectors is their dot product.")
    return _right("CLIP retrieval can only return a caption someone already wrote; MAGIC writes a new one.")


DECODER_OPTIONS = ("greedy", "top-k", "nucleus", "contrastive", "MAGIC", "CLIP retrieval")


@_never_raises
def check_decoders_that_see(answer: Any) -> Verdict:
    """Exercise 6.2: the set of decoders (names of :data:`DECODER_OPTIONS`) that can name the colour of
    the shape in the image more often than chance."""
    if _is_placeholder(answer) or (isinstance(answer, (set, list, tuple)) and not answer):
        return _unanswered(f"set the answer to a set of names from {list(DECODER_OPTIONS)}.")
    if isinstance(answer, str):
        answer = {answer}
    names = {str(a).strip().lower(): a for a in answer}
    known = {d.lower(): d for d in DECODER_OPTIONS}
    unknown = [names[n] for n in names if n not in known]
    if unknown:
        return _wrong(f"{unknown} not among {list(DECODER_OPTIONS)}.")
    right = {"magic", "clip retrieval"}
    got = set(names)
    if got == right:
        return _right("only MAGIC and CLIP retrieval ever look at the image; the others write the same kind "
                      "of caption whatever the picture (sampling varies it, but at random).")
    missing = [known[n] for n in right - got]
    extra = [known[n] for n in got - right]
    hint = []
    if extra:
        hint.append(f"{extra} never receive the image: their captions are right only by luck")
    if missing:
        hint.append(f"{missing} also use CLIP")
    return _wrong("; ".join(hint) + ".")


# =============================================================================
# 7. Hyperparameters
# =============================================================================
@_never_raises
def check_k_equals_one(answer: Any) -> Verdict:
    """Exercise 7.1: with k = 1, MAGIC search is the same as which decoder?"""
    if _is_placeholder(answer):
        return _unanswered(f"set the answer to a decoder name, one of {list(DECODER_OPTIONS)}.")
    a = str(answer).strip().lower().replace("_", " ").replace(" search", "")
    if a == "greedy":
        return _right("with one candidate there is nothing to re-rank: whatever alpha and beta are, MAGIC takes "
                      "the most probable token, as greedy search does. k bounds how far CLIP can pull the text.")
    if a in ("contrastive", "top-k", "top k", "nucleus", "clip retrieval", "magic"):
        return _wrong("with k = 1 the only candidate is the most probable token; which decoder always takes it?")
    return _wrong(f"{answer!r} is not a decoder name; try one of {list(DECODER_OPTIONS)}.")


BETA_LIMIT_OPTIONS = {
    "a": "the most probable token of the top-k",
    "b": "the candidate of the top-k with the highest clip score",
    "c": "the token of the whole vocabulary that CLIP matches best with the image",
    "d": "the candidate with the smallest degeneration penalty",
}


@_never_raises
def check_beta_limit(answer: Any) -> Verdict:
    """Exercise 7.2: as beta grows without bound, what does MAGIC take at each step (a, b, c or d)?"""
    return _choice(answer, "b", BETA_LIMIT_OPTIONS,
                   "the clip term swamps the other two, but CLIP only re-ranks the LM's top-k: it never reaches "
                   "outside them. Fluency then rests on k alone; a large beta with a large k gives keyword soup.",
                   "Write the score as a + beta * clip_score and let beta grow: which term decides, and over "
                   "which tokens is the argmax taken?")


# =============================================================================
# 8. Stories
# =============================================================================
@_never_raises
def check_story_prefix(answer: Any, lm: Any, title: str) -> Verdict:
    """Exercise 8.1: the text the story LM is fed before its first generated token, for ``title``."""
    if _is_placeholder(answer):
        return _unanswered("set the answer to the prefix text, built from the title and the EOS token.")
    want = lm.prompt_format.format(sos=lm.sos_token or "", eos=lm.eos_token, prompt=title)
    if str(answer) == want:
        return _right(f"{want!r}: the title, a space and the end-of-text token, exactly as the story LM saw "
                      "titles and stories joined in training. There is no start token.")
    if "".join(str(answer).split()) == "".join(want.split()):
        return _wrong("almost: check the spaces (the prompt format is '{prompt} {eos}').")
    return _wrong("look at lm.prompt_format and lm.eos_token.")


@_never_raises
def check_story_budget(answer: Any, lm: Any, title: str, max_length: int = 100) -> Verdict:
    """Exercise 8.2: how many new tokens the paper's story setting (``max_length`` = 100 tokens
    counting the prompt) leaves after the prefix of ``title``."""
    if _is_placeholder(answer):
        return _unanswered("set the answer to a whole number.")
    n_prefix = len(lm.prefix_ids(title))
    want = max_length - n_prefix
    try:
        got = int(answer)
    except (TypeError, ValueError):
        return _wrong(f"the answer should be a whole number; got {answer!r}.")
    if got == want:
        return _right(f"the prefix is {n_prefix} ids (title and EOS), so {max_length} - {n_prefix} = {want}. The "
                      "authors' decoding_len counts the prompt; magic_edu's max_new_tokens does not.")
    if got == max_length:
        return _wrong(f"the {max_length} tokens count the prompt too; subtract the prefix ids.")
    return _wrong(f"count the prefix ids with lm.prefix_ids(title) and subtract them from {max_length}.")


# =============================================================================
# 9. Evaluation and speed
# =============================================================================
@_function_check
def check_rep_n(fn: Any) -> Verdict:
    """Exercise 9.1: ``fn(texts, n)`` -> SimCTG's rep-n in percent: 100 x (1 - unique / total) n-grams,
    n-grams of whitespace-separated words, unique within each text, counts summed over the texts."""
    if _is_placeholder(fn):
        return _unanswered()
    cases = [
        ["a red circle a red circle a red circle ."],
        ["a red circle .", "a blue star on the left .", "star star star star"],
        ["there is a small green square at the top and a small green square at the bottom ."],
    ]
    for texts in cases:
        for n in (2, 3, 4):
            got = _call(fn, list(texts), n)
            if got is None:
                return _unanswered("your function returns None: return the rep-n number.")
            want = _rep_n(texts, n)
            if not math.isclose(float(got), want, abs_tol=1e-6):
                pooled = _rep_n([" ".join(texts)], n) if len(texts) > 1 else None
                if math.isclose(float(got), want / 100, abs_tol=1e-8):
                    return _wrong("right up to a factor 100: rep-n is a percentage.")
                if pooled is not None and math.isclose(float(got), pooled, abs_tol=1e-6):
                    return _wrong("n-grams must not run across texts: count each text's n-grams separately, "
                                  "then sum the counts.")
                return _wrong(f"for n={n} and {texts!r} expected {want:.3f}, got {float(got):.3f}.")
    return _right("rep-n is 0 for text that never repeats an n-gram; degenerate greedy text scores high. "
                  "Diversity multiplies (1 - rep-n/100) for n = 2, 3, 4.")


def _rep_n(texts: Sequence[str], n: int) -> float:
    unique = total = 0
    for t in texts:
        w = t.split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        unique += len(set(grams))
        total += len(grams)
    return 100.0 * (1 - unique / total) if total else math.nan


GRADIENT_OPTIONS = {
    "a": "the language model's weights",
    "b": "the language model's cached keys and values (its context)",
    "c": "CLIP's weights",
    "d": "the image",
}


@_never_raises
def check_gradient_free(answer: Any) -> Verdict:
    """Exercise 9.2: ZeroCap (Tewel et al. 2022) takes gradient steps at every generated token. On what?"""
    return _choice(answer, "b", GRADIENT_OPTIONS,
                   "ZeroCap back-propagates CLIP's loss into the LM's key-value cache at every step, which is "
                   "why it is slow; MAGIC only re-ranks k candidates with forward passes, so a caption costs a "
                   "few forwards per token.",
                   "ZeroCap keeps every weight frozen; it changes what the LM remembers of the text so far.")


@_function_check
def check_candidate_mask(fn: Any) -> Verdict:
    """Exercise 9.3: ``fn(past, k)`` -> the (k, past + k) attention mask of k candidates run side by
    side after ``past`` cached positions: True (1) where candidate i may attend, that is every cached
    position and its own position past + i; False (0) elsewhere."""
    if _is_placeholder(fn):
        return _unanswered()
    for past, k in ((3, 4), (1, 1), (5, 2), (0, 3)):
        got = _array(_call(fn, past, k))
        want = np.array([[j < past or j == past + i for j in range(past + k)] for i in range(k)])
        if got.shape != want.shape:
            return _wrong(f"for past={past}, k={k} the mask has one row per candidate and one column per key: "
                          f"shape (k, past + k) = {want.shape}; yours is {got.shape}.")
        if np.isinf(got).any() or (got < 0).any():
            return _wrong("return True (or 1) where a candidate may attend and False (or 0) elsewhere, not an "
                          "additive mask of 0 and -inf (the library builds that one from this).")
        allowed = got != 0
        if (allowed == want).all():
            continue
        causal = np.array([[j <= past + i for j in range(past + k)] for i in range(k)])
        if (allowed == causal).all():
            return _wrong("that is the usual causal mask: candidate i would also see candidates 0..i-1. They are "
                          "alternatives for the same position, not earlier tokens: each may see only the cache "
                          "and itself.")
        if not allowed[:, :past].all():
            return _wrong("every candidate must see all the cached positions (the first `past` columns).")
        if not allowed[np.arange(k), past + np.arange(k)].all():
            return _wrong("each candidate must see itself (column past + i): attention always includes the token's "
                          "own position.")
        return _wrong(f"for past={past}, k={k} expected {want.astype(int).tolist()}, got "
                      f"{allowed.astype(int).tolist()}.")
    return _right("with this mask and every candidate at position `past`, one forward of k tokens gives each "
                  "candidate exactly the hidden state of its own one-token forward, and the cache is never "
                  "copied k times (`LanguageModel.forward_candidates`).")


__all__ = [
    "BETA_LIMIT_OPTIONS",
    "CONTRASTIVE_ALPHA",
    "CONTRASTIVE_TABLE",
    "DECODER_OPTIONS",
    "GRADIENT_OPTIONS",
    "Verdict",
    "check_beta_limit",
    "check_candidate_mask",
    "check_clip_retrieval",
    "check_clip_scores",
    "check_contrastive_pick",
    "check_decoders_that_see",
    "check_degeneration_penalty",
    "check_gradient_free",
    "check_k_equals_one",
    "check_magic_score",
    "check_mle_preset",
    "check_nucleus_filter",
    "check_pick_without_clip",
    "check_rep_n",
    "check_scene_caption",
    "check_story_budget",
    "check_story_prefix",
    "check_temperature",
    "check_top_k_filter",
]
