"""Why a step took its token: what other settings would have changed it, and what in the image decided.

**Decision maps and flip points** (contrastive and MAGIC search, from a trace alone). At one recorded
step candidate i scores

    s_i(alpha, beta) = (1 - alpha) p_i - alpha pen_i + beta c_i

with p_i = ``lm_prob``, pen_i = ``degeneration_penalty`` and c_i = ``clip_score``. None of the three
depends on alpha or beta (p and the penalty come from the LM on the same prefix; c is a softmax over
the k candidates of CLIP cosines of the same texts), so the step can be re-decided at any
(alpha, beta) from the record: the decoder takes the first maximum, that is, a tie goes to the more
probable candidate (the lower index: candidates are sorted by p, most probable first).
:func:`winner` does that in float64 with the decoder's own arithmetic. Contrastive search has no
CLIP term: there only alpha varies.

Each score is linear in (alpha, beta), so candidate i beats j on one side of a line. Along beta
(alpha fixed), s_i - s_j = d + beta (c_i - c_j): i wins where every such difference is > 0 (or = 0
and i < j), an intersection of half-lines, one interval (:func:`flip_points`); the same holds along
alpha with beta fixed, and over the (alpha, beta) plane each candidate's region is a convex polygon
(:func:`decision_regions`). The interval ends are the crossings -d / (c_i - c_j) of lines, computed
in float64 (one rounding each); whether an end is attained is the tie rule at the crossing.

**Occlusion** (:func:`occlusion_map`, needs CLIP and the image): cover one square of the image at
a time and measure how much cos(image, text_a) - cos(image, text_b) drops; exact (every occluded
image really goes through CLIP's image tower) and model-agnostic (no gradients).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import MagicEduError
from ..inputs import ImageLike, check_float, check_int, load_image
from ..trace import StepRecord, Trace
from .analysis import TraceLike, as_trace, scores_candidates, token_label

FLIP_COLUMNS = ("wins_beta_low", "wins_beta_high", "wins_alpha_low", "wins_alpha_high")
# regions that begin above this beta are not looked for (a CLIP term 1e9 times the LM's)
BETA_SEARCHED = 1e9
GREY = (128, 128, 128)
OCCLUSION_BATCH = 64  # occluded images per CLIP forward


# -- intervals ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """The values of a setting for which a candidate wins: from ``low`` to ``high`` (``high`` may be
    inf), each end included iff ``*_closed`` (an open end is a tie the other candidate takes).
    Empty: ``low`` > ``high``, or a single point not included."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = True

    @property
    def empty(self) -> bool:
        return self.low > self.high or (self.low == self.high and not (self.low_closed and self.high_closed))

    def __contains__(self, x: float) -> bool:
        if self.empty:
            return False
        above = x > self.low or (x == self.low and self.low_closed)
        below = x < self.high or (x == self.high and self.high_closed)
        return above and below

    def __str__(self) -> str:
        if self.empty:
            return "∅"
        high = "∞" if math.isinf(self.high) else f"{self.high:.3g}"
        return f"{'[' if self.low_closed else '('}{self.low:.3g}, {high}{']' if self.high_closed else ')'}"


EMPTY = Interval(math.inf, -math.inf, False, False)


def _win_interval(i: int, d: np.ndarray, slope: np.ndarray, low: float, high: float) -> Interval:
    """Where candidate i wins along a setting t in [low, high]: d[j] + t slope[j] is s_i - s_j at t
    (ignored at j = i), and i beats j where it is > 0, or = 0 and i < j (the tie rule).

    Each j bounds t from below (slope > 0), from above (slope < 0) or not at all (parallel lines:
    i beats j for every t or for none); the interval is the tightest bounds, an end attained iff
    every j that sets it would lose the tie to i."""
    lo, lo_closed, hi, hi_closed = low, True, high, not math.isinf(high)
    for j in range(len(d)):
        if j == i:
            continue
        ties_to_i = i < j
        if slope[j] == 0:
            if d[j] > 0 or (d[j] == 0 and ties_to_i):
                continue
            return EMPTY
        crossing = float(-d[j] / slope[j])
        if slope[j] > 0:
            if crossing > lo:
                lo, lo_closed = crossing, ties_to_i
            elif crossing == lo:
                lo_closed = lo_closed and ties_to_i
        elif crossing < hi:
            hi, hi_closed = crossing, ties_to_i
        elif crossing == hi:
            hi_closed = hi_closed and ties_to_i
    found = Interval(lo, hi, lo_closed, hi_closed)
    return EMPTY if found.empty else found


# -- one step --------------------------------------------------------------------------------------
def _columns(record: StepRecord, with_clip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p, penalty, clip score) as float64 arrays; a MagicEduError where the record lacks them."""
    p = np.asarray(record.lm_prob, dtype=np.float64)
    pen = np.asarray(record.degeneration_penalty, dtype=np.float64)
    c = np.asarray(record.clip_score, dtype=np.float64)
    if not (np.isfinite(p).all() and np.isfinite(pen).all()):
        raise MagicEduError(f"record: step {record.step} has no degeneration penalties (only contrastive and "
                            "MAGIC search score their candidates)")
    if with_clip and not np.isfinite(c).all():
        raise MagicEduError(f"beta: step {record.step} has no CLIP scores (contrastive search has no CLIP term: "
                            "give beta=None)")
    return p, pen, c


def _check_setting(alpha: Any, beta: Any) -> tuple[float, float | None]:
    alpha = check_float(alpha, "alpha", 0.0, 1.0)
    return alpha, None if beta is None else check_float(beta, "beta", 0.0)


def scores(record: StepRecord, alpha: float, beta: float | None = None) -> np.ndarray:
    """Every candidate's score at (alpha, beta), (1 - alpha) p - alpha pen + beta c, in float64 with the
    decoder's own operations in its order (so bit for bit its score); ``beta`` None: no CLIP term
    (contrastive search, whose score is the same with beta c left out)."""
    alpha, beta = _check_setting(alpha, beta)
    p, pen, c = _columns(record, beta is not None)
    score = (1.0 - alpha) * p - alpha * pen
    return score if beta is None else score + beta * c


def winner(record: StepRecord, alpha: float, beta: float | None = None) -> int:
    """The candidate the decoder takes at (alpha, beta): the first maximum of :func:`scores` (a tie goes
    to the more probable candidate, as ``argmax`` does in the decoder)."""
    return int(np.argmax(scores(record, alpha, beta)))


@dataclass(frozen=True)
class Flips:
    """Where one candidate wins when one setting moves and the other stays at the step's value:
    ``beta`` (alpha fixed; None without a CLIP term) and ``alpha`` (beta fixed), each an
    :class:`Interval` (empty where it never wins)."""

    index: int
    token: str
    beta: Interval | None
    alpha: Interval

    @property
    def wins_from_beta(self) -> float:
        """The smallest beta >= 0 at which it wins (alpha fixed): inf where it never does (NaN without
        CLIP); attained iff ``beta.low_closed``."""
        if self.beta is None:
            return math.nan
        return math.inf if self.beta.empty else self.beta.low


def flip_points(record: StepRecord, alpha: float, beta: float | None = None) -> list[Flips]:
    """Per candidate, the beta interval (at this ``alpha``) and the alpha interval in [0, 1] (at this
    ``beta``) in which it wins; ``beta`` None: no CLIP term (contrastive search: only alpha moves).

    Along beta, s_i - s_j = d_j + beta (c_i - c_j) with d_j = s_i - s_j at beta = 0; along alpha,
    s_i - s_j = (p_i + beta c_i) - (p_j + beta c_j) - alpha ((p_i + pen_i) - (p_j + pen_j)).
    The decoder's choice at (alpha, beta) is the candidate whose both intervals hold the step's value.
    """
    alpha, beta = _check_setting(alpha, beta)
    p, pen, c = _columns(record, beta is not None)
    base = (1.0 - alpha) * p - alpha * pen  # the score without the CLIP term, as the decoder computes it
    at_alpha0 = p if beta is None else p + beta * c
    alpha_slope = -(p + pen)
    out = []
    for i in range(record.k):
        beta_interval = None if beta is None else _win_interval(i, base[i] - base, c[i] - c, 0.0, math.inf)
        alpha_interval = _win_interval(i, at_alpha0[i] - at_alpha0, alpha_slope[i] - alpha_slope, 0.0, 1.0)
        out.append(Flips(i, record.tokens[i], beta_interval, alpha_interval))
    return out


def step_setting(trace: TraceLike, step: int) -> tuple[Trace, StepRecord, float, float | None]:
    """(trace, the step's record, its alpha, its beta or None without CLIP), checked: the decoder must
    score candidates (contrastive or MAGIC search) and ``step`` be a step of the trace (negative:
    from the end)."""
    trace = as_trace(trace)
    if not scores_candidates(trace):
        raise MagicEduError(f"trace: decision maps need contrastive or MAGIC search, whose candidates are scored; "
                            f"this trace's decoder is {trace.settings.get('decoder')!r}")
    n = len(trace.steps)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not -n <= step < n:
        raise MagicEduError(f"step must be an integer between 0 and {n - 1} (or negative, from the end); "
                            f"got {step!r}" if n else "step: the trace has no steps yet")
    record = trace.steps[int(step)]
    if "alpha" not in trace.settings:
        raise MagicEduError("trace: its settings have no alpha; a decision map needs the decode's alpha")
    has_clip = np.isfinite(np.asarray(record.clip_score, dtype=float)).all()
    beta = trace.settings.get("beta") if has_clip else None
    if has_clip and beta is None:
        raise MagicEduError("trace: its settings have no beta; a decision map of MAGIC search needs it")
    return trace, record, float(trace.settings["alpha"]), None if beta is None else float(beta)


def flip_columns(trace: Trace) -> dict[str, list[float]]:
    """The :data:`FLIP_COLUMNS` of ``trace.to_frame()``, one value per (step, candidate): the ends of the
    beta interval (alpha at the decode's) and of the alpha interval (beta at the decode's) where the
    candidate wins. Empty: ``wins_beta_low`` inf, the others NaN; NaN throughout for a decoder that
    does not score candidates, and for beta where there is no CLIP term."""
    n = sum(s.k for s in trace.steps)
    columns = {name: [math.nan] * n for name in FLIP_COLUMNS}
    if not scores_candidates(trace) or "alpha" not in trace.settings:
        return columns
    row = 0
    for t, record in enumerate(trace.steps):
        try:
            _, _, alpha, beta = step_setting(trace, t)
            flips = flip_points(record, alpha, beta)
        except MagicEduError:  # a step without scores (a hand-made trace): NaN, as for other decoders
            row += record.k
            continue
        for f in flips:
            if f.beta is not None:
                columns["wins_beta_low"][row] = f.wins_from_beta
                columns["wins_beta_high"][row] = math.nan if f.beta.empty else f.beta.high
            if not f.alpha.empty:
                columns["wins_alpha_low"][row], columns["wins_alpha_high"][row] = f.alpha.low, f.alpha.high
            row += 1
    return columns


# -- the (alpha, beta) plane ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Where one candidate wins: a convex polygon (n x 2 array of (alpha, beta) corners, in order) in
    the map's box, its area, and a point inside it for its label; for a map along alpha alone
    (no CLIP), ``polygon`` is None and ``alpha`` the interval."""

    index: int
    token: str
    polygon: np.ndarray | None
    area: float
    label_point: tuple[float, float]
    alpha: Interval | None = None


@dataclass(frozen=True)
class DecisionMap:
    """Which candidate wins at every (alpha, beta) of [0, 1] x [0, ``beta_max``] for one step (a line
    along alpha, ``beta`` None, without CLIP): the regions of positive size, and the candidates
    that win only on a boundary (a tie they take, zero area). ``alpha``, ``beta``: the step's."""

    step: int
    alpha: float
    beta: float | None
    beta_max: float | None
    regions: list[Region]
    on_boundaries: list[int]
    record: StepRecord

    def winner(self, alpha: float, beta: float | None = None) -> int:
        """:func:`winner` of this step."""
        return winner(self.record, alpha, beta if self.beta is not None else None)


def _clip_polygon(points: list[tuple[float, float]], a: float, e: float, c: float) -> list[tuple[float, float]]:
    """The part of a convex polygon where a + e alpha + c beta >= 0 (Sutherland-Hodgman). A cut on an
    edge is interpolated from the end nearer the line, which keeps it precise on very long edges."""
    values = [a + e * x + c * y for x, y in points]
    out: list[tuple[float, float]] = []
    for n, (p, gp) in enumerate(zip(points, values)):
        q, gq = points[(n + 1) % len(points)], values[(n + 1) % len(points)]
        if gp >= 0:
            out.append(p)
        if (gp > 0 > gq) or (gp < 0 < gq):
            near, far, g_near, g_far = (p, q, gp, gq) if abs(gp) <= abs(gq) else (q, p, gq, gp)
            t = g_near / (g_near - g_far)
            out.append((near[0] + t * (far[0] - near[0]), near[1] + t * (far[1] - near[1])))
    return out


def _area(points: Sequence[tuple[float, float]]) -> float:
    x, y = np.asarray(points, dtype=float).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polygons(p: np.ndarray, pen: np.ndarray, c: np.ndarray, top: float) -> list[list[tuple[float, float]]]:
    """Each candidate's winning set in [0, 1] x [0, top] with its boundary, as a convex polygon (empty:
    it never wins; under 3 corners: a segment or a point): the box cut by s_i - s_j =
    (p_i - p_j) - alpha ((p_i - p_j) + (pen_i - pen_j)) + beta (c_i - c_j) >= 0 for every j; a
    candidate identical to a more probable one never wins (the tie rule)."""
    out = []
    for i in range(len(p)):
        poly = [(0.0, 0.0), (1.0, 0.0), (1.0, top), (0.0, top)]
        for j in range(len(p)):
            if j == i or not poly:
                continue
            a, e, slope = p[i] - p[j], -((p[i] - p[j]) + (pen[i] - pen[j])), c[i] - c[j]
            if a == e == slope == 0:
                if j < i:
                    poly = []
                continue
            poly = _clip_polygon(poly, a, e, slope)
        out.append(poly)
    return out


def decision_regions(trace: TraceLike, step: int, *, beta_max: float | None = None) -> DecisionMap:
    """The decision map of one step of a contrastive or MAGIC trace (a saved trace works too): which
    candidate wins at every alpha in [0, 1] and beta in [0, ``beta_max``].

    ``beta_max`` None: just above the highest corner of any region (every region that exists for
    some beta up to :data:`BETA_SEARCHED` shows, the bounded ones whole) and above the step's beta.
    Without CLIP (contrastive search) the map is a line along alpha, and beta_max is not used."""
    trace, record, alpha, beta = step_setting(trace, step)
    if beta_max is not None:
        beta_max = check_float(beta_max, "beta_max", 0.0)
        if beta_max == 0:
            raise MagicEduError("beta_max must be a number > 0 (or None: just above every region's corners); got 0")
    if beta is None:
        regions, on_boundaries = [], []
        for f in flip_points(record, alpha):
            if f.alpha.empty:
                continue
            if f.alpha.high == f.alpha.low:
                on_boundaries.append(f.index)
                continue
            middle = (f.alpha.low + f.alpha.high) / 2
            regions.append(Region(f.index, f.token, None, f.alpha.high - f.alpha.low, (middle, 0.0), f.alpha))
        return DecisionMap(record.step, alpha, None, None, regions, on_boundaries, record)

    p, pen, c = _columns(record, True)
    searched = _polygons(p, pen, c, BETA_SEARCHED)
    if beta_max is None:
        corners = [y for poly in searched for _, y in poly if y < BETA_SEARCHED]
        beta_max = 1.15 * max([*corners, beta, 0.5 / 1.15])
    regions, on_boundaries = [], []
    for i, poly in enumerate(_polygons(p, pen, c, beta_max)):
        if not (searched[i] and poly):  # never wins, or only above beta_max
            continue
        area = _area(poly) if len(poly) >= 3 else 0.0
        if area <= 1e-12 * beta_max:  # a segment or a point: a tie it may win or lose, as the decoder says
            if winner(record, *np.mean(poly, axis=0)) == i:
                on_boundaries.append(i)
            continue
        x, y = np.asarray(poly).mean(axis=0)  # inside: a convex polygon holds the mean of its corners
        regions.append(Region(i, record.tokens[i], np.asarray(poly), area, (float(x), float(y))))
    return DecisionMap(record.step, alpha, beta, beta_max, regions, on_boundaries, record)


# -- a whole decode ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceRoom:
    """How much room one step's choice had: the intervals of beta (alpha fixed) and alpha (beta fixed)
    in which the token taken wins; ``image_decided``: without the CLIP term (beta = 0) another
    candidate would have won; ``beta_flips``: some beta >= 0 changes the choice."""

    step: int
    token: str
    forced: bool
    beta: Interval | None
    alpha: Interval
    image_decided: bool
    beta_flips: bool


def choice_room(trace: TraceLike) -> list[ChoiceRoom]:
    """:class:`ChoiceRoom` of every step of a contrastive or MAGIC trace (of the token taken: for a
    forced step, the forced token's, which may win nowhere near the decode's setting)."""
    trace = as_trace(trace)
    out = []
    for t, record in enumerate(trace.steps):
        _, _, alpha, beta = step_setting(trace, t)
        f = flip_points(record, alpha, beta)[record.chosen]
        decided = f.beta is not None and not f.beta.empty and 0.0 not in f.beta
        flips = f.beta is not None and not (0.0 in f.beta and math.isinf(f.beta.high))
        out.append(ChoiceRoom(record.step, record.chosen_token, record.forced, f.beta, f.alpha, decided, flips))
    return out


def flip_sentences(trace: TraceLike, step: int, most: int = 5) -> list[str]:
    """Short sentences for one step: where the token taken holds, then up to ``most`` other candidates
    that some beta (alpha fixed) or some alpha (beta fixed) would make win, nearest flip first."""
    trace, record, alpha, beta = step_setting(trace, step)
    flips = flip_points(record, alpha, beta)
    taken = flips[record.chosen]
    own = winner(record, alpha, beta)
    name = f"“{token_label(record.chosen_token)}”"
    holds = [f"α in {taken.alpha} (β = {beta:g})" if beta is not None else f"α in {taken.alpha}"]
    if taken.beta is not None:
        holds.insert(0, f"β in {taken.beta} (α = {alpha:g})")
    lines = [f"{name} was forced; the decoder's own choice was “{token_label(record.tokens[own])}”."
             if record.forced and own != record.chosen else f"{name} holds for " + " and for ".join(holds) + "."]

    def distance(f: Flips) -> float:
        near = [abs(f.beta.low - beta)] if f.beta is not None and not f.beta.empty else []
        return min([*near, *([abs(f.alpha.low - alpha), abs(f.alpha.high - alpha)] if not f.alpha.empty else [])],
                   default=math.inf)

    others = sorted((f for f in flips if f.index != record.chosen and math.isfinite(distance(f))), key=distance)
    for f in others[:most]:
        ways = []
        if f.beta is not None and not f.beta.empty:
            ways.append(f"β {_bound_words(f.beta)}" + ("" if beta is None else f" (α = {alpha:g})"))
        if not f.alpha.empty:
            ways.append(f"α in {f.alpha}" + ("" if beta is None else f" (β = {beta:g})"))
        lines.append(f"with {' or with '.join(ways)}, “{token_label(f.token)}” would win.")
    never = sum(1 for f in flips if f.index != record.chosen and not math.isfinite(distance(f)))
    left = len(others) - min(len(others), most)
    if left:
        lines.append(f"{left} more candidate{'s' if left > 1 else ''} could win too (see the decision map).")
    if never:
        lines.append(f"{never} candidate{'s' if never > 1 else ''} would win at no " +
                     ("β (α fixed) and no α (β fixed)." if beta is not None else "α."))
    return lines


def _bound_words(interval: Interval) -> str:
    """'≥ 0.83', '> 0.83' or 'in (0.3, 0.5]' for a beta interval."""
    if math.isinf(interval.high):
        return f"{'≥' if interval.low_closed else '>'} {interval.low:.3g}"
    return f"in {interval}"


# -- what in the image decided --------------------------------------------------------------------------
@dataclass(frozen=True)
class Occlusion:
    """An occlusion map: ``drops[r, q]`` is how much m = cos(I, text_a) - cos(I, text_b) falls when the
    square of side ``patch`` at (``tops[r]``, ``lefts[q]``) is covered (m(image) - m(covered image);
    > 0: that square makes CLIP prefer text_a); ``map`` (H x W) the mean drop of the squares that
    cover each pixel. ``margin``: m of the whole image."""

    map: np.ndarray
    drops: np.ndarray
    tops: list[int]
    lefts: list[int]
    patch: int
    stride: int
    fill: tuple[int, int, int]
    text_a: str
    text_b: str
    margin: float
    image: Image.Image


def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Square positions along one side: every ``stride`` pixels, plus the last one flush with the edge,
    so that every pixel is covered."""
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else [*starts, size - patch]


def _fill_colour(fill: Any, pixels: np.ndarray) -> tuple[int, int, int]:
    if isinstance(fill, str) and fill in ("grey", "mean"):
        return GREY if fill == "grey" else tuple(round(float(v)) for v in pixels.reshape(-1, 3).mean(axis=0))
    if (isinstance(fill, (tuple, list)) and len(fill) == 3
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill)):
        return tuple(int(v) for v in fill)
    raise MagicEduError(f"fill must be 'grey', 'mean' (the image's mean colour) or an (r, g, b) triple of "
                        f"integers 0-255; got {fill!r}")


def _margins(clip: Any, images: list[Image.Image], texts: Any) -> np.ndarray:
    """cos(I, text_a) - cos(I, text_b) of every image, CLIP's image tower in batches."""
    out = []
    for start in range(0, len(images), OCCLUSION_BATCH):
        emb = clip.embed_image(images[start:start + OCCLUSION_BATCH])
        cos = emb.double().to(texts.device) @ texts.T
        out.append((cos[:, 0] - cos[:, 1]).cpu().numpy())
    return np.concatenate(out)


def occlusion_map(clip: Any, image: ImageLike, text_a: str, text_b: str, *, patch: int | None = None,
                  stride: int | None = None, fill: Any = "grey") -> Occlusion:
    """What in ``image`` makes CLIP prefer ``text_a`` over ``text_b``: cover one square at a time with
    ``fill`` ('grey', 'mean' or an (r, g, b) triple) and measure the drop of
    cos(I, text_a) - cos(I, text_b) (:class:`Occlusion`). ``patch`` (default: a sixth of the shorter
    side) and ``stride`` (default: half the patch) in pixels of the image as given; every pixel is
    covered by at least one square. ``clip``: an :class:`~magic_edu.models.ImageTextMatcher` (only
    its ``embed_image`` and ``embed_texts`` are used). Costs one CLIP image per square."""
    for name, text in (("text_a", text_a), ("text_b", text_b)):
        if not isinstance(text, str):
            raise MagicEduError(f"{name} must be a string; got {type(text).__name__}")
    img = load_image(image)
    pixels = np.asarray(img)
    h, w = pixels.shape[:2]
    patch = max(1, min(h, w) // 6) if patch is None else check_int(patch, "patch", 1, min(h, w))
    stride = max(1, patch // 2) if stride is None else check_int(stride, "stride", 1, patch)
    colour = _fill_colour(fill, pixels)
    tops, lefts = _starts(h, patch, stride), _starts(w, patch, stride)
    covered = []
    for top in tops:
        for left in lefts:
            copy = pixels.copy()
            copy[top:top + patch, left:left + patch] = colour
            covered.append(Image.fromarray(copy))
    texts = clip.embed_texts([text_a, text_b]).double()
    margins = _margins(clip, [img, *covered], texts)
    drops = (margins[0] - margins[1:]).reshape(len(tops), len(lefts))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for r, top in enumerate(tops):
        for q, left in enumerate(lefts):
            total[top:top + patch, left:left + patch] += drops[r, q]
            count[top:top + patch, left:left + patch] += 1
    return Occlusion(total / count, drops, tops, lefts, patch, stride, colour, text_a, text_b, float(margins[0]), img)


def step_occlusion(trace: TraceLike, step: int, clip: Any, image: ImageLike, a: int | None = None,
                   b: int | None = None, **options: Any) -> Occlusion:
    """:func:`occlusion_map` of one MAGIC step's two candidates' CLIP texts (their ``clip_text``): ``a``
    (default: the token taken) against ``b`` (default: the best other candidate by CLIP score).
    The trace does not store the image: give the one it was decoded from. ``options``: patch,
    stride, fill."""
    trace, record, _, beta = step_setting(trace, step)
    if beta is None:
        raise MagicEduError(f"trace: {trace.settings.get('decoder')} search has no CLIP term; occlusion maps need "
                            "MAGIC search")
    a = record.chosen if a is None else check_int(a, "a", 0, record.k - 1)
    if b is None:
        others = [i for i in range(record.k) if i != a]
        if not others:
            raise MagicEduError("b: this step has a single candidate, nothing to compare with")
        b = max(others, key=lambda i: record.clip_score[i])
    b = check_int(b, "b", 0, record.k - 1)
    return occlusion_map(clip, image, record.clip_text[a], record.clip_text[b], **options)
