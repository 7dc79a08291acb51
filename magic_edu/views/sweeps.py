"""Plots of a sweep (:mod:`magic_edu.tools.sweep`): what the settings do over a whole image set.

* :func:`plot_frontier`: grounding against fluency, one point per setting, MAGIC's settings that
  differ only in ``beta`` joined in order of beta (one line per alpha, k, ...), the other decoders
  as single marks, and the settings no other beats on both axes outlined (the frontier).
* :func:`plot_heatmap`: a summary column over an alpha x beta grid (one map per k).
* :func:`disagreements`, :func:`plot_disagreements`: image by image, where two settings part ways:
  per kind of image, how often each one does better, and the images where they differ most.

Each takes the table or the summary that :func:`~magic_edu.tools.sweep.run_sweep` returns (or
:func:`~magic_edu.tools.sweep.load_sweep` reads back); the toy world's columns (``grounded``,
``fluent``) are the defaults where present, else CLIP-S and the LM's mean log-probability.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

from ..errors import MagicEduError
from .plots import OKABE_ITO, Figure, plot_sweep

LABELS = {"grounded": "grounded (names an object of the scene)", "all_right": "all right (every object, nothing else)",
          "fluent": "fluent (a sentence the templates could write)", "clip_s": "CLIP-S",
          "ref_clip_s": "RefCLIP-S", "lm_logprob": "mean log p(token) under the LM", "diversity": "diversity",
          "CIDEr": "CIDEr", "BLEU-4": "BLEU-4"}
LINE_COLOURS = ("blue", "orange", "green", "vermillion", "purple", "sky", "yellow")
MARKERS = ("s", "^", "D", "v", "P", "X", "<", ">")


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and pd.to_numeric(frame[column], errors="coerce").notna().any()


def _default(frame: pd.DataFrame, *columns: str) -> str:
    for column in columns:
        if _has(frame, column):
            return column
    raise MagicEduError(f"the frame has none of the columns {', '.join(columns)}")


def _check_column(frame: pd.DataFrame, column: str, what: str) -> None:
    if column not in frame.columns:
        raise MagicEduError(f"{what} must be one of the columns {list(frame.columns)}; got {column!r}")


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[MplFigure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def _varied(summary: pd.DataFrame, exclude: tuple[str, ...]) -> list[str]:
    """The parameter columns whose values differ between the rows (NaN counts as a value)."""
    from ..registry import DECODERS

    params = {p for d in DECODERS.values() for p in d.param_names} | {"max_new_tokens"}
    return [c for c in summary.columns if c in params and c not in exclude
            and summary[c].astype(str).nunique() > 1]


def pareto(summary: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Whether each row is on the frontier: no other row is at least as high on both ``x`` and ``y``
    and higher on one."""
    xs, ys = summary[x].to_numpy(float), summary[y].to_numpy(float)
    out = []
    for i in range(len(summary)):
        beaten = (xs >= xs[i]) & (ys >= ys[i]) & ((xs > xs[i]) | (ys > ys[i]))
        out.append(bool(np.isfinite(xs[i]) and np.isfinite(ys[i]) and not beaten.any()))
    return pd.Series(out, index=summary.index)


def plot_frontier(summary: pd.DataFrame, x: str | None = None, y: str | None = None, *, vary: str = "beta",
                  decoder: str = "magic", ax: Axes | None = None) -> MplFigure:
    """Grounding (``y``; default ``grounded``, else ``clip_s``) against fluency (``x``; default
    ``fluent``, else ``lm_logprob``) of every setting of a sweep summary. The ``decoder``'s settings
    that differ only in ``vary`` are joined in order of it, each point labelled with its value (one
    line per combination of the other varied parameters); other settings are single marks; the
    frontier (:func:`pareto`) is drawn dashed behind them."""
    x = x or _default(summary, "fluent", "lm_logprob")
    y = y or _default(summary, "grounded", "clip_s")
    for name, column in (("x", x), ("y", y)):
        _check_column(summary, column, name)
    fig, ax = _figure(ax, (7.0, 4.8))
    ours = summary[summary["decoder"] == decoder]
    others = summary[summary["decoder"] != decoder]
    keys = _varied(ours, (vary,)) if len(ours) else []
    groups = list(ours.groupby(keys, dropna=False, sort=True)) if keys else [((), ours)]
    for n, (key, part) in enumerate(groups):
        part = part.sort_values(vary) if vary in part else part
        key = key if isinstance(key, tuple) else (key,)
        name = " ".join(f"{k}={_num(v)}" for k, v in zip(keys, key))
        colour = OKABE_ITO[LINE_COLOURS[n % len(LINE_COLOURS)]]
        ax.plot(part[x], part[y], "-o", color=colour, label=f"{decoder} {name}".strip() + f" (over {vary})",
                markersize=6, zorder=3)
        if vary in part:
            for _, row in part.iterrows():
                ax.annotate(f"{vary}={_num(row[vary])}", (row[x], row[y]), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color=colour)
    for n, (_, row) in enumerate(others.iterrows()):
        ax.plot([row[x]], [row[y]], MARKERS[n % len(MARKERS)], color="black", markerfacecolor="white",
                markersize=7, label=row["setting"], zorder=4, linestyle="none")
    front = summary[pareto(summary, x, y)].sort_values(x)
    if len(front) > 1:
        ax.plot(front[x], front[y], "--", color="grey", linewidth=1, zorder=1, label="frontier (nothing beats it)")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(f"{LABELS.get(y, y).split(' (')[0]} vs {LABELS.get(x, x).split(' (')[0]}, over {vary}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def _num(value: Any) -> str:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if number and not math.isnan(float(value)):
        return f"{value:g}"
    return str(value)


def plot_heatmap(summary: pd.DataFrame, value: str | None = None, x: str = "alpha", y: str = "beta",
                 facet: str | None = "k", *, decoder: str = "magic") -> MplFigure:
    """A summary column (``value``; default ``grounded``, else ``clip_s``) over the ``x`` x ``y`` grid
    of the ``decoder``'s settings (one map per ``facet`` value; the mean where several settings
    share a cell), drawn by :func:`~magic_edu.views.plots.plot_sweep`."""
    value = value or _default(summary, "grounded", "clip_s")
    sub = summary[summary["decoder"] == decoder]
    if not len(sub):
        raise MagicEduError(f"decoder: the summary has no {decoder!r} settings; "
                            f"it has {sorted(set(summary['decoder']))}")
    for name, column in (("value", value), ("x", x), ("y", y)):
        _check_column(sub, column, name)
    frame = sub[[c for c in {value, x, y, facet} if c is not None and c in sub]].astype(float)
    return plot_sweep(frame, value=value, x=x, y=y, facet=facet if facet in frame else None)


def _rows_of(table: pd.DataFrame, setting: str) -> pd.DataFrame:
    rows = table[(table["setting_id"] == setting) | (table["setting"] == setting)]
    if not len(rows):
        raise MagicEduError(f"setting {setting!r} is not in the table; its settings: "
                            f"{', '.join(dict.fromkeys(table['setting']))}")
    if rows["setting_id"].nunique() > 1:
        raise MagicEduError(f"setting {setting!r} names several settings; give its setting_id")
    return rows


def disagreements(table: pd.DataFrame, a: str, b: str, metric: str | None = None) -> pd.DataFrame:
    """Image by image, settings ``a`` and ``b`` (labels or ids) side by side: both captions, the
    ``metric`` (default ``grounded``, else ``clip_s``) of each and ``diff`` = b - a, the images where
    they differ most first (then those whose captions differ). Only images both decoded."""
    metric = metric or _default(table, "grounded", "clip_s")
    _check_column(table, metric, "metric")
    ra, rb = (_rows_of(table, s) for s in (a, b))
    keep = ["image_id", "group", "status", "caption", metric]
    both = ra[keep].merge(rb[keep], on=["image_id", "group"], suffixes=("_a", "_b"))
    both = both[(both["status_a"] == "ok") & (both["status_b"] == "ok")].drop(columns=["status_a", "status_b"])
    both["diff"] = both[f"{metric}_b"].astype(float) - both[f"{metric}_a"].astype(float)
    both["same_caption"] = both["caption_a"] == both["caption_b"]
    order = np.lexsort((both["same_caption"].to_numpy(), -both["diff"].abs().to_numpy()))
    out = both.iloc[order].reset_index(drop=True)
    out.attrs.update(a=ra["setting"].iloc[0], b=rb["setting"].iloc[0], metric=metric)
    return out


def plot_disagreements(table: pd.DataFrame, a: str, b: str, metric: str | None = None, *, n: int = 8,
                       tolerance: float = 1e-9) -> MplFigure:
    """Where two settings part ways (:func:`disagreements`): left, for each kind of image (the
    table's ``group``, e.g. the toy world's "1 shape" / "2-3 shapes"), the share of images on which
    ``a`` does better on the metric, both do the same, ``b`` does better; right, the ``n`` images
    where they differ most, with both captions."""
    frame = disagreements(table, a, b, metric)
    metric, label_a, label_b = frame.attrs["metric"], frame.attrs["a"], frame.attrs["b"]
    fig = Figure(figsize=(11.0, 0.9 + 0.5 * max(n, 4)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.6))
    frame = frame.assign(_group=frame["group"].replace("", "all images").fillna("all images"))
    groups = list(dict.fromkeys(frame["_group"]))
    shares = []
    for g in groups:
        d = frame.loc[frame["_group"] == g, "diff"].to_numpy(float)
        shares.append([(d < -tolerance).mean(), (np.abs(d) <= tolerance).mean(), (d > tolerance).mean(), len(d)])
    shares_arr = np.array(shares, dtype=float).reshape(-1, 4)
    start = np.zeros(len(groups))
    parts = ((0, f"{label_a} better", OKABE_ITO["vermillion"], ""), (1, "the same", OKABE_ITO["grey"], ""),
             (2, f"{label_b} better", OKABE_ITO["blue"], "//"))
    for col, label, colour, hatch in parts:
        left.barh(groups, shares_arr[:, col], left=start, color=colour, hatch=hatch, label=label, edgecolor="white")
        start += shares_arr[:, col]
    left.set_yticks(range(len(groups)), [f"{g}\n({int(c)} images)" for g, c in zip(groups, shares_arr[:, 3])],
                    fontsize=8)
    left.set_xlim(0, 1)
    left.set_xlabel(f"share of images, by {metric}")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=1)
    left.set_title(f"{metric}: {label_a}  vs  {label_b}", fontsize=9)

    right.axis("off")
    shown = frame[~frame["same_caption"]].head(n)
    lines = [f"{len(frame[~frame['same_caption']])} of {len(frame)} images get different captions; "
             f"the {len(shown)} that differ most on {metric}:"]
    for _, row in shown.iterrows():
        lines.append(f"{row['image_id']}  ({metric}: {_num(row[f'{metric}_a'])} -> {_num(row[f'{metric}_b'])})")
        lines.append("   " + textwrap.shorten(f"a: {row['caption_a']}", 92))
        lines.append("   " + textwrap.shorten(f"b: {row['caption_b']}", 92))
    right.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace",
               transform=right.transAxes)
    return fig
