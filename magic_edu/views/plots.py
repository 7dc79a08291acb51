"""Pictures of a decode, drawn from its trace alone (no model needed; a saved trace works too).

    >>> gen = magic_search(lm, clip, image, k=8, alpha=0.1, beta=1.0)
    >>> plot_step(gen.trace, 2)          # the k candidates of step 2 and the parts of their score
    >>> plot_decode(gen.trace)           # steps x candidates heat map, chosen path drawn
    >>> plot_degeneration(gen.trace)     # hidden-state similarities behind the penalty
    >>> plot_clip_step(gen.trace, 2, image), plot_clip_over_decode(gen.trace)
    >>> plot_decoders([greedy, contrastive, magic])  # where and why the paths split
    >>> plot_beams(beam_search(lm, num_beams=4).trace)  # beam search's tree of hypotheses
    >>> plot_decision_map(gen.trace, 2)  # which token wins at every (alpha, beta) of step 2
    >>> plot_choice_room(gen.trace)      # per step, the alpha and beta for which the choice holds
    >>> plot_occlusion(step_occlusion(gen.trace, 2, clip, image))  # what in the image decided

Every function returns a matplotlib Figure (made without pyplot, so a notebook shows it once
and nothing leaks). Colours are the Okabe-Ito palette and colour-blind safe colour maps
(viridis, cividis); every meaning is also carried by hatching, markers or labels.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps, patheffects, ticker, transforms
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.figure import SubFigure
from matplotlib.patches import Polygon, Rectangle

from ..errors import MagicEduError
from ..inputs import ImageLike, load_image
from ..tools import explain
from ..tools.analysis import (
    TraceLike,
    as_trace,
    chosen_ids,
    degeneration_matrix,
    divergence_step,
    is_beam_trace,
    output_path,
    score_parts,
    scores_candidates,
    token_label,
    trace_decoder,
)
from ..trace import StepRecord, Trace


class Figure(MplFigure):
    """A matplotlib Figure made without pyplot that a notebook shows as a PNG (``_repr_png_``):
    shown once, never left open in pyplot, drawn the same in a live kernel and a static page."""

    def _repr_png_(self) -> bytes:
        return to_png(self, dpi=100)


# Okabe & Ito (2008), "Color Universal Design"
OKABE_ITO = {
    "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000", "grey": "#999999",
}
LM_STYLE = {"color": OKABE_ITO["blue"], "hatch": ""}
PENALTY_STYLE = {"color": OKABE_ITO["vermillion"], "hatch": "///"}
CLIP_STYLE = {"color": OKABE_ITO["green"], "hatch": "..."}
CHOSEN_MARK = "▶ "
VIRIDIS = colormaps["viridis"].with_extremes(bad="white")  # perceptually uniform, colour-blind safe
CIVIDIS = colormaps["cividis"].with_extremes(bad="white")
HEATMAP_COLUMNS = ("score", "lm_prob", "degeneration_penalty", "clip_score", "clip_cosine", "penalty_position")

# bar labels: tests and notebooks find the bars by these
LM_LABEL = "(1 − α) · p(v|x)"
PROB_LABEL = "p(v|x)"
PENALTY_LABEL = "− α · degeneration penalty"
CLIP_LABEL = "β · CLIP score"
TOTAL_LABEL = "total score"
CHOSEN_LABEL = "chosen"
PATH_LABEL = "chosen path"
# ZeroCap's bars, top to bottom in a row: the trace column, its label, its style
ZEROCAP_BARS = (("lm_prob", "p0(v): the LM alone", LM_STYLE),
                ("steered_prob", "p(v): after the gradient steps", {"color": OKABE_ITO["green"], "hatch": "..."}),
                ("fused_prob", "q(v): fused, what the beams take", {"color": OKABE_ITO["orange"], "hatch": ""}))
TARGET_LABEL = "CLIP's target"
FORCED_LABEL = "forced by hand"
PENALTY_PAIR_LABEL = "most similar earlier position (gives the penalty)"


# -- helpers ---------------------------------------------------------------------------------
def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[MplFigure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _step_index(trace: Trace, step: int) -> int:
    n = len(trace.steps)
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
        raise MagicEduError(f"step must be an integer; got {step!r}")
    if n == 0:
        raise MagicEduError("step: the trace has no steps yet")
    if not -n <= step < n:
        raise MagicEduError(f"step must be between 0 and {n - 1} (or negative, from the end); got {step}")
    return int(step) % n


def _is_candidate_trace(trace: Trace) -> bool:
    """Whether the trace's decoder scores candidates (the registry says; an unknown one does not)."""
    return scores_candidates(trace)


def _uses_clip(trace: Trace) -> bool:
    """Whether the trace's decoder scores candidates with CLIP (it needs the image)."""
    decoder = trace_decoder(trace)
    return decoder is not None and decoder.needs_image


def _has_clip(record: StepRecord) -> bool:
    return bool(record.clip_score) and not np.all(np.isnan(np.asarray(record.clip_score, dtype=float)))


def _shorten(text: str, n: int = 36) -> str:
    """The end of a text (the part that changes from candidate to candidate)."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _settings_line(trace: Trace) -> str:
    s = trace.settings
    parts = [str(s.get("decoder", "?"))]
    for key, sym in (("k", "k"), ("alpha", "α"), ("beta", "β"), ("p", "p"), ("mass", "mass"), ("temperature", "T"),
                     ("num_beams", "beams"), ("length_penalty", "length penalty")):
        if isinstance(s.get(key), (int, float)):
            parts.append(f"{sym}={s[key]:g}")
    return ", ".join(parts)


def _is_special(text: str) -> bool:
    return token_label(text).startswith("⟨")


def _token(text: str, n: int = 12) -> str:
    """A token's visible label, cut at ``n`` characters."""
    label = token_label(text)
    return label if len(label) <= n else label[: n - 1] + "…"


def _legend_below(ax: Axes, offset: float = 30, ncols: int = 3) -> None:
    """The legend ``offset`` points below the axes (under the tick labels and the x label)."""
    transform = transforms.offset_copy(ax.transAxes, fig=ax.figure, y=-offset, units="points")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=transform, ncols=ncols, fontsize=7,
              frameon=False, markerscale=0.6)


def _outlined() -> list:
    return [patheffects.withStroke(linewidth=3, foreground="white")]


def to_png(fig: MplFigure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (for an ipywidgets Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# -- one step ---------------------------------------------------------------------------------
def _shown_rows(record: StepRecord, score: np.ndarray, max_candidates: int) -> list[int]:
    """The candidates to draw: the first ``max_candidates`` by rank, plus the chosen and the best."""
    rows = set(range(min(record.k, max_candidates)))
    rows |= {record.chosen, int(np.nanargmax(score)) if np.isfinite(score).any() else 0}
    return sorted(rows)


def plot_step(trace: TraceLike, step: int = -1, *, ax: Axes | None = None, max_candidates: int = 20) -> MplFigure:
    """The candidates of one step as horizontal bars (most probable at the top).

    Contrastive / MAGIC: each bar is split into (1 - alpha) p(v|x) (plain), - alpha penalty
    (hatched ///, to the left of 0) and beta CLIP score (dotted ...); a diamond marks the total.
    Greedy / sampling: one bar of p(v|x). Beam search: one bar of p(v | its beam) per candidate,
    labelled with the beam it extends. ZeroCap: three thin bars per candidate (labelled with its
    beam), p0 (the LM alone), p after the gradient steps and the fused q, and a tick at CLIP's
    target, to see where the steps moved the distribution. The chosen candidate's row is shaded, outlined and
    labelled with ▶ (and "forced" when it was forced by hand).
    """
    trace = as_trace(trace)
    index = _step_index(trace, step)
    record, parts = trace.steps[index], score_parts(trace, index)
    decoder = trace_decoder(trace)
    steered = decoder is not None and decoder.steers
    beams = is_beam_trace(trace) or steered
    rows = _shown_rows(record, parts["score"], max_candidates)
    labels = []
    for r in rows:
        label = f"{_token(record.tokens[r])}  #{r + 1}"
        if beams:
            label = f"beam {record.beam[r]} + {label}"
        if r == record.chosen:
            label = CHOSEN_MARK + label + (" (forced)" if record.forced else "")
        labels.append(label)
    if ax is None:  # a fixed layout in inches: fast to draw, as a widget redraws it at every step
        left, bottom, top, height = 0.35 + 0.075 * max(len(x) for x in labels), 1.05, 0.35, 0.3 * len(rows)
        total_height = height + bottom + top
        ax = Figure(figsize=(7.5, total_height)).add_axes(
            (left / 7.5, bottom / total_height, 1 - (left + 0.15) / 7.5, height / total_height))
    y = np.arange(len(rows))
    widths = {name: parts[name][rows] for name in parts}
    edge = ["black" if r == record.chosen else "white" for r in rows]
    lw = [2.0 if r == record.chosen else 0.5 for r in rows]

    if _is_candidate_trace(trace):
        ax.barh(y, widths["lm"], edgecolor=edge, linewidth=lw, label=LM_LABEL, **LM_STYLE)
        if _uses_clip(trace):
            ax.barh(y, widths["clip"], left=widths["lm"], edgecolor=edge, linewidth=lw, label=CLIP_LABEL,
                    **CLIP_STYLE)
        ax.barh(y, widths["penalty"], edgecolor=edge, linewidth=lw, label=PENALTY_LABEL, **PENALTY_STYLE)
        ax.plot(widths["score"], y, linestyle="none", marker="D", markersize=7, color="black",
                markeredgecolor="white", label=TOTAL_LABEL, zorder=4)
        for yi, total in zip(y, widths["score"]):
            ax.annotate(f"{total:+.3f}", (total, yi), xytext=(7, 0), textcoords="offset points", va="center",
                        fontsize=8)
        ax.set_xlabel("contribution to the score  (score = sum of the parts)")
    elif steered:
        height = 0.8 / len(ZEROCAP_BARS)
        for j, (column, label, style) in enumerate(ZEROCAP_BARS):
            widths[column] = np.asarray(getattr(record, column), dtype=float)[rows]
            ax.barh(y + (j - 1) * height, widths[column], height=height, edgecolor=edge, linewidth=lw, label=label,
                    **style)
        target = np.asarray(record.clip_score, dtype=float)[rows]  # NaN where nothing was steered: no tick
        ax.plot(target, y, linestyle="none", marker="|", markersize=14, markeredgewidth=2.5,
                color=OKABE_ITO["vermillion"], label=TARGET_LABEL, zorder=4)
        # the axis limits below read lm + clip and score: the largest value drawn, zeros
        widths["lm"] = np.nanmax([widths[c] for c, _, _ in ZEROCAP_BARS] + [np.nan_to_num(target)], axis=0)
        widths["clip"] = widths["score"] = np.zeros(len(rows))
        ax.set_xlabel("probability of v  (beams are ranked by Σ log q / length)")
    else:
        ax.barh(y, widths["lm"], edgecolor=edge, linewidth=lw, label=PROB_LABEL, **LM_STYLE)
        for yi, p in zip(y, widths["lm"]):
            ax.annotate(f"{p:.3f}", (p, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel("p(v | its beam)  (beams are ranked by their summed log-probabilities)" if beams
                      else "p(v|x)  (this decoder scores by probability alone)")

    if record.chosen in rows:
        i = rows.index(record.chosen)
        ax.axhspan(i - 0.5, i + 0.5, facecolor=OKABE_ITO["yellow"], alpha=0.35, zorder=0, label=CHOSEN_LABEL)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels)
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r == record.chosen:
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    lo = min(0.0, float(np.nanmin(widths["penalty"])) if len(rows) else 0.0)
    hi = max(float(np.nanmax(widths["lm"] + widths["clip"])), float(np.nanmax(widths["score"])), 1e-6)
    span = hi - lo
    ax.set_xlim(lo - 0.05 * span, hi + 0.22 * span)
    shown = f", {len(rows)} of {record.k} shown" if len(rows) < record.k else ""
    ax.set_title(f"step {record.step}: “{_shorten(record.text, 40)}” + ?   ({_settings_line(trace)}{shown})",
                 fontsize=9, loc="left")
    _legend_below(ax, offset=30, ncols=3)
    ax.grid(axis="x", alpha=0.3)
    return ax.figure


# -- a whole decode ---------------------------------------------------------------------------
def decode_matrix(trace: Trace, column: str = "score") -> np.ndarray:
    """steps x candidates (rank order) of one trace column, NaN where a step has fewer candidates."""
    if column not in HEATMAP_COLUMNS:
        raise MagicEduError(f"column must be one of {', '.join(HEATMAP_COLUMNS)}; got {column!r}")
    width = max((s.k for s in trace.steps), default=0)
    matrix = np.full((len(trace.steps), width), np.nan)
    for t, record in enumerate(trace.steps):
        values = np.asarray(getattr(record, column), dtype=float)
        if column == "penalty_position":
            values = np.where(values < 0, np.nan, values)
        matrix[t, : len(values)] = values
    return matrix


def plot_decode(trace: TraceLike, column: str = "score", *, ax: Axes | None = None,
                annotate: bool | None = None) -> MplFigure:
    """A steps x candidates heat map of ``column`` (score, lm_prob, degeneration_penalty,
    clip_score, clip_cosine or penalty_position), the chosen candidate of each step joined by a
    line of circles (squares where forced). ``annotate``: write the tokens in the cells
    (default: when the map is small enough to read)."""
    trace = as_trace(trace)
    if not trace.steps:
        raise MagicEduError("trace: no steps to draw yet")
    matrix = decode_matrix(trace, column)
    if np.all(np.isnan(matrix)):
        raise MagicEduError(f"column {column!r}: this {trace.settings.get('decoder')} trace does not record it")
    n, k = matrix.shape
    fig, ax = _figure(ax, (min(3.0 + 0.75 * k, 16.0), min(2.0 + 0.32 * n, 14.0)))
    image = ax.imshow(matrix, aspect="auto", cmap=VIRIDIS, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=column, shrink=0.9)

    if annotate is None:
        annotate = k <= 12 and n <= 40
    if annotate:
        finite = matrix[np.isfinite(matrix)]
        middle = (finite.min() + finite.max()) / 2
        for t, record in enumerate(trace.steps):
            for i, tok in enumerate(record.tokens):
                dark = np.isfinite(matrix[t, i]) and matrix[t, i] < middle
                ax.text(i, t, _token(tok, 11), ha="center", va="center", fontsize=7, zorder=6,
                        color="white" if dark else "black")

    path = output_path(trace)  # the chosen candidates (for beam search: the returned hypothesis's)
    steps = np.array([t for t, _ in path], dtype=int)
    chosen = np.array([i for _, i in path], dtype=int)
    ax.plot(chosen, steps, color="white", linewidth=1.0, alpha=0.9, marker="o", markersize=18,
            markerfacecolor="none", markeredgecolor="black", markeredgewidth=2.0, label=PATH_LABEL, zorder=4)
    ax.plot(chosen, steps, linestyle="none", marker="o", markersize=21, markerfacecolor="none",
            markeredgecolor="white", markeredgewidth=1.0, zorder=4)
    forced = np.array([trace.steps[t].forced for t in steps], dtype=bool)
    if forced.any():
        ax.plot(chosen[forced], steps[forced], linestyle="none", marker="s", markersize=22, markerfacecolor="none",
                markeredgecolor=OKABE_ITO["orange"], markeredgewidth=2.5, label=FORCED_LABEL, zorder=5)
    taken = dict(path)
    ax.set_yticks(np.arange(n), [f"{s.step}  {_token(s.tokens[taken.get(t, s.chosen)])}"
                                 for t, s in enumerate(trace.steps)], fontsize=8)
    ax.set_xticks(np.arange(k), [f"#{i + 1}" for i in range(k)], fontsize=8)
    ax.set_xlabel("candidate (rank by p(v|x))")
    ax.set_ylabel("step  (token taken)")
    ax.set_title(f"{column} of every candidate, every step  ({_settings_line(trace)})", fontsize=9, loc="left")
    _legend_below(ax, offset=30, ncols=2)
    return fig


# -- degeneration -----------------------------------------------------------------------------
def plot_degeneration(trace: TraceLike, *, ax: Axes | None = None) -> MplFigure:
    """cos(h_t, h_j) between each generated token t (rows) and every earlier position j
    (columns: prompt, then generated tokens); a square marks, in every row, the position that
    gave that step's degeneration penalty (the most similar one)."""
    trace = as_trace(trace)
    matrix, positions = degeneration_matrix(trace)
    n, width = matrix.shape
    p = len(trace.prefix_ids)
    fig, ax = _figure(ax, (min(max(5.5, 2.8 + 0.3 * width), 16.0), min(max(3.5, 2.2 + 0.3 * n), 14.0)))
    off_diagonal = matrix.copy()
    off_diagonal[np.arange(n), p + np.arange(n)] = np.nan
    low = float(np.nanmin(off_diagonal)) if np.isfinite(off_diagonal).any() else 0.0
    image = ax.imshow(matrix, aspect="auto", cmap=CIVIDIS, vmin=min(low, 0.99), vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cos(h_t, h_j)", shrink=0.9)
    ax.plot(positions, np.arange(n), linestyle="none", marker="s", markersize=10, markerfacecolor="none",
            markeredgecolor=OKABE_ITO["vermillion"], markeredgewidth=2.5, label=PENALTY_PAIR_LABEL)
    ax.plot(positions, np.arange(n), linestyle="none", marker="x", markersize=5, color="white")
    ax.axvline(p - 0.5, color="black", linestyle="--", linewidth=1, label="prompt | generated")
    columns = [_token(t) for t in trace.prefix_tokens] + [_token(s.chosen_token) for s in trace.steps]
    ax.set_xticks(np.arange(width), columns, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n), [f"{s.step}  {_token(s.chosen_token)}" for s in trace.steps],
                  fontsize=7)
    ax.set_xlabel("earlier position j")
    ax.set_ylabel("generated token (step)")
    ax.set_title("degeneration: how similar each new token is to what came before", fontsize=9, loc="left")
    _legend_below(ax, offset=62, ncols=1)
    return fig


# -- CLIP -------------------------------------------------------------------------------------
def _clip_label(record: StepRecord, i: int) -> str:
    """The text CLIP scored for candidate i; the end-of-text candidate is scored as "stop here"."""
    text = f"“{_shorten(record.clip_text[i], 34)}”" if record.clip_text[i] else "“” (empty)"
    return text + (f"  {token_label(record.tokens[i])}" if _is_special(record.tokens[i]) else "")


def plot_clip_step(trace: TraceLike, step: int = -1, image: ImageLike | None = None, *,
                   max_texts: int = 12) -> Figure:
    """One step of MAGIC's image term: the image (if given; a trace does not store it) beside
    the texts CLIP scored, sorted by their CLIP score (softmax over the k), with their cosines.
    The chosen candidate's text is hatched and marked with ▶."""
    trace = as_trace(trace)
    index = _step_index(trace, step)
    record = trace.steps[index]
    if not _has_clip(record):
        raise MagicEduError(f"CLIP: this {trace.settings.get('decoder')} trace records no CLIP scores "
                            "(only MAGIC search uses CLIP)")
    score = np.asarray(record.clip_score, dtype=float)
    order = list(np.argsort(-score, kind="stable")[:max_texts])
    if record.chosen not in order:
        order.append(record.chosen)
    fig = Figure(figsize=(9.5 if image is not None else 7.0, 1.4 + 0.3 * len(order)), layout="constrained")
    if image is not None:
        ax_img, ax = fig.subplots(1, 2, width_ratios=[1, 2.6])
        ax_img.imshow(load_image(image))
        ax_img.set_axis_off()
        ax_img.set_title("image", fontsize=9)
    else:
        ax = fig.add_subplot()
    y = np.arange(len(order))
    hatches = ["///" if i == record.chosen else "" for i in order]
    bars = ax.barh(y, score[order], color=CLIP_STYLE["color"], edgecolor="black", label="CLIP score")
    for bar, hatch, i in zip(bars, hatches, order):
        bar.set_hatch(hatch)
        bar.set_linewidth(2.0 if i == record.chosen else 0.5)
        middle = bar.get_y() + bar.get_height() / 2
        ax.annotate(f"{score[i]:.3f}  (cos {record.clip_cosine[i]:.3f})", (score[i], middle), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    labels = [(CHOSEN_MARK if i == record.chosen else "") + _clip_label(record, i) for i in order]
    ax.set_yticks(y, labels, fontsize=8)
    for tick, i in zip(ax.get_yticklabels(), order):
        if i == record.chosen:
            tick.set_fontweight("bold")
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, max(float(score.max()), 1e-6) * 1.45)
    ax.set_xlabel("CLIP score: softmax over the k candidates of logit_scale · cos(image, text)")
    ax.set_title(f"step {record.step}: the texts CLIP scored", fontsize=9, loc="left")
    return fig


def plot_clip_over_decode(trace: TraceLike) -> Figure:
    """Over a MAGIC decode: the chosen token's CLIP score (and the best candidate's), and the
    cosine between the image and the whole text so far."""
    trace = as_trace(trace)
    records = [r for r in trace.steps if _has_clip(r)]
    if not records:
        raise MagicEduError(f"CLIP: this {trace.settings.get('decoder')} trace records no CLIP scores "
                            "(only MAGIC search uses CLIP)")
    x = np.array([r.step for r in records])
    chosen = np.array([r.clip_score[r.chosen] for r in records])
    best = np.array([np.nanmax(r.clip_score) for r in records])
    text_cos = np.array([r.clip_cosine[r.chosen] for r in records])
    fig = Figure(figsize=(min(3.0 + 0.45 * len(x), 16.0), 4.6), layout="constrained")
    ax_tok, ax_text = fig.subplots(2, 1, sharex=True)
    ax_tok.plot(x, chosen, color=OKABE_ITO["blue"], marker="o", label="chosen token's CLIP score")
    ax_tok.plot(x, best, color=OKABE_ITO["orange"], marker="v", linestyle=":", label="best candidate's CLIP score")
    ax_tok.set_ylabel("CLIP score\n(softmax over k)", fontsize=8)
    ax_tok.legend(fontsize=7, loc="best")
    ax_tok.set_title("CLIP over the decode", fontsize=9, loc="left")
    ax_text.plot(x, text_cos, color=OKABE_ITO["vermillion"], marker="s", linestyle="--",
                 label="cos(image, whole text so far)")
    ax_text.set_ylabel("cosine", fontsize=8)
    ax_text.ticklabel_format(axis="y", useOffset=False)
    ax_text.legend(fontsize=7, loc="best")
    ax_text.set_xticks(x, [f"{t}\n{_token(r.chosen_token, 10)}" for t, r in zip(x, records)],
                       fontsize=7)
    ax_text.set_xlabel("step and token taken")
    for a in (ax_tok, ax_text):
        a.grid(alpha=0.3)
    return fig


# -- decoders side by side --------------------------------------------------------------------
def _named_traces(traces: Sequence[TraceLike] | Mapping[str, TraceLike],
                  labels: Sequence[str] | None) -> tuple[list[str], list[Trace]]:
    if isinstance(traces, Mapping):
        labels, items = list(traces), list(traces.values())
    else:
        items = list(traces)
    loaded = [as_trace(t) for t in items]
    if not loaded:
        raise MagicEduError("traces: give at least one trace")
    if labels is None:
        labels = [str(t.settings.get("decoder", f"decode {i}")) for i, t in enumerate(loaded)]
    if len(labels) != len(loaded):
        raise MagicEduError(f"labels: {len(labels)} labels for {len(loaded)} traces")
    return list(labels), loaded


def split_table(traces: Sequence[Trace], step: int) -> list[list[str]]:
    """Per trace, the ``step``-th output token: the token, its rank among the step's candidates,
    p(v|x), penalty, CLIP score, total (for beam search: its hypothesis, traced back)."""
    rows = []
    for trace in traces:
        path = output_path(trace)
        if step >= len(path):
            rows.append(["(ended)", "", "", "", "", ""])
            continue
        t, i = path[step]
        r = trace.steps[t]
        numbers = [r.lm_prob[i], r.degeneration_penalty[i], r.clip_score[i], r.score[i]]
        rows.append([f"“{_token(r.tokens[i])}”", f"#{i + 1}", *("–" if np.isnan(x) else f"{x:.3f}" for x in numbers)])
    return rows


def plot_decoders(traces: Sequence[TraceLike] | Mapping[str, TraceLike], labels: Sequence[str] | None = None,
                  *, split: int | None = None, fig: MplFigure | SubFigure | None = None) -> MplFigure:
    """The same image decoded by several decoders, one lane of tokens each, and why they differ.

    The first lane is the reference: in every other lane the tokens it shares with the reference
    are grey, and a bold, thick box marks where it leaves the reference path. A dashed line marks
    ``split`` (default: the first step where the paths are not all equal), and the table below
    shows what each decoder took there and why: its rank by p, p(v|x), penalty, CLIP score and
    total score.
    """
    labels, traces = _named_traces(traces, labels)
    paths = [chosen_ids(t) for t in traces]
    if split is None:
        split = divergence_step(paths)
    leaves = [None] + [divergence_step([paths[0], p]) for p in paths[1:]]  # where each lane leaves lane 0
    shared_until = divergence_step(paths)  # all lanes agree before this step
    width = max(max((len(p) for p in paths), default=0), 1)
    if fig is None:
        fig = Figure(figsize=(min(2.5 + 0.62 * width, 18.0), 1.3 + 0.5 * len(traces) + 0.3 * (len(traces) + 1)),
                     layout="constrained")
    ax, ax_table = fig.subplots(2, 1, height_ratios=[len(traces) + 0.6, 0.5 * (len(traces) + 1)])
    for row, trace in enumerate(traces):
        same_until = shared_until if row == 0 else leaves[row]
        for t, (step_index, i) in enumerate(output_path(trace)):
            shared = same_until is None or t < same_until
            leaving = row > 0 and t == leaves[row]
            ax.text(t, row, _token(trace.steps[step_index].tokens[i], 9), ha="center", va="center", fontsize=8,
                    fontweight="bold" if leaving else "normal",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "#DDDDDD" if shared else "white",
                          "edgecolor": OKABE_ITO["grey"] if shared else "black", "linewidth": 2.2 if leaving else 0.8})
    if split is not None:
        ax.axvline(split - 0.5, color=OKABE_ITO["vermillion"], linestyle="--", linewidth=2,
                   label=f"step {split}: explained in the table")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(len(traces) - 0.5, -0.5)
    ax.set_yticks(np.arange(len(traces)), labels)
    ax.set_xticks(np.arange(width), [str(t) for t in range(width)], fontsize=7)
    ax.set_xlabel("step")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if shared_until is None:
        title = "decoders side by side: every decoder wrote the same tokens"
    else:
        title = f"decoders side by side (bold box: where a lane leaves the {labels[0]} path)"
    ax.set_title(title, fontsize=9, loc="left")
    ax_table.set_axis_off()
    if split is not None:
        table = ax_table.table(cellText=split_table(traces, split), rowLabels=labels,
                               colLabels=["took", "rank by p", "p(v|x)", "penalty", "CLIP score", "score"],
                               loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        ax_table.set_title(f"why: what each decoder took at step {split}", fontsize=8, loc="left")
    return fig.figure


# -- beam search ------------------------------------------------------------------------------
RESULT_LABEL = "returned hypothesis (while searching: the best beam)"


def plot_beams(trace: TraceLike, step: int | None = None, *, ax: Axes | None = None) -> MplFigure:
    """Beam search's tree up to ``step`` (default: the last), one column per step: the beams that
    go on (round boxes, beam 0 on top, with their summed log-probability) and the hypotheses
    that finished there (square boxes below them, with their score log p / length ** length
    penalty), each joined to the beam it extends; the prefix is the root on the left. The
    returned hypothesis (while none has finished, the best beam) is drawn thick. Candidates
    that were dropped are not drawn (the trace's table has them all)."""
    trace = as_trace(trace)
    if not is_beam_trace(trace):
        raise MagicEduError(f"trace: plot_beams needs a beam search trace; this one is "
                            f"{trace.settings.get('decoder')!r}")
    if not trace.steps:
        raise MagicEduError("trace: no steps to draw yet")
    last = _step_index(trace, -1 if step is None else step)
    shown = Trace(trace.settings, trace.prefix_ids, trace.prefix_tokens, trace.steps[: last + 1])
    n = max(max(s.next_beam, default=-1) for s in shown.steps) + 1
    nodes = {}  # (step, candidate) -> (x, y)
    for t, record in enumerate(shown.steps):
        finished = 0
        for i in range(record.k):
            if record.next_beam[i] >= 0:
                nodes[(t, i)] = (t + 1, record.next_beam[i])
            elif np.isfinite(record.hypothesis_score[i]):
                nodes[(t, i)] = (t + 1, n + finished)
                finished += 1
    rows = max((y for _, y in nodes.values()), default=0) + 1
    fig, ax = _figure(ax, (min(max(7.5, 1.8 + 1.25 * (last + 2)), 18.0), min(1.6 + 0.55 * rows, 12.0)))
    result = set(output_path(shown))
    for (t, i), (x, y) in nodes.items():
        record = shown.steps[t]
        on_result = (t, i) in result
        ax.plot([x - 1, x], [record.beam[i], y], color=OKABE_ITO["orange"] if on_result else OKABE_ITO["grey"],
                linewidth=3.0 if on_result else 1.0, zorder=1)
        kept = record.next_beam[i] >= 0
        number = f"{record.score[i]:.2f}" if kept else f"score {record.hypothesis_score[i]:.2f}"
        ax.text(x, y, f"{_token(record.tokens[i], 10)}\n{number}", ha="center", va="center", fontsize=7, zorder=3,
                fontweight="bold" if on_result else "normal",
                bbox={"boxstyle": "round,pad=0.3" if kept else "square,pad=0.3",
                      "facecolor": "white" if kept else "#DDDDDD",
                      "edgecolor": "black" if on_result else OKABE_ITO["grey"], "linewidth": 2.0 if on_result else 0.8})
    prefix = " ".join(_token(t) for t in shown.prefix_tokens)
    ax.text(0, 0, _shorten(prefix, 14), ha="center", va="center", fontsize=7, zorder=3,
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "#EEEEEE", "edgecolor": "black"})
    if n < rows:
        ax.axhline(n - 0.5, color="black", linestyle=":", linewidth=0.8)
    ax.plot([], [], color=OKABE_ITO["orange"], linewidth=3.0, label=RESULT_LABEL)
    ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black",
            label="beam that goes on (summed log p)")
    ax.plot([], [], linestyle="none", marker="s", markerfacecolor="#DDDDDD", markeredgecolor="black",
            label="finished hypothesis (its score)")
    ax.set_xlim(-0.6, last + 1.6)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks(np.arange(last + 2), ["prefix", *(str(t) for t in range(last + 1))], fontsize=8)
    ax.set_yticks(np.arange(rows), [f"beam {y}" if y < n else "finished" if y == n else "" for y in range(rows)],
                  fontsize=8)
    ax.set_xlabel("step")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"beam search, step by step  ({_settings_line(trace)})", fontsize=9, loc="left")
    _legend_below(ax, offset=30, ncols=3)
    return fig


# -- sweeps -----------------------------------------------------------------------------------
def plot_sweep(frame: Any, value: str = "clip_cosine", x: str | None = "alpha", y: str | None = "beta",
               facet: str | None = "k", *, fig: MplFigure | SubFigure | None = None) -> MplFigure:
    """Heat maps of ``value`` over an ``x`` x ``y`` grid (``y`` None: one row; ``x`` None too: one
    cell), one per ``facet``
    value (e.g. per k; None or a column the frame lacks: one map), cells written with their values
    (the mean where several rows share a cell); a star marks the largest value of each map."""
    if value not in frame.columns:
        raise MagicEduError(f"value must be one of the sweep's columns {list(frame.columns)}; got {value!r}")
    for name, column in (("x", x), ("y", y)):
        if column is not None and column not in frame.columns:
            raise MagicEduError(f"{name} must be one of the sweep's columns {list(frame.columns)}; got {column!r}")
    frame = frame.assign(_row="", _column="")
    x_column, y_column = x or "_column", y or "_row"
    facets = sorted(frame[facet].unique()) if facet is not None and facet in frame.columns else [None]
    if fig is None:
        fig = Figure(figsize=(0.6 + 3.6 * len(facets), 3.4 if y is not None else 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(facets), squeeze=False)[0])
    for ax, f in zip(axes, facets):
        sub = frame if f is None else frame[frame[facet] == f]
        table = sub.pivot_table(index=y_column, columns=x_column, values=value, aggfunc="mean")
        grid = table.to_numpy(dtype=float)
        image = ax.imshow(grid, aspect="auto", cmap=VIRIDIS, origin="lower", interpolation="nearest")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, path_effects=_outlined())
        if np.isfinite(grid).any():
            i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
            ax.plot(j + 0.32, i + 0.3, marker="*", markersize=13, color=OKABE_ITO["orange"], markeredgecolor="black",
                    linestyle="none", label=f"largest {value}")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7)
        if x is None:
            ax.set_xticks([])
        else:
            ax.set_xticks(np.arange(len(table.columns)), [f"{c:g}" for c in table.columns], fontsize=8)
            ax.set_xlabel(x)
        if y is None:
            ax.set_yticks([])
        else:
            ax.set_yticks(np.arange(len(table.index)), [f"{r:g}" for r in table.index], fontsize=8)
            ax.set_ylabel(y)
        ax.set_title(value + ("" if f is None else f"  ({facet}={f:g})"), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig.figure


# -- why this token: decision maps, the room of each choice, occlusion ----------------------------------
REGION_COLOURS = ("orange", "sky", "green", "yellow", "blue", "vermillion", "purple", "grey")
REGION_HATCHES = ("", "//", "..", "xx")  # after the eight colours: the same colours hatched
SETTING_LABEL = "this step's setting"


def _region_style(n: int) -> dict[str, Any]:
    """The n-th region's fill: an Okabe-Ito colour, hatched from the ninth region on."""
    return {"facecolor": OKABE_ITO[REGION_COLOURS[n % len(REGION_COLOURS)]],
            "hatch": REGION_HATCHES[(n // len(REGION_COLOURS)) % len(REGION_HATCHES)]}


def _region_label(record: StepRecord, index: int, own: int) -> str:
    return f"{CHOSEN_MARK if index == own else ''}{_token(record.tokens[index])} #{index + 1}"


def plot_decision_map(trace: TraceLike, step: int = -1, *, beta_max: float | None = None,
                      ax: Axes | None = None) -> MplFigure:
    """Which candidate of one step wins at every alpha in [0, 1] and beta in [0, ``beta_max``]
    (:func:`~magic_edu.tools.explain.decision_regions`; default beta_max: every region shows). Each
    region is drawn as its exact polygon, coloured (Okabe-Ito, hatched after eight) and labelled
    inside with its token and rank (▶: the decoder's choice at the step's setting); a star marks
    the step's (alpha, beta), dotted lines the two slices of the flip points. Contrastive search
    has no CLIP term: the map is then the alpha line alone."""
    trace = as_trace(trace)
    dmap = explain.decision_regions(trace, step, beta_max=beta_max)
    record = dmap.record
    own = dmap.winner(dmap.alpha, dmap.beta)
    one_d = dmap.beta is None
    fig, ax = _figure(ax, (6.8, 2.2) if one_d else (6.8, 5.2))
    for n, region in enumerate(dmap.regions):
        style, label = _region_style(n), _region_label(record, region.index, own)
        if one_d:
            ax.barh(0.0, region.alpha.high - region.alpha.low, left=region.alpha.low, height=1.0,
                    edgecolor="white", linewidth=1.5, label=label, **style)
        else:
            ax.add_patch(Polygon(region.polygon, closed=True, edgecolor="white", linewidth=1.5, label=label, **style))
        ax.text(*region.label_point, label, ha="center", va="center", fontsize=8, path_effects=_outlined(),
                fontweight="bold" if region.index == own else "normal", zorder=5)
    settings = f"α = {dmap.alpha:g}" + ("" if one_d else f", β = {dmap.beta:g}")
    ax.plot(dmap.alpha, 0.0 if one_d else dmap.beta, linestyle="none", marker="*", markersize=16, color="black",
            markeredgecolor="white", label=f"{SETTING_LABEL} ({settings})", zorder=6)
    ax.axvline(dmap.alpha, color="black", linestyle=":", linewidth=1)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("α: weight of the degeneration penalty")
    if one_d:
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        title = (f"step {record.step}: which token wins at each α (contrastive search has no CLIP term: "
                 "only α changes the choice)")
    else:
        ax.axhline(dmap.beta, color="black", linestyle=":", linewidth=1)
        ax.set_ylim(0.0, dmap.beta_max)
        ax.set_ylabel("β: weight of the CLIP score")
        title = f"step {record.step}: which token wins at each (α, β)"
    if dmap.on_boundaries:
        names = ", ".join(f"“{_token(record.tokens[i])}”" for i in dmap.on_boundaries)
        title += f"\nwinning only on a boundary (a tie): {names}"
    ax.set_title(title, fontsize=9, loc="left")
    _legend_below(ax, offset=30, ncols=3)
    return fig


ROOM_LABELS = {
    "decided": "the image decided: at β = 0 another token wins",
    "flips": "a larger β would flip it",
    "holds": "no β changes it",
    "never": "forced: wins at no β",
}
ROOM_STYLES = {"decided": {"color": OKABE_ITO["orange"], "hatch": "//"}, "flips": {"color": OKABE_ITO["sky"]},
               "holds": {"color": OKABE_ITO["green"], "hatch": ".."}}


def _room_kind(room: explain.ChoiceRoom) -> str:
    if room.beta is None or room.beta.empty:
        return "never"
    return "decided" if room.image_decided else "flips" if room.beta_flips else "holds"


def plot_choice_room(trace: TraceLike) -> MplFigure:
    """Over a contrastive or MAGIC decode, how much room each choice had: per step, the beta interval
    (alpha fixed at the decode's) and the alpha interval (beta fixed) in which the token taken wins
    (:func:`~magic_edu.tools.explain.choice_room`), against the decode's setting (the dashed line);
    the beta axis is linear up to the decode's beta and logarithmic above (a flip can be far away).
    Beta bars are coloured by what the image did: it decided (without the CLIP term another token
    wins), a larger beta would flip the choice, or no beta changes it; an arrow marks a bar that
    goes on to infinity. Contrastive search has no CLIP term: the alpha panel alone."""
    trace = as_trace(trace)
    rooms = explain.choice_room(trace)
    if not rooms:
        raise MagicEduError("trace: no steps to draw yet")
    alpha, beta = float(trace.settings["alpha"]), rooms[0].beta is not None
    x = np.arange(len(rooms))
    fig = Figure(figsize=(min(5.0 + 0.5 * len(rooms), 16.0), 6.0 if beta else 3.6), layout="constrained")
    axes = fig.subplots(2 if beta else 1, 1, sharex=True, squeeze=False)[:, 0]
    if beta:
        ax, setting = axes[0], float(trace.settings["beta"])
        ends = [v for r in rooms if not r.beta.empty for v in (r.beta.low, r.beta.high) if np.isfinite(v)]
        top = 1.3 * max([*ends, setting, 0.1])
        for kind, label in ROOM_LABELS.items():
            shown = [n for n, r in enumerate(rooms) if _room_kind(r) == kind]
            if not shown:
                continue
            if kind == "never":
                ax.plot(x[shown], [setting] * len(shown), linestyle="none", marker="x", markersize=9,
                        color=OKABE_ITO["vermillion"], label=label)
                continue
            low = np.array([rooms[n].beta.low for n in shown])
            high = np.minimum([rooms[n].beta.high for n in shown], top)
            ax.bar(x[shown], high - low, bottom=low, width=0.6, edgecolor="black", linewidth=0.6, label=label,
                   **ROOM_STYLES[kind])
        endless = [n for n, r in enumerate(rooms) if r.beta is not None and np.isinf(r.beta.high)]
        ax.plot(x[endless], [top] * len(endless), linestyle="none", marker="^", color="black", markersize=6,
                label="goes on to β = ∞")
        ax.axhline(setting, color="black", linestyle="--", linewidth=1, label=f"the decode's β = {setting:g}")
        ax.set_yscale("symlog", linthresh=max(setting, 0.1))  # linear up to the decode's β, then logarithmic
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # 0.1, 1, 10 (no mathtext fonts)
        ax.set_ylim(0.0, top * 1.05)
        ax.set_ylabel(f"β for which the token\ntaken wins (α = {alpha:g})", fontsize=8)
    ax = axes[-1]
    kinds = ["every α" if r.alpha.low == 0 and r.alpha.high == 1 and not r.alpha.empty else "some α" for r in rooms]
    for kind, style in (("every α", ROOM_STYLES["holds"]), ("some α", ROOM_STYLES["flips"])):
        shown = [n for n, k in enumerate(kinds) if k == kind and not rooms[n].alpha.empty]
        if shown:
            low = np.array([rooms[n].alpha.low for n in shown])
            high = np.array([rooms[n].alpha.high for n in shown])
            label = "no α changes it" if kind == "every α" else "another α would flip it"
            ax.bar(x[shown], high - low, bottom=low, width=0.6, edgecolor="black", linewidth=0.6, label=label, **style)
    forced = [n for n, r in enumerate(rooms) if r.alpha.empty]
    if forced:
        ax.plot(x[forced], [alpha] * len(forced), linestyle="none", marker="x", markersize=9,
                color=OKABE_ITO["vermillion"], label="forced: wins at no α")
    ax.axhline(alpha, color="black", linestyle="--", linewidth=1, label=f"the decode's α = {alpha:g}")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("α for which the token\ntaken wins" + (f" (β = {trace.settings['beta']:g})" if beta else ""),
                  fontsize=8)
    fig.suptitle(f"how much room each choice had  ({_settings_line(trace)}"
                 + (")" if beta else "; no CLIP term: only α)"), fontsize=9)
    handles = {}
    for a in axes:
        handles.update({h.get_label(): h for h in a.get_legend_handles_labels()[0]})
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2, fontsize=7,
               frameon=False)
    ax.set_xticks(x, [f"{r.step}\n{_token(r.token, 10)}{' (forced)' if r.forced else ''}" for r in rooms],
                  fontsize=7)
    ax.set_xlabel("step and token taken")
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    return fig


OCCLUSION_CMAP = colormaps["PuOr"]  # diverging, colour-blind safe


def plot_occlusion(occlusion: explain.Occlusion) -> Figure:
    """An occlusion map (:func:`~magic_edu.tools.explain.occlusion_map`) over its image: beside the
    image, the image in grey under the map in a diverging colour map (orange: covering the place
    lowers cos(I, text a) - cos(I, text b), it made CLIP prefer text a; purple: text b), with a
    colour bar; a square marks the patch whose covering lowers it most."""
    if not isinstance(occlusion, explain.Occlusion):
        raise MagicEduError(f"occlusion must be an Occlusion (from occlusion_map or step_occlusion); "
                            f"got {type(occlusion).__name__}")
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    ax_img, ax = fig.subplots(1, 2)
    ax_img.imshow(occlusion.image)
    ax_img.set_title("image", fontsize=9)
    ax.imshow(occlusion.image.convert("L"), cmap="gray", vmin=0, vmax=255)
    extent = max(float(np.abs(occlusion.map).max()), 1e-12)
    shown = ax.imshow(occlusion.map, cmap=OCCLUSION_CMAP.reversed(), vmin=-extent, vmax=extent, alpha=0.7,
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.85, label="drop of cos(I, a) − cos(I, b) when covered")
    r, q = np.unravel_index(int(np.argmax(occlusion.drops)), occlusion.drops.shape)
    ax.add_patch(Rectangle((occlusion.lefts[q] - 0.5, occlusion.tops[r] - 0.5), occlusion.patch, occlusion.patch,
                           fill=False, edgecolor="black", linewidth=2, label="covering this lowers it most"))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.04), fontsize=7, frameon=False)
    ax.set_title(f"a: “{_shorten(occlusion.text_a, 30)}”\nb: “{_shorten(occlusion.text_b, 30)}”  "
                 f"(cos a − cos b = {occlusion.margin:+.3f})", fontsize=8, loc="left")
    for a in (ax_img, ax):
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("what in the image makes CLIP prefer text a over text b (patches covered one at a time)",
                 fontsize=9)
    return fig
