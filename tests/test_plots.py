"""Plots and the analysis helpers behind them: the artists that carry meaning equal the trace's values."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from magic_edu import MagicEduError, Stepper, Trace
from magic_edu.tools import analysis
from magic_edu.views import plots

from conftest import make_image

ALPHA, BETA, K = 0.3, 1.5, 5


@pytest.fixture(scope="module")
def image():
    return make_image(7)


@pytest.fixture(scope="module")
def magic_trace(tiny_lm, tiny_clip, image) -> Trace:
    """Seven MAGIC steps, the third forced to the candidate ranked 4th."""
    s = Stepper(tiny_lm, "magic", tiny_clip, image, k=K, alpha=ALPHA, beta=BETA, max_new_tokens=7,
                stop_at_eos=False)
    s.step()
    s.step()
    record = s.step()
    s.back()
    s.step(force=record.token_ids[3])
    s.run()
    return s.traces[0]


@pytest.fixture(scope="module")
def greedy_trace(tiny_lm) -> Trace:
    return Stepper(tiny_lm, "greedy", max_new_tokens=7, stop_at_eos=False).run()[0].trace


@pytest.fixture(scope="module")
def contrastive_trace(tiny_lm) -> Trace:
    return Stepper(tiny_lm, "contrastive", k=K, alpha=ALPHA, max_new_tokens=7, stop_at_eos=False).run()[0].trace


def container(ax, label):
    """The bars drawn with a legend label."""
    found = [c for c in ax.containers if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.containers]
    return found[0]


def line(ax, label):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


# -- analysis ----------------------------------------------------------------------------------
def test_token_label_makes_invisible_characters_and_special_tokens_visible():
    assert analysis.token_label(" cat") == "␣cat"
    assert analysis.token_label("\n") == "↵"
    assert analysis.token_label("\t") == "⇥"
    assert analysis.token_label("") == "∅"
    assert analysis.token_label("\r") == "\\x0d"
    assert analysis.token_label("<|endoftext|>") == "⟨endoftext⟩"
    assert analysis.token_label("<-start_of_text->") == "⟨start_of_text⟩"
    assert analysis.token_label("red") == "red"


def test_repeated_ngrams_and_divergence_step():
    assert analysis.repeated_ngrams("a star star star star .", 2) == {"star star": 3}
    assert analysis.repeated_ngrams("A red circle and a red square", 2) == {"a red": 2}
    assert analysis.repeated_ngrams("one two three", 2) == {}
    with pytest.raises(MagicEduError):
        analysis.repeated_ngrams("text", 0)
    assert analysis.divergence_step([[1, 2, 3], [1, 2, 4], [1, 2, 3]]) == 2
    assert analysis.divergence_step([[1, 2], [1, 2, 3]]) == 2  # one ended, the other went on
    assert analysis.divergence_step([[5, 6], [5, 6]]) is None
    assert analysis.divergence_step([[1], [2]]) == 0


def test_lm_log_likelihood_matches_the_decoders_probabilities(tiny_lm, greedy_trace):
    ids = analysis.chosen_ids(greedy_trace)
    expected = sum(math.log(s.lm_prob[s.chosen]) for s in greedy_trace.steps)
    assert analysis.lm_log_likelihood(tiny_lm, ids) == pytest.approx(expected, rel=1e-4)
    per_token = analysis.token_log_probs(tiny_lm, ids)
    assert len(per_token) == len(ids) and all(lp <= 0 for lp in per_token)
    assert analysis.lm_log_likelihood(tiny_lm, []) == 0.0


def test_caption_clip_score_is_the_cosine_magic_recorded(tiny_clip, magic_trace, image):
    record = magic_trace.steps[-1]
    text = record.clip_text[record.chosen]
    assert analysis.caption_clip_score(tiny_clip, image, text) == pytest.approx(record.clip_cosine[record.chosen],
                                                                                abs=1e-5)
    both = analysis.caption_clip_score(tiny_clip, image, [text, "a red circle"])
    assert both.shape == (2,)


def test_degeneration_matrix_is_rebuilt_from_the_trace(magic_trace):
    matrix, positions = analysis.degeneration_matrix(magic_trace)
    p, n = len(magic_trace.prefix_ids), len(magic_trace.steps)
    assert matrix.shape == (n, p + n)
    for t, record in enumerate(magic_trace.steps):
        np.testing.assert_allclose(matrix[t, : p + t], record.chosen_similarity)
        assert matrix[t, p + t] == 1.0 and np.isnan(matrix[t, p + t + 1:]).all()
        # the marked position is the most similar earlier one: it is what the penalty is made of
        assert positions[t] == int(np.argmax(record.chosen_similarity))
        assert record.degeneration_penalty[record.chosen] == pytest.approx(max(record.chosen_similarity))


# -- one step ----------------------------------------------------------------------------------
def test_plot_step_bars_are_the_three_parts_of_the_score(magic_trace):
    step = 2
    record = magic_trace.steps[step]
    fig = plots.plot_step(magic_trace, step)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lm = container(ax, plots.LM_LABEL)
    clip = container(ax, plots.CLIP_LABEL)
    penalty = container(ax, plots.PENALTY_LABEL)
    assert len(lm) == len(clip) == len(penalty) == K
    lm_w = np.array([b.get_width() for b in lm])
    clip_w = np.array([b.get_width() for b in clip])
    pen_w = np.array([b.get_width() for b in penalty])
    np.testing.assert_allclose(lm_w, (1 - ALPHA) * np.array(record.lm_prob))
    np.testing.assert_allclose(clip_w, BETA * np.array(record.clip_score))
    np.testing.assert_allclose([b.get_x() for b in clip], lm_w)  # stacked after the LM part
    np.testing.assert_allclose(pen_w, -ALPHA * np.array(record.degeneration_penalty))
    assert (pen_w <= 0).all()
    total = line(ax, plots.TOTAL_LABEL)
    np.testing.assert_allclose(total.get_xdata(), record.score)
    np.testing.assert_allclose(lm_w + clip_w + pen_w, record.score, atol=1e-9)
    # the chosen (here: forced) candidate is labelled, bold, outlined and shaded
    labels = [t.get_text() for t in ax.get_yticklabels()]
    marked = [i for i, t in enumerate(labels) if t.startswith(plots.CHOSEN_MARK)]
    assert marked == [record.chosen] == [3]
    assert "(forced)" in labels[3] and analysis.token_label(record.tokens[3]) in labels[3]
    assert ax.get_yticklabels()[3].get_fontweight() == "bold"
    assert lm[3].get_linewidth() > lm[0].get_linewidth()
    band = [p for p in ax.patches if p.get_label() == plots.CHOSEN_LABEL]
    assert len(band) == 1


def test_plot_step_shows_token_texts_visibly(magic_trace):
    fig = plots.plot_step(magic_trace, 0)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    record = magic_trace.steps[0]
    for label, token in zip(labels, record.tokens):
        assert analysis.token_label(token)[:11] in label
        assert " " not in token.strip() or "␣" in label


def test_plot_step_for_greedy_is_one_bar_of_probability(greedy_trace):
    record = greedy_trace.steps[-1]
    ax = plots.plot_step(greedy_trace).axes[0]
    bars = container(ax, plots.PROB_LABEL)
    np.testing.assert_allclose([b.get_width() for b in bars], record.lm_prob)
    assert [c.get_label() for c in ax.containers] == [plots.PROB_LABEL]
    assert ax.get_yticklabels()[record.chosen].get_text().startswith(plots.CHOSEN_MARK)


def test_plot_step_for_contrastive_has_no_clip_part(contrastive_trace):
    record = contrastive_trace.steps[1]
    ax = plots.plot_step(contrastive_trace, 1).axes[0]
    assert [c.get_label() for c in ax.containers] == [plots.LM_LABEL, plots.PENALTY_LABEL]
    np.testing.assert_allclose([b.get_width() for b in container(ax, plots.LM_LABEL)],
                               (1 - ALPHA) * np.array(record.lm_prob))


def renamed(trace: Trace, decoder: str | None) -> Trace:
    data = trace.to_dict()
    data["settings"] = {**data["settings"], "decoder": decoder}
    return Trace.from_dict(data)


@pytest.mark.parametrize("decoder", ["diverse_beam", None, ["not", "a", "name"]])
def test_a_trace_of_a_decoder_the_registry_does_not_know_is_drawn_by_probability(contrastive_trace, decoder):
    trace = renamed(contrastive_trace, decoder)
    record = trace.steps[0]
    parts = analysis.score_parts(trace, 0)
    np.testing.assert_allclose(parts["lm"], record.lm_prob)
    assert not parts["penalty"].any() and not parts["clip"].any()
    assert not analysis.scores_candidates(trace) and analysis.trace_decoder(trace) is None
    ax = plots.plot_step(trace, 0).axes[0]
    assert [c.get_label() for c in ax.containers] == [plots.PROB_LABEL]


def test_the_registry_says_which_traces_score_candidates(contrastive_trace, monkeypatch):
    """A decoder added to the registry is drawn by its description, with no change to the plots."""
    from dataclasses import replace

    from magic_edu import registry

    monkeypatch.setitem(registry.DECODERS, "my_search",
                        replace(registry.DECODERS["contrastive"], name="my_search", label="my search"))
    trace = renamed(contrastive_trace, "my_search")
    assert analysis.scores_candidates(trace)
    np.testing.assert_allclose(analysis.score_parts(trace, 1)["penalty"],
                               analysis.score_parts(contrastive_trace, 1)["penalty"])
    ax = plots.plot_step(trace, 1).axes[0]
    assert [c.get_label() for c in ax.containers] == [plots.LM_LABEL, plots.PENALTY_LABEL]


def test_plot_step_with_many_candidates_keeps_the_chosen_one(tiny_lm, image, tiny_clip):
    s = Stepper(tiny_lm, "magic", tiny_clip, image, k=40, alpha=0.2, beta=1.0, max_new_tokens=2, stop_at_eos=False)
    first = s.step()
    s.back()
    forced = s.step(force=first.token_ids[35])
    ax = plots.plot_step(s.traces[0], 0, max_candidates=10).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 11 <= len(labels) <= 12  # the 10 most probable, the chosen one, the best scored one
    assert forced.chosen == 35
    assert any(t.startswith(plots.CHOSEN_MARK) and "#36" in t for t in labels)


def test_plot_step_rejects_a_bad_step(magic_trace):
    with pytest.raises(MagicEduError, match="step must be between"):
        plots.plot_step(magic_trace, 99)


# -- a whole decode ----------------------------------------------------------------------------
def test_plot_decode_heat_map_and_chosen_path(magic_trace):
    fig = plots.plot_decode(magic_trace)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), [s.score for s in magic_trace.steps])
    path = line(ax, plots.PATH_LABEL)
    np.testing.assert_array_equal(path.get_xdata(), [s.chosen for s in magic_trace.steps])
    np.testing.assert_array_equal(path.get_ydata(), np.arange(len(magic_trace.steps)))
    forced = line(ax, plots.FORCED_LABEL)
    np.testing.assert_array_equal(forced.get_xdata(), [3])
    np.testing.assert_array_equal(forced.get_ydata(), [2])


def test_plot_decode_of_any_column_and_its_errors(magic_trace, contrastive_trace):
    ax = plots.plot_decode(magic_trace, "clip_score").axes[0]
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), [s.clip_score for s in magic_trace.steps])
    with pytest.raises(MagicEduError, match="does not record it"):
        plots.plot_decode(contrastive_trace, "clip_score")
    with pytest.raises(MagicEduError, match="column must be one of"):
        plots.plot_decode(magic_trace, "nonsense")


def test_plot_decode_of_a_greedy_trace_pads_the_sampled_column(tiny_lm):
    trace = Stepper(tiny_lm, "top_k", k=30, seed=3, max_new_tokens=6, stop_at_eos=False).run()[0].trace
    matrix = plots.decode_matrix(trace, "lm_prob")
    assert matrix.shape[1] == max(s.k for s in trace.steps)
    path = line(plots.plot_decode(trace, "lm_prob").axes[0], plots.PATH_LABEL)
    np.testing.assert_array_equal(path.get_xdata(), [s.chosen for s in trace.steps])


# -- degeneration ------------------------------------------------------------------------------
def test_plot_degeneration_marks_the_pairs_behind_each_penalty(magic_trace):
    ax = plots.plot_degeneration(magic_trace).axes[0]
    matrix, positions = analysis.degeneration_matrix(magic_trace)
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), matrix)
    marks = line(ax, plots.PENALTY_PAIR_LABEL)
    np.testing.assert_array_equal(marks.get_xdata(), positions)
    np.testing.assert_array_equal(marks.get_ydata(), np.arange(len(magic_trace.steps)))
    assert [s.penalty_position[s.chosen] for s in magic_trace.steps] == positions


def test_plot_degeneration_needs_hidden_state_similarities(greedy_trace):
    with pytest.raises(MagicEduError, match="contrastive or MAGIC"):
        plots.plot_degeneration(greedy_trace)


# -- CLIP --------------------------------------------------------------------------------------
def test_plot_clip_step_shows_the_image_and_the_scored_texts(magic_trace, greedy_trace, image):
    record = magic_trace.steps[1]
    fig = plots.plot_clip_step(magic_trace, 1, image)
    ax_img, ax = fig.axes
    assert ax_img.images[0].get_array().shape[:2] == (image.height, image.width)
    bars = container(ax, "CLIP score")
    widths = [b.get_width() for b in bars]
    np.testing.assert_allclose(widths, sorted(record.clip_score, reverse=True))
    chosen = [i for i, b in enumerate(bars) if b.get_hatch()]
    assert len(chosen) == 1 and widths[chosen[0]] == pytest.approx(record.clip_score[record.chosen])
    assert ax.get_yticklabels()[chosen[0]].get_text().startswith(plots.CHOSEN_MARK)
    with pytest.raises(MagicEduError, match="only MAGIC"):
        plots.plot_clip_step(greedy_trace, 0)


def test_plot_clip_over_decode(magic_trace, contrastive_trace):
    ax_tok, ax_text = plots.plot_clip_over_decode(magic_trace).axes
    np.testing.assert_allclose(line(ax_tok, "chosen token's CLIP score").get_ydata(),
                               [s.clip_score[s.chosen] for s in magic_trace.steps])
    np.testing.assert_allclose(line(ax_text, "cos(image, whole text so far)").get_ydata(),
                               [s.clip_cosine[s.chosen] for s in magic_trace.steps])
    with pytest.raises(MagicEduError, match="only MAGIC"):
        plots.plot_clip_over_decode(contrastive_trace)


# -- decoders side by side, sweeps, saved traces -----------------------------------------------
def test_plot_decoders_marks_the_split_and_why(greedy_trace, contrastive_trace, magic_trace):
    traces = [greedy_trace, contrastive_trace, magic_trace]
    split = analysis.divergence_step([analysis.chosen_ids(t) for t in traces])
    assert split is not None
    fig = plots.plot_decoders(traces)
    ax, ax_table = fig.axes
    [marker] = [ln for ln in ax.get_lines() if "explained" in ln.get_label()]
    assert marker.get_xdata()[0] == split - 0.5
    assert [t.get_text() for t in ax.get_yticklabels()] == ["greedy", "contrastive", "magic"]
    # in each lane after the first, the one bold token is where it leaves the first lane's path
    for row, trace in enumerate(traces[1:], start=1):
        leaves = analysis.divergence_step([analysis.chosen_ids(traces[0]), analysis.chosen_ids(trace)])
        bold = [round(t.get_position()[0]) for t in ax.texts
                if round(t.get_position()[1]) == row and t.get_fontweight() == "bold"]
        assert bold == ([leaves] if leaves is not None else [])
    cells = ax_table.tables[0].get_celld()
    for row, trace in enumerate(traces, start=1):
        record = trace.steps[split]
        assert cells[row, 0].get_text().get_text() == f"“{analysis.token_label(record.chosen_token)}”"
        assert cells[row, 1].get_text().get_text() == f"#{record.chosen + 1}"


def test_plot_decoders_when_all_agree(greedy_trace):
    fig = plots.plot_decoders({"a": greedy_trace, "b": greedy_trace})
    assert "same tokens" in fig.axes[0].get_title(loc="left")


def test_plot_sweep_marks_the_best_cell():
    import pandas as pd

    frame = pd.DataFrame([{"k": k, "alpha": a, "beta": b, "clip_cosine": a + 2 * b + k}
                          for k in (4, 8) for a in (0.0, 0.5) for b in (0.0, 1.0, 2.0)])
    fig = plots.plot_sweep(frame, "clip_cosine")
    assert len(fig.axes) == 4  # two maps and their colour bars
    for ax in fig.axes[:2]:
        [star] = [ln for ln in ax.get_lines() if ln.get_label().startswith("largest")]
        assert round(star.get_xdata()[0]) == 1 and round(star.get_ydata()[0]) == 2  # alpha 0.5, beta 2
    with pytest.raises(MagicEduError):
        plots.plot_sweep(frame, "nope")
    with pytest.raises(MagicEduError, match="x must be one of"):
        plots.plot_sweep(frame, x="p")


def test_plot_sweep_with_one_axis_or_none_averages_the_rest():
    """y None: one row of cells, each the mean over the rows sharing x; x None too: one cell, the mean of all."""
    import pandas as pd

    frame = pd.DataFrame([{"p": p, "seed": s, "tokens": 10 * p + s} for p in (0.5, 0.9) for s in (0, 1, 2)])
    ax = plots.plot_sweep(frame, "tokens", x="p", y=None, facet=None).axes[0]
    cells = sorted(float(t.get_text()) for t in ax.texts)
    assert cells == [6.0, 10.0]  # 10 * 0.5 + mean(0, 1, 2); 10 * 0.9 + 1
    [star] = [ln for ln in ax.get_lines() if ln.get_label().startswith("largest")]
    assert round(star.get_xdata()[0]) == 1 and ax.get_xlabel() == "p" and list(ax.get_yticks()) == []
    ax = plots.plot_sweep(frame, "tokens", x=None, y=None, facet=None).axes[0]
    assert [float(t.get_text()) for t in ax.texts] == [8.0]


def test_plots_work_from_a_saved_trace_with_no_model(magic_trace, tmp_path):
    path = magic_trace.save(tmp_path / "trace.json")
    for plot in (plots.plot_step, plots.plot_decode, plots.plot_degeneration, plots.plot_clip_over_decode):
        assert isinstance(plot(str(path)), Figure)
    loaded = Trace.load(path)
    a = plots.plot_step(loaded, 2).axes[0]
    np.testing.assert_allclose(line(a, plots.TOTAL_LABEL).get_xdata(), magic_trace.steps[2].score)
    assert isinstance(plots.to_png(plots.plot_step(path, 0)), bytes)


def test_plots_never_leave_pyplot_figures_open(magic_trace):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_step(magic_trace)
    plots.plot_decode(magic_trace)
    assert plt.get_fignums() == before


# -- beam search and sampling ------------------------------------------------------------------
@pytest.fixture(scope="module")
def beam_gen():
    """Beam search with a model that ends often (+3 on EOS's logit): hypotheses finish before the last step."""
    from magic_edu import beam_search
    from magic_edu.tools.random_models import random_language_model

    lm = random_language_model(seed=1, n_layer=2, n_embd=48, dtype=torch.float64)
    head = torch.nn.Linear(48, lm.vocab_size, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(lm.model.lm_head.weight)
        head.bias.zero_()
        head.bias[lm.eos_token_id] = 3.0
    lm.model.lm_head = head
    return beam_search(lm, num_beams=3, length_penalty=1.0, max_new_tokens=7)


def test_plot_beams_draws_every_beam_and_finished_hypothesis(beam_gen, greedy_trace):
    trace = beam_gen.trace
    kept = sum(b >= 0 for s in trace for b in s.next_beam)
    finished = sum(not math.isnan(h) for s in trace for h in s.hypothesis_score)
    assert finished >= 1 and trace.steps[0].next_beam.count(-1) < trace.steps[0].k
    ax = plots.plot_beams(trace).axes[0]
    boxes = [t for t in ax.texts if "\n" in t.get_text()]  # one per beam that goes on or hypothesis that ended
    assert len(boxes) == kept + finished
    for t in boxes:  # each at its step's column, its beam's row (or below the beams when it finished)
        step, row = round(t.get_position()[0]) - 1, round(t.get_position()[1])
        record = trace.steps[step]
        label, number = t.get_text().split("\n")
        i = next(i for i in range(record.k) if analysis.token_label(record.tokens[i]).startswith(label.rstrip("…"))
                 and (record.next_beam[i] == row if row < 3 else record.next_beam[i] == -1))
        assert number == (f"{record.score[i]:.2f}" if row < 3 else f"score {record.hypothesis_score[i]:.2f}")
    # the result's path is bold, one box a token, in order
    bold = sorted((t for t in boxes if t.get_fontweight() == "bold"), key=lambda t: t.get_position()[0])
    assert [round(t.get_position()[0]) - 1 for t in bold] == list(range(len(beam_gen.token_ids)))
    assert [t.get_text().split("\n")[0] for t in bold] == [plots._token(trace.steps[s].tokens[i], 10)
                                                           for s, i in analysis.output_path(trace)]
    assert analysis.chosen_ids(trace) == beam_gen.token_ids
    # up to a step: only the columns so far
    early = plots.plot_beams(trace, 1).axes[0]
    assert max(round(t.get_position()[0]) for t in early.texts) == 2
    with pytest.raises(MagicEduError, match="needs a beam search trace"):
        plots.plot_beams(greedy_trace)


def test_the_other_plots_take_a_beam_trace(beam_gen, greedy_trace, tmp_path):
    trace = Trace.load(beam_gen.trace.save(tmp_path / "beam.json"))  # from the file alone
    ax = plots.plot_step(trace, 1).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert all(label.lstrip(plots.CHOSEN_MARK).startswith(f"beam {b} + ")
               for label, b in zip(labels, trace.steps[1].beam))
    path = line(plots.plot_decode(trace, "score").axes[0], plots.PATH_LABEL)  # the result's path, not each step's best
    np.testing.assert_array_equal(path.get_xdata(), [i for _, i in analysis.output_path(trace)])
    np.testing.assert_array_equal(path.get_ydata(), [s for s, _ in analysis.output_path(trace)])
    fig = plots.plot_decoders([greedy_trace, trace], ["greedy", "beam"])
    lane = sorted((t for t in fig.axes[0].texts if round(t.get_position()[1]) == 1), key=lambda t: t.get_position()[0])
    assert [t.get_text() for t in lane] == [plots._token(beam_gen.trace.steps[s].tokens[i], 9)
                                            for s, i in analysis.output_path(trace)]


def test_plot_step_of_a_sampling_trace(tiny_lm):
    trace = Stepper(tiny_lm, "typical", mass=0.5, temperature=1.2, seed=1, max_new_tokens=3).run()[0].trace
    ax = plots.plot_step(trace, 0).axes[0]
    np.testing.assert_allclose([b.get_width() for b in container(ax, plots.PROB_LABEL)], trace.steps[0].lm_prob)
    assert "T=1.2" in ax.get_title(loc="left") and "mass=0.5" in ax.get_title(loc="left")


# -- ZeroCap ---------------------------------------------------------------------------------------
def test_plot_step_of_a_zerocap_trace_shows_how_the_distribution_moved(tiny_lm, tiny_clip, image, tmp_path):
    """Three bars a candidate (p0, p after the gradient steps, q) and a tick at CLIP's target, from the
    file alone; the other plots take the trace too, or say why not."""
    gen = Stepper(tiny_lm, "zerocap", clip=tiny_clip, image=image, prompt="a red", num_iterations=2, candidates=6,
                  num_beams=2, max_new_tokens=3).run()[0]
    trace = Trace.load(gen.trace.save(tmp_path / "zerocap.json"))
    record = trace.steps[1]
    ax = plots.plot_step(trace, 1).axes[0]
    for column, label, _ in plots.ZEROCAP_BARS:
        np.testing.assert_allclose([b.get_width() for b in container(ax, label)], getattr(record, column)[:20])
    np.testing.assert_allclose(line(ax, plots.TARGET_LABEL).get_xdata(), record.clip_score[:20])
    labels = [t.get_text().lstrip(plots.CHOSEN_MARK) for t in ax.get_yticklabels()]
    assert all(label.startswith(f"beam {b} + ") for label, b in zip(labels, record.beam))
    plots.plot_decode(trace, "lm_prob")
    plots.plot_clip_over_decode(trace)
    plots.plot_decoders([gen.trace, trace], ["zerocap", "again"])
    with pytest.raises(MagicEduError, match="records no hidden-state similarities"):
        plots.plot_degeneration(trace)
