"""Decision maps, flip points and occlusion maps, checked against the decoder itself: a step re-run
at another (alpha, beta) on the same prefix must take the token the map says wins."""

from __future__ import annotations

import html
import json
import math
import random

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.patches import Polygon

from magic_edu import MagicEduError, Stepper, Trace
from magic_edu.presets import ModelSet, load_models
from magic_edu.tools import explain
from magic_edu.tools.explain import Interval
from magic_edu.toyworld import shapes
from magic_edu.trace import StepRecord
from magic_edu.views import plots
from magic_edu.views.widgets import StepThrough

from conftest import make_image

K, ALPHA, BETA = 6, 0.3, 1.5
NAN = math.nan
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def image():
    return make_image(11)


@pytest.fixture(scope="module")
def magic_trace(tiny_lm64, tiny_clip64, image) -> Trace:
    return Stepper(tiny_lm64, "magic", tiny_clip64, image, k=K, alpha=ALPHA, beta=BETA, max_new_tokens=5,
                   stop_at_eos=False).run()[0].trace


@pytest.fixture(scope="module")
def contrastive_trace(tiny_lm64) -> Trace:
    return Stepper(tiny_lm64, "contrastive", k=K, alpha=0.4, max_new_tokens=5, stop_at_eos=False).run()[0].trace


def rerun(lm, trace: Trace, step: int, alpha: float, beta: float | None, clip=None, image=None) -> int:
    """The slow, obvious way: a fresh Stepper at (alpha, beta), the trace's earlier tokens forced, one
    step more; the candidate it takes. Its candidates and their scores' parts must be the trace's."""
    decoder = trace.settings["decoder"]
    extra = {"clip": clip, "image": image, "beta": beta} if decoder == "magic" else {}
    s = Stepper(lm, decoder, k=trace.settings["k"], alpha=alpha, max_new_tokens=step + 1, stop_at_eos=False, **extra)
    for t in range(step):
        s.step(force=trace.steps[t].chosen_token_id)
    record, original = s.step(), trace.steps[step]
    assert record.token_ids == original.token_ids
    for name in ("lm_prob", "degeneration_penalty", "clip_score"):
        assert np.array_equal(getattr(record, name), getattr(original, name), equal_nan=True), name
    return record.chosen


def busiest_step(trace: Trace) -> int:
    """The step with the most candidates that some beta or alpha makes win (the most boundaries)."""
    def boundaries(t: int) -> int:
        _, record, alpha, beta = explain.step_setting(trace, t)
        return sum(not f.alpha.empty or (f.beta is not None and not f.beta.empty)
                   for f in explain.flip_points(record, alpha, beta))
    return max(range(len(trace.steps)), key=boundaries)


def record_of(p, pen, c, chosen: int = 0, tokens=None) -> StepRecord:
    k = len(p)
    return StepRecord(step=0, text="", token_ids=list(range(10, 10 + k)), tokens=tokens or [f"t{i}" for i in range(k)],
                      lm_prob=list(p), degeneration_penalty=list(pen), penalty_position=[0] * k,
                      clip_text=[f"text {i}" for i in range(k)], clip_cosine=list(c), clip_score=list(c),
                      score=[0.0] * k, chosen=chosen)


def trace_of(record: StepRecord, alpha: float, beta: float | None) -> Trace:
    settings = {"decoder": "magic" if beta is not None else "contrastive", "k": record.k, "alpha": alpha}
    if beta is not None:
        settings["beta"] = beta
    else:
        record.clip_score = [NAN] * record.k
    return Trace(settings, [0], ["<s>"], [record])


# -- winner and flip points against the decoder ----------------------------------------------------------
def test_the_recorded_choice_is_the_winner_at_the_steps_setting(magic_trace, contrastive_trace):
    for trace, beta in ((magic_trace, BETA), (contrastive_trace, None)):
        for record in trace.steps:
            assert explain.winner(record, trace.settings["alpha"], beta) == record.chosen
            assert np.array_equal(explain.scores(record, trace.settings["alpha"], beta), record.score)


def test_winner_matches_the_decoder_rerun_over_the_plane(tiny_lm64, tiny_clip64, image, magic_trace):
    step = busiest_step(magic_trace)
    record = magic_trace.steps[step]
    dmap = explain.decision_regions(magic_trace, step)
    seen = set()
    for a in (0.0, 0.2, 0.45, 0.7, 1.0):
        for b in np.linspace(0.0, dmap.beta_max, 5):
            took = rerun(tiny_lm64, magic_trace, step, a, float(b), tiny_clip64, image)
            assert took == explain.winner(record, a, float(b)), (a, b)
            seen.add(took)
    assert len(seen) >= 2, "one candidate wins everywhere: this test no longer tests the map"


def test_flip_point_ends_match_the_decoder_just_either_side(tiny_lm64, tiny_clip64, image, magic_trace):
    """Either side of every end of every candidate's beta interval (alpha fixed) and alpha interval
    (beta fixed), the decoder takes the one candidate whose interval holds the point."""
    step = busiest_step(magic_trace)
    record = magic_trace.steps[step]
    flips = explain.flip_points(record, ALPHA, BETA)
    beta_ends = {e for f in flips if not f.beta.empty for e in (f.beta.low, f.beta.high) if 0 < e < math.inf}
    alpha_ends = {e for f in flips if not f.alpha.empty for e in (f.alpha.low, f.alpha.high) if 0 < e < 1}
    assert len(beta_ends) + len(alpha_ends) >= 2, "too few boundaries: this test no longer tests flip points"
    for ends, move in ((beta_ends, "beta"), (alpha_ends, "alpha")):
        for end in ends:
            for x in (end * (1 - 1e-7), end * (1 + 1e-7)):
                holders = [f.index for f in flips if x in (f.beta if move == "beta" else f.alpha)]
                assert len(holders) == 1, (move, x, holders)  # the intervals partition the line
                a, b = (ALPHA, x) if move == "beta" else (x, BETA)
                assert rerun(tiny_lm64, magic_trace, step, a, b, tiny_clip64, image) == holders[0], (move, x)


def test_contrastive_flip_points_match_the_decoder(tiny_lm64, contrastive_trace):
    alpha = contrastive_trace.settings["alpha"]
    tested = 0
    for step, record in enumerate(contrastive_trace.steps):
        flips = explain.flip_points(record, alpha)
        assert all(f.beta is None and math.isnan(f.wins_from_beta) for f in flips)  # no CLIP term: only alpha
        for end in {e for f in flips if not f.alpha.empty for e in (f.alpha.low, f.alpha.high) if 0 < e < 1}:
            for x in (end * (1 - 1e-7), end * (1 + 1e-7)):
                holder = [f.index for f in flips if x in f.alpha]
                assert len(holder) == 1 and rerun(tiny_lm64, contrastive_trace, step, x, None) == holder[0]
                tested += 1
    assert tested >= 2, "no alpha flips in the contrastive trace: this test no longer tests them"


# -- flip points on hand-made steps with known answers ---------------------------------------------------
def test_a_tie_goes_to_the_more_probable_candidate_at_the_boundary():
    # alpha = 0: s0 = 0.5 + 0.25 beta, s1 = 0.25 + 0.5 beta: equal at beta = 1 (exact in binary)
    record = record_of([0.5, 0.25], [0.0, 0.0], [0.25, 0.5])
    first, second = explain.flip_points(record, 0.0, 1.0)
    assert first.beta == Interval(0.0, 1.0, True, True)
    assert second.beta == Interval(1.0, math.inf, False, False) and second.wins_from_beta == 1.0
    assert explain.winner(record, 0.0, 1.0) == 0 and explain.winner(record, 0.0, 1.0 + 2**-40) == 1
    # at beta = 1 both score 0.75 at alpha = 0; above it the penalty-free second is ahead
    assert first.alpha == Interval(0.0, 0.0, True, True) and 0.0 in first.alpha
    assert second.alpha == Interval(0.0, 1.0, False, True) and 0.0 not in second.alpha
    assert str(second.beta) == "(1, ∞)" and str(first.alpha) == "[0, 0]"


def test_a_candidate_that_wins_only_on_a_tie_has_no_region():
    # equal p and CLIP score, candidate 0 more penalised: s0 - s1 = -alpha / 4, a tie (to 0) only at alpha = 0
    for beta in (None, 1.0):
        record = record_of([0.25, 0.25], [0.5, 0.25], [0.5, 0.5])
        dmap = explain.decision_regions(trace_of(record, 0.5, beta), 0)
        assert [r.index for r in dmap.regions] == [1] and dmap.on_boundaries == [0]
        assert explain.winner(record, 0.0, beta) == 0 and explain.winner(record, 2**-40, beta) == 1
        assert plots.plot_decision_map(trace_of(record, 0.5, beta), 0).axes[0].get_title(loc="left").endswith(
            "winning only on a boundary (a tie): “t0”")
        # the mirror image: candidate 1 would tie only at alpha = 0, and a tie goes to candidate 0
        mirror = explain.decision_regions(trace_of(record_of([0.25, 0.25], [0.25, 0.5], [0.5, 0.5]), 0.5, beta), 0)
        assert [r.index for r in mirror.regions] == [0] and mirror.on_boundaries == []


def test_parallel_lines_and_a_middle_interval():
    # alpha = 0.5: base = 0.5 p - 0.5 pen = [0.125, 0, -0.0625]; candidate 1 runs parallel to 0 (same c), below
    record = record_of([0.5, 0.25, 0.125], [0.25, 0.25, 0.25], [0.25, 0.25, 0.5])
    f0, f1, f2 = explain.flip_points(record, 0.5, 1.0)
    assert f0.beta == Interval(0.0, 0.75, True, True)
    assert f1.beta.empty and f1.wins_from_beta == math.inf
    assert f2.beta == Interval(0.75, math.inf, False, False)
    # alpha = 0, base = p: candidate 1 wins for beta in (0.5, 1], candidate 2 above 1
    record = record_of([0.5, 0.375, 0.125], [0.0, 0.0, 0.0], [0.0, 0.25, 0.5])
    f0, f1, f2 = explain.flip_points(record, 0.0, 0.75)
    assert (f0.beta, f1.beta, f2.beta) == (Interval(0.0, 0.5, True, True), Interval(0.5, 1.0, False, True),
                                           Interval(1.0, math.inf, False, False))
    assert [explain.winner(record, 0.0, b) for b in (0.5, 0.75, 1.0, 1.5)] == [0, 1, 1, 2]


def test_flip_sentences_name_each_way_to_another_token():
    # alpha = 0, beta = 0.25: scores [0.5, 0.4375, 0.25]; along beta t1 wins in (0.5, 1], t2 above 1;
    # along alpha (s = p + beta c - alpha p) t0 wins in [0, 0.5], t1 in (0.5, 0.75], t2 in (0.75, 1]
    trace = trace_of(record_of([0.5, 0.375, 0.125], [0.0, 0.0, 0.0], [0.0, 0.25, 0.5]), 0.0, 0.25)
    assert explain.flip_sentences(trace, 0) == [
        "“t0” holds for β in [0, 0.5] (α = 0) and for α in [0, 0.5] (β = 0.25).",
        "with β in (0.5, 1] (α = 0) or with α in (0.5, 0.75] (β = 0.25), “t1” would win.",
        "with β > 1 (α = 0) or with α in (0.75, 1] (β = 0.25), “t2” would win.",
    ]
    trace.steps[0].chosen, trace.steps[0].forced = 2, True
    assert explain.flip_sentences(trace, 0)[0] == "“t2” was forced; the decoder's own choice was “t0”."


def test_a_candidate_that_never_wins_and_an_identical_one():
    # candidate 1: less probable, more penalised, less CLIP than 0; candidate 2: the same numbers as 0
    record = record_of([0.5, 0.25, 0.5], [0.25, 0.5, 0.25], [0.5, 0.25, 0.5])
    f0, f1, f2 = explain.flip_points(record, 0.25, 2.0)
    assert f0.beta == Interval(0.0, math.inf, True, False) and f0.alpha == Interval(0.0, 1.0, True, True)
    for f in (f1, f2):
        assert f.beta.empty and f.alpha.empty and f.wins_from_beta == math.inf
    dmap = explain.decision_regions(trace_of(record, 0.25, 2.0), 0)
    assert [r.index for r in dmap.regions] == [0] and dmap.on_boundaries == []
    assert dmap.regions[0].area == pytest.approx(dmap.beta_max)  # the whole box
    frame = trace_of(record, 0.25, 2.0).to_frame()
    assert list(frame["wins_beta_low"]) == [0.0, math.inf, math.inf]
    assert frame.loc[1:, ["wins_beta_high", "wins_alpha_low", "wins_alpha_high"]].isna().all().all()


# -- the decision map ----------------------------------------------------------------------------------
def inside(polygon: np.ndarray, x: float, y: float, tol: float = 0.0) -> bool:
    """Whether (x, y) is inside a convex polygon (corners in order, either turn)."""
    crosses = [(bx - ax) * (y - ay) - (by - ay) * (x - ax)
               for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0))]
    return all(c >= -tol for c in crosses) or all(c <= tol for c in crosses)


def test_regions_hold_exactly_the_points_their_candidate_wins(magic_trace):
    for step in range(len(magic_trace.steps)):
        dmap = explain.decision_regions(magic_trace, step)
        record = dmap.record
        for a in np.linspace(0.0, 1.0, 23):
            for b in np.linspace(0.0, dmap.beta_max, 23):
                s = np.sort(explain.scores(record, a, b))
                if s[-1] - s[-2] < 1e-7:  # on a boundary: either side
                    continue
                holders = [r.index for r in dmap.regions if inside(r.polygon, a, b)]
                assert holders == [explain.winner(record, a, b)], (step, a, b)
        for region in dmap.regions:  # a label sits inside its region
            assert explain.winner(record, *region.label_point) == region.index


def test_beta_max_covers_every_region_that_exists(magic_trace):
    for step in range(len(magic_trace.steps)):
        dmap = explain.decision_regions(magic_trace, step)
        shown = {r.index for r in dmap.regions} | set(dmap.on_boundaries)
        far = {explain.winner(dmap.record, a, b) for a in np.linspace(0, 1, 41)
               for b in np.concatenate([np.linspace(0, 3 * dmap.beta_max, 61), np.geomspace(1, 1e6, 30)])}
        assert far <= shown, (step, far - shown)
        assert dmap.beta_max >= BETA


def test_contrastive_map_is_a_line_along_alpha(contrastive_trace):
    for step in range(len(contrastive_trace.steps)):
        dmap = explain.decision_regions(contrastive_trace, step)
        assert dmap.beta is None and dmap.beta_max is None
        assert sum(r.alpha.high - r.alpha.low for r in dmap.regions) == pytest.approx(1.0)
        for r in dmap.regions:
            assert explain.winner(dmap.record, r.label_point[0]) == r.index


def test_the_map_works_from_a_saved_trace(magic_trace, tmp_path):
    path = magic_trace.save(tmp_path / "magic.json")
    loaded = Trace.load(path)
    for step in range(len(magic_trace.steps)):
        a, b = explain.decision_regions(magic_trace, step), explain.decision_regions(str(path), step)
        assert [r.index for r in a.regions] == [r.index for r in b.regions] and a.beta_max == b.beta_max
    assert len(plots.plot_decision_map(path, 0).axes[0].patches) == len(explain.decision_regions(loaded, 0).regions)
    assert len(plots.plot_choice_room(str(path)).axes) == 2
    frame = loaded.to_frame()
    assert frame.equals(magic_trace.to_frame())
    assert "wins_" not in path.read_text()  # derived columns: the file format does not change
    assert json.loads(path.read_text())["version"] == 5


# -- the frame's columns ---------------------------------------------------------------------------------
def test_frame_columns_are_the_flip_points(magic_trace, contrastive_trace, tiny_lm):
    frame = magic_trace.to_frame()
    columns = list(frame.columns)
    assert columns[columns.index("score") + 1: columns.index("score") + 5] == list(explain.FLIP_COLUMNS)
    for step, record in enumerate(magic_trace.steps):
        rows = frame[frame["step"] == step].reset_index(drop=True)
        for f in explain.flip_points(record, ALPHA, BETA):
            row = rows.iloc[f.index]
            assert row["wins_beta_low"] == (math.inf if f.beta.empty else f.beta.low)
            if not f.alpha.empty:
                assert (row["wins_alpha_low"], row["wins_alpha_high"]) == (f.alpha.low, f.alpha.high)
        chosen = rows[rows["chosen"]].iloc[0]
        assert chosen["wins_beta_low"] <= BETA <= chosen["wins_beta_high"]
        assert chosen["wins_alpha_low"] <= ALPHA <= chosen["wins_alpha_high"]
    frame = contrastive_trace.to_frame()
    assert frame["wins_beta_low"].isna().all() and frame["wins_beta_high"].isna().all()
    assert frame["wins_alpha_low"].notna().any()
    greedy = Stepper(tiny_lm, "greedy", max_new_tokens=3).run()[0].trace.to_frame()
    assert greedy[list(explain.FLIP_COLUMNS)].isna().all().all()


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(magic_trace, contrastive_trace, tiny_lm):
    greedy = Stepper(tiny_lm, "greedy", max_new_tokens=3).run()[0].trace
    record = magic_trace.steps[0]
    cases = [
        (lambda: explain.decision_regions(magic_trace, 99), "step must be an integer between 0 and 4"),
        (lambda: explain.decision_regions(magic_trace, 1.5), "step must be"),
        (lambda: explain.decision_regions(greedy, 0), "decoder is 'greedy'"),
        (lambda: plots.plot_decision_map(greedy, 0), "decoder is 'greedy'"),
        (lambda: plots.plot_choice_room(greedy), "decoder is 'greedy'"),
        (lambda: explain.decision_regions(magic_trace, 0, beta_max=0), "beta_max must be a number > 0"),
        (lambda: explain.decision_regions(magic_trace, 0, beta_max=-1.0), "beta_max must be"),
        (lambda: explain.decision_regions(magic_trace, 0, beta_max=float("nan")), "beta_max must be"),
        (lambda: explain.decision_regions(magic_trace, 0, beta_max="big"), "beta_max must be"),
        (lambda: explain.winner(record, 1.5, 1.0), "alpha must be a number between 0.0 and 1.0"),
        (lambda: explain.winner(record, 0.3, -1.0), "beta must be a number >= 0.0"),
        (lambda: explain.winner(contrastive_trace.steps[0], 0.3, 1.0), "beta: step 0 has no CLIP scores"),
        (lambda: explain.winner(greedy.steps[0], 0.3), "no degeneration penalties"),
        (lambda: explain.step_occlusion(contrastive_trace, 0, None, make_image(0)), "occlusion maps need MAGIC"),
        (lambda: plots.plot_occlusion("map"), "occlusion must be an Occlusion"),
    ]
    for call, message in cases:
        with pytest.raises(MagicEduError, match=message.replace("(", r"\(")):
            call()


# -- plots -----------------------------------------------------------------------------------------------
def test_plot_decision_map_draws_the_exact_regions(magic_trace, contrastive_trace):
    step = busiest_step(magic_trace)
    dmap = explain.decision_regions(magic_trace, step)
    fig = plots.plot_decision_map(magic_trace, step)
    ax = fig.axes[0]
    patches = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(patches) == len(dmap.regions) >= 2
    for patch, region in zip(patches, dmap.regions):
        assert np.allclose(patch.get_xy()[: len(region.polygon)], region.polygon)
    labels = {t.get_text(): t.get_position() for t in ax.texts}
    for region in dmap.regions:
        (text, where), = [(t, p) for t, p in labels.items() if t.endswith(f"#{region.index + 1}")]
        assert explain.winner(dmap.record, *where) == region.index
        assert text.startswith(plots.CHOSEN_MARK) == (region.index == magic_trace.steps[step].chosen)
    star = next(ln for ln in ax.get_lines() if ln.get_label().startswith(plots.SETTING_LABEL))
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (ALPHA, BETA)
    assert ax.get_ylim() == (0.0, dmap.beta_max)
    assert plots.plot_decision_map(magic_trace, step, beta_max=0.2).axes[0].get_ylim() == (0.0, 0.2)
    line = plots.plot_decision_map(contrastive_trace, 1).axes[0]
    bars = [b for c in line.containers for b in c]
    regions = explain.decision_regions(contrastive_trace, 1).regions
    assert [x for b in bars for x in (b.get_x(), b.get_x() + b.get_width())] == pytest.approx(
        [x for r in regions for x in (r.alpha.low, r.alpha.high)])
    assert "only α changes the choice" in line.get_title(loc="left")


def test_plot_choice_room_draws_each_steps_intervals(magic_trace, contrastive_trace):
    rooms = explain.choice_room(magic_trace)
    fig = plots.plot_choice_room(magic_trace)
    ax_beta, ax_alpha = fig.axes
    bars = sorted((b for c in ax_beta.containers for b in c), key=lambda b: b.get_x())
    assert [b.get_y() for b in bars] == pytest.approx([r.beta.low for r in rooms])
    bars = sorted((b for c in ax_alpha.containers for b in c), key=lambda b: b.get_x())
    assert [x for b in bars for x in (b.get_y(), b.get_y() + b.get_height())] == pytest.approx(
        [x for r in rooms for x in (r.alpha.low, r.alpha.high)])
    for container in ax_beta.containers:  # the colour says what the image did
        kinds = {plots._room_kind(rooms[round(b.get_x() + b.get_width() / 2)]) for b in container}
        assert [plots.ROOM_LABELS[k] for k in kinds] == [container.get_label()]
    for r, record in zip(rooms, magic_trace.steps):  # image decided: without CLIP (beta = 0) another token wins
        assert r.image_decided == (explain.winner(record, ALPHA, 0.0) != record.chosen)
    assert len(plots.plot_choice_room(contrastive_trace).axes) == 1


# -- occlusion ---------------------------------------------------------------------------------------------
class RegionClip:
    """A stand-in CLIP whose image embedding is a known function of one region: theta = (pi / 2) x the
    mean red of the pixels in rows and columns 0..7, e = (cos theta, sin theta); text "a" = (0, 1),
    any other text (1, 0). So cos(I, a) - cos(I, b) = sin theta - cos theta, and covering a square
    that misses the region changes nothing."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed_image(self, images):
        self.batches.append(len(images))
        red = torch.tensor([np.asarray(im)[:8, :8, 0].mean() / 255.0 for im in images], dtype=torch.float64)
        theta = red * math.pi / 2
        return torch.stack([theta.cos(), theta.sin()], dim=1)

    def embed_texts(self, texts):
        return torch.tensor([[0.0, 1.0] if t == "a" else [1.0, 0.0] for t in texts], dtype=torch.float64)


def margin_of(red: float) -> float:
    theta = red * math.pi / 2
    return math.sin(theta) - math.cos(theta)


def test_occlusion_map_of_a_stand_in_clip_is_known():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # all red
    clip = RegionClip()
    occ = explain.occlusion_map(clip, pixels, "a", "b", patch=2, stride=1)
    assert occ.tops == occ.lefts == list(range(15)) and occ.drops.shape == (15, 15)
    assert max(clip.batches) <= explain.OCCLUSION_BATCH and sum(clip.batches) == 1 + 225  # batched, each once
    assert occ.margin == pytest.approx(margin_of(1.0))
    for r, top in enumerate(occ.tops):
        for q, left in enumerate(occ.lefts):
            covered = sum(1 for y in range(top, top + 2) for x in range(left, left + 2) if y < 8 and x < 8)
            red = (64 - covered + covered * 128 / 255) / 64  # grey 128 over the covered part of the region
            assert occ.drops[r, q] == pytest.approx(margin_of(1.0) - margin_of(red), abs=1e-12), (top, left)
    assert (occ.drops[8:, :] == 0).all() and (occ.drops[:, 8:] == 0).all() and (occ.drops[:7, :7] > 0).all()
    for y, x in ((0, 0), (5, 5), (7, 8), (15, 15)):  # a pixel's value: the mean drop of the squares over it
        over = [occ.drops[r, q] for r, t in enumerate(occ.tops) for q, left in enumerate(occ.lefts)
                if t <= y < t + 2 and left <= x < left + 2]
        assert occ.map[y, x] == pytest.approx(np.mean(over))
    fig = plots.plot_occlusion(occ)
    assert len(fig.axes) == 3 and "“a”" in fig.axes[1].get_title(loc="left")  # image, map, colour bar


def test_occlusion_fill_patch_and_stride():
    pixels = np.zeros((12, 10, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    occ = explain.occlusion_map(RegionClip(), pixels, "a", "b")  # default: a sixth of the side, half of it
    assert (occ.patch, occ.stride, occ.tops[-1], occ.lefts[-1]) == (1, 1, 11, 9)
    occ = explain.occlusion_map(RegionClip(), pixels, "a", "b", patch=4, stride=3, fill="mean")
    assert occ.fill == (200, 0, 0) and np.allclose(occ.drops, 0)  # the mean colour is the image's own
    assert occ.tops == [0, 3, 6, 8] and occ.lefts == [0, 3, 6]  # the last square flush with the edge
    occ = explain.occlusion_map(RegionClip(), pixels, "a", "b", patch=4, stride=4, fill=(255, 0, 0))
    assert (occ.drops < 0).any()  # brighter red over the region: a rises
    for kwargs, message in (({"patch": 0}, "patch must be an integer between 1 and 10"),
                            ({"patch": 4, "stride": 5}, "stride must be an integer between 1 and 4"),
                            ({"fill": "pink"}, "fill must be 'grey', 'mean'"),
                            ({"fill": (0, 0, 300)}, "fill must be")):
        with pytest.raises(MagicEduError, match=message):
            explain.occlusion_map(RegionClip(), pixels, "a", "b", **kwargs)
    with pytest.raises(MagicEduError, match="text_b must be a string"):
        explain.occlusion_map(RegionClip(), pixels, "a", 3)


def test_step_occlusion_compares_two_candidates_clip_texts(magic_trace, tiny_clip64, image):
    step = busiest_step(magic_trace)
    record = magic_trace.steps[step]
    occ = explain.step_occlusion(magic_trace, step, tiny_clip64, image, patch=8, stride=8)
    runner_up = max((i for i in range(record.k) if i != record.chosen), key=lambda i: record.clip_score[i])
    assert (occ.text_a, occ.text_b) == (record.clip_text[record.chosen], record.clip_text[runner_up])
    texts = tiny_clip64.embed_texts([occ.text_a, occ.text_b]).double()
    whole = tiny_clip64.embed_image(image).double()
    assert occ.margin == pytest.approx(float(texts[0] @ whole - texts[1] @ whole), abs=1e-9)
    covered = np.asarray(image).copy()
    covered[0:8, 8:16] = explain.GREY
    one = F.normalize(tiny_clip64.embed_image(covered).double(), dim=0)
    # embed_image hands back float32 embeddings: one image alone rounds differently from a batch
    assert occ.drops[0, 1] == pytest.approx(occ.margin - float(texts[0] @ one - texts[1] @ one), abs=1e-6)
    assert abs(occ.drops[0, 1]) > 1e-5  # the patch changes the margin: the comparison is not of two zeros


@pytest.mark.slow
def test_toy_world_occlusion_points_at_the_red_shape():
    models = load_models("toy")
    size = shapes.IMAGE_SIZE
    for red_at, blue_at in (((0.25, 0.5), (0.75, 0.5)), ((0.7, 0.3), (0.3, 0.7))):
        objects = [shapes.ShapeObject(colour, "circle", "large", "left", shapes.COLOURS[colour],
                                      (x * size, y * size), 0.105 * size, 0.0)
                   for colour, (x, y) in (("red", red_at), ("blue", blue_at))]
        pixels = np.asarray(shapes.render(objects, "white", random.Random(0))).astype(int)
        red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
        blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
        occ = explain.occlusion_map(models.clip, pixels.astype(np.uint8), "a red circle", "a blue circle")
        assert occ.map[red].mean() > occ.map[blue].mean(), red_at
        r, q = np.unravel_index(np.argmax(occ.drops), occ.drops.shape)
        assert red[occ.tops[r]:occ.tops[r] + occ.patch, occ.lefts[q]:occ.lefts[q] + occ.patch].any(), red_at


# -- StepThrough -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_lm64, tiny_clip64) -> ModelSet:
    return ModelSet(name="tiny", kind="caption", lm=tiny_lm64, clip=tiny_clip64,
                    defaults={"k": K, "alpha": ALPHA, "beta": BETA, "max_new_tokens": 5})


def test_step_through_says_what_would_change_the_choice(models, image):
    w = StepThrough(models, image, plot=False)  # the step plot is not what is tested here
    for _ in range(3):
        w.next_button.click()
    assert "Problem" not in w.message.value
    record = w.shown_record()
    flips = explain.flip_points(record, ALPHA, BETA)
    text = w.explain_text.value
    assert f"holds for β in {flips[record.chosen].beta}" in text
    for f in flips:  # every candidate that some beta makes win is named with its interval
        if f.index != record.chosen and not f.beta.empty:
            assert "would win" in text and explain._bound_words(f.beta) in html.unescape(text)
    assert w.map_plot.value == b"" and w.occlusion_plot.value == b""  # nothing heavy unless asked
    w.map_toggle.value = True
    assert bytes(w.map_plot.value).startswith(PNG)
    assert [v for _, v in w.compare_with.options] == [i for i in range(record.k) if i != record.chosen]
    w.occlusion_button.click()
    assert "Problem" not in w.message.value and bytes(w.occlusion_plot.value).startswith(PNG)
    w.back_button.click()  # another step: its own map, the occlusion map cleared
    assert bytes(w.map_plot.value).startswith(PNG) and w.occlusion_plot.value == b""
    record = w.shown_record()
    w.force(next(i for i in range(record.k) if i != record.chosen))
    assert html.escape("was forced; the decoder's own choice was") in w.explain_text.value
    w.decoder.value = "contrastive"
    assert w._occlusion_box.layout.display == "none" and "holds for α in" in w.explain_text.value
    w.occlusion_button.click()
    assert "only MAGIC search looks at the image" in w.message.value
    w.decoder.value = "greedy"
    assert w.explain_box.layout.display == "none" and w.map_plot.value == b""
    w.decoder.value = "magic"
    w.reset_button.click()
    w.occlusion_button.click()
    assert "take a first step" in w.message.value and "Traceback" not in w.message.value
