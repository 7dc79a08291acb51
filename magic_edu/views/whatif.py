"""The what-if tree (:class:`~magic_edu.tools.whatif.WhatIfTree`) drawn, and explored with a widget.

    >>> plot_whatif(tree, by="clip_score")   # left to right: steps; one row per finished caption
    >>> WhatIfExplorer(models, scene)        # pick a branch and a step, click a candidate to branch on it

Colours are the Okabe-Ito palette; every meaning is also carried by a marker or a label.
"""

from __future__ import annotations

import html
import math
import textwrap
from typing import Any

import ipywidgets as W

from ..errors import MagicEduError
from ..tools.analysis import token_label
from ..tools.whatif import HIGHER_IS_BETTER, SCORES, CaptionScores, WhatIfNode, WhatIfTree
from .plots import OKABE_ITO, Figure, to_png
from .widgets import guarded

ROOT_STYLE = {"color": OKABE_ITO["blue"], "linewidth": 2.5, "linestyle": "-"}
BRANCH_STYLE = {"color": OKABE_ITO["orange"], "linewidth": 1.8, "linestyle": "--"}
FORCED_COLOUR = OKABE_ITO["vermillion"]
BEST_COLOUR = OKABE_ITO["green"]
BEST_MARK = "★"
CAPTION_WIDTH = 46  # characters per line of a leaf's caption
TOKEN_CHARS = 8  # a token drawn in the tree is cut to this many characters
PLOT_DPI = 72


def _rows(tree: WhatIfTree) -> list[WhatIfNode]:
    """The nodes top to bottom: each node, then its children, the latest fork first (depth first), so
    the line that joins a branch to its parent crosses no other branch."""
    order: list[WhatIfNode] = []
    stack = [tree.root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(sorted(node.children, key=lambda c: (-c.fork.step, c.fork.candidate), reverse=True))
    return order


def scores_line(scores: CaptionScores) -> str:
    """``LM log-lik. -8.10 · CLIP 0.570 · repeats 0 · right ✓`` (what is not known is left out)."""
    parts = [f"LM log-lik. {scores.lm_log_likelihood:.2f}"]
    if not math.isnan(scores.clip_score):
        parts.append(f"CLIP {scores.clip_score:.3f}")
    parts.append(f"repeats {scores.repeated_bigrams}")
    if scores.right is not None:
        parts.append("right ✓" if scores.right else "names something right ~" if scores.names_right else "wrong ✗")
    return " · ".join(parts)


def _printable(text: str) -> str:
    """``text`` with control characters written as ``\\xNN`` (a font has no glyph for them)."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_whatif(tree: WhatIfTree, by: str = "clip_score") -> Figure:
    """The tree, left to right by step: one row per node, its tokens from where it parts from its
    parent (joined to the parent's row there; the forced token marked ◆ and labelled with its
    step), and on the right its whole caption and scores. The best leaf by ``by`` (one of
    :data:`~magic_edu.tools.whatif.SCORES`) is marked ★."""
    if not isinstance(tree, WhatIfTree):
        raise MagicEduError(f"tree must be a WhatIfTree; got {type(tree).__name__}")
    best = tree.best(by)
    rows = _rows(tree)
    y_of = {node.id: y for y, node in enumerate(rows)}
    steps = max(len(node.token_ids) for node in rows)
    height = 1.4 + 0.62 * len(rows)
    fig = Figure(figsize=(min(4.0 + 0.55 * steps, 22.0) + 5.2, height), layout="constrained")
    ax, ax_leaf = fig.subplots(1, 2, sharey=True, width_ratios=[min(4.0 + 0.55 * steps, 22.0), 5.2])
    for node in rows:
        y, start = y_of[node.id], max(node.branch_step, 0)
        style = ROOT_STYLE if node.parent is None else BRANCH_STYLE
        end = len(node.token_ids) - 1
        ax.plot([start, max(end, start)], [y, y], zorder=1, **style)
        if node.parent is not None:
            ax.plot([start, start], [y_of[node.parent.id], y], zorder=1, **BRANCH_STYLE)
            ax.plot([start], [y], marker="D", markersize=7, color=FORCED_COLOUR, linestyle="none", zorder=3)
            ax.annotate(node.fork.label(), (start, y), xytext=(0, 9), textcoords="offset points", fontsize=7,
                        color=FORCED_COLOUR, fontweight="bold", ha="left", va="bottom", zorder=4)
        for t in range(start, len(node.token_ids)):
            if node.parent is not None and t == start:
                continue  # the forced token: its label says it
            ax.text(t, y, _short(token_label(node.trace.steps[t].chosen_token), TOKEN_CHARS), ha="center",
                    va="center", fontsize=6.5, zorder=2, bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                                               "edgecolor": "none"})
        is_best = node is best
        caption = textwrap.shorten(_printable(node.text) or "(empty)", width=2 * CAPTION_WIDTH, placeholder=" …")
        lines = textwrap.wrap(f"{BEST_MARK + ' ' if is_best else ''}{node.id}: “{caption}”", CAPTION_WIDTH)[:2]
        ax_leaf.text(0.0, y, "\n".join([*lines, scores_line(node.scores)]), ha="left", va="center", fontsize=7,
                     fontweight="bold" if is_best else "normal",
                     bbox={"boxstyle": "round,pad=0.3", "facecolor": "#E6F5EF" if is_best else "white",
                           "edgecolor": BEST_COLOUR if is_best else OKABE_ITO["grey"],
                           "linewidth": 2.0 if is_best else 0.6})
    ax.plot([], [], label="the plain decode", **ROOT_STYLE)
    ax.plot([], [], label="a branch, finished by the decoder", **BRANCH_STYLE)
    ax.plot([], [], marker="D", color=FORCED_COLOUR, linestyle="none", label="forced token (step: token)")
    ax.plot([], [], marker="*", color=BEST_COLOUR, linestyle="none", markersize=10,
            label=f"{BEST_MARK} best leaf by {by} ({'higher' if HIGHER_IS_BETTER[by] else 'lower'} is better)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(rows)), ncols=2, fontsize=7, frameon=False)
    ax.set_ylim(len(rows) - 0.4, -0.8)
    ax.set_xlim(-0.6, steps - 0.4)
    ax.set_xticks(range(steps))
    ax.tick_params(labelsize=7)
    ax.set_yticks(range(len(rows)), [f"node {node.id}" for node in rows], fontsize=7)
    ax.set_xlabel("step")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"what if? {tree.decoder}, {len(rows)} finished caption{'s' * (len(rows) != 1)}", fontsize=9,
                 loc="left")
    ax_leaf.set_axis_off()
    ax_leaf.set_xlim(0, 1)
    ax_leaf.set_title("each caption as a whole", fontsize=9, loc="left")
    return fig


class WhatIfExplorer(W.VBox):
    """Branch a decode by clicking: choose a node (a finished caption) and a step; the step's
    candidates are buttons (the one the node took says so); a click branches on that candidate,
    lets the decoder finish, and redraws the tree. ``settings``: as for
    :class:`~magic_edu.tools.whatif.WhatIfTree`. Problems show as a message, never a traceback.
    """

    def __init__(self, models: Any, image: Any = None, *, decoder: str = "magic", by: str = "clip_score",
                 **settings: Any) -> None:
        self.message = W.HTML()
        self.node = W.Dropdown(description="branch of", options=[], style={"description_width": "initial"})
        self.step = W.IntSlider(description="step", min=0, max=0, continuous_update=False)
        self.by = W.Dropdown(description="best by", options=list(SCORES), value=by if by in SCORES else SCORES[0],
                             style={"description_width": "initial"})
        self.text = W.HTML()
        self.candidates = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.plot = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.tree: WhatIfTree | None = None
        controls = W.HBox([self.node, self.step, self.by], layout=W.Layout(flex_flow="row wrap"))
        super().__init__([controls, self.message, self.text, W.HTML("<b>candidates of this step</b> (click one to "
                                                                    "branch on it):"), self.candidates, self.plot])
        self.node.observe(lambda _: self._node_changed(), names="value")
        self.step.observe(lambda _: self._show_candidates(), names="value")
        self.by.observe(lambda _: self._redraw(), names="value")
        self._build(models, image, decoder, settings)

    @guarded
    def _build(self, models: Any, image: Any, decoder: str, settings: dict[str, Any]) -> None:
        self.tree = WhatIfTree(models, decoder, image=image, **settings)
        self._refresh(self.tree.root)

    @property
    def selected(self) -> WhatIfNode | None:
        """The node whose step's candidates are shown."""
        if self.tree is None or self.node.value is None:
            return None
        return self.tree.leaves()[self.node.value]

    @guarded
    def choose(self, candidate_index: int) -> WhatIfNode | None:
        """Branch the selected node at the shown step on a candidate (what a button click does)."""
        if self.tree is None:
            raise MagicEduError("no tree: the first decode failed (see the message above)")
        child = self.tree.branch(self.selected, self.step.value, candidate_index)
        self._refresh(child)
        return child

    def _refresh(self, select: WhatIfNode) -> None:
        options = [(f"{n.id}: {_short(_printable(n.text), 40)}", n.id) for n in self.tree.leaves()]
        same = self.node.value == select.id
        self.node.options = options
        self.node.value = select.id
        if same:
            self._node_changed()
        self._redraw()

    @guarded
    def _node_changed(self) -> None:
        node = self.selected
        if node is None:
            return
        last = max(len(node.trace.steps) - 1, 0)
        self.step.max = last
        self.step.value = min(max(node.branch_step, 0), last)
        path = ", ".join(f.label() for f in node.path) or "none (the plain decode)"
        self.text.value = (f"<b>node {node.id}</b> — forced: {html.escape(path)}<br>“{html.escape(node.text)}”<br>"
                           f"<small>{html.escape(scores_line(node.scores))}</small>")
        self._show_candidates()

    @guarded
    def _show_candidates(self) -> None:
        node = self.selected
        if node is None or not node.trace.steps:
            self.candidates.children = []
            return
        record = node.trace.steps[self.step.value]
        buttons = []
        for i, (token, score) in enumerate(zip(record.tokens, record.score)):
            taken = i == record.chosen
            button = W.Button(description=f"{token_label(token)} {score:.3f}" + (" (taken)" if taken else ""),
                              tooltip=f"step {record.step}, rank {i + 1}: branch here on {token_label(token)!r}",
                              button_style="info" if taken else "", layout=W.Layout(width="auto"))
            button.on_click(lambda _, i=i: self.choose(i))
            buttons.append(button)
        self.candidates.children = buttons

    @guarded
    def _redraw(self) -> None:
        if self.tree is not None:
            self.plot.value = to_png(self.snapshot(), dpi=PLOT_DPI)

    def snapshot(self) -> Figure:
        """A static Figure of the tree (or of the message, if there is no tree)."""
        if self.tree is None:
            fig = Figure(figsize=(6, 1))
            fig.text(0.5, 0.5, "no tree: the first decode failed", ha="center")
            return fig
        return plot_whatif(self.tree, by=self.by.value)
