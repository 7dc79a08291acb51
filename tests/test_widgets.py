"""The widgets, driven as a student would: clicks, sliders, forcing a candidate, bad input."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from magic_edu import MagicEduError, Stepper
from magic_edu.presets import ModelSet, data_dir, load_models
from magic_edu.registry import DECODERS
from magic_edu.tools import analysis
from magic_edu.toyworld import shapes
from magic_edu.views.widgets import CompareDecoders, ImagePicker, StepThrough, Sweep

from conftest import make_image

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def models(tiny_lm, tiny_clip) -> ModelSet:
    return ModelSet(name="tiny", kind="caption", lm=tiny_lm, clip=tiny_clip,
                    defaults={"k": 5, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 8})


@pytest.fixture
def image():
    return make_image(3)


def upload_entry(content: bytes, name: str = "mine.png") -> dict:
    return {"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.now(timezone.utc)}


def png_file(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def visible_rows(w: StepThrough):
    return [r for r in w.rows if r.layout.display != "none"]


def no_error(w) -> None:
    assert "Problem" not in w.message.value, w.message.value


# -- StepThrough -------------------------------------------------------------------------------
def test_step_through_next_shows_text_table_and_plot(models, image):
    w = StepThrough(models, image)
    no_error(w)
    assert len(w.trace.steps) == 0 and "No step yet" in w.text_view.value
    assert w.back_button.disabled and not w.next_button.disabled and visible_rows(w) == []
    for _ in range(3):
        w.next_button.click()
    no_error(w)
    trace = w.trace
    assert len(trace.steps) == 3
    newest = trace.steps[-1]
    # the text so far, the newest token marked
    assert "◀ newest" in w.text_view.value
    label = analysis.token_label(newest.chosen_token)
    assert w.text_view.value.index(label.replace("&", "&amp;")) < w.text_view.value.index("◀ newest")
    # the table: one row per candidate of the latest step, the chosen one marked
    rows = visible_rows(w)
    assert len(rows) == newest.k == 5
    for i, row in enumerate(rows):
        assert f"#{i + 1}" in row.cells.value
        assert f"{newest.lm_prob[i]:.3f}" in row.cells.value and f"{newest.score[i]:.3f}" in row.cells.value
    assert "▶ chosen" in rows[newest.chosen].cells.value
    assert rows[newest.chosen].force.disabled and rows[newest.chosen].force.description == "taken"
    assert w.candidate_frame()["token_id"].tolist() == newest.token_ids
    # the one-step plot
    assert bytes(w.plot.value).startswith(PNG)
    assert w.view.value == 2 and w.view.max == 2


def test_step_through_shows_the_beams_of_beam_search(models, image):
    w = StepThrough(models, image, decoder="beam")
    w.num_beams.value = 3
    for _ in range(3):
        w.next_button.click()
    no_error(w)
    record, stepper = w.shown_record(), w.stepper
    rows = visible_rows(w)
    assert len(rows) == record.k == 6 and "p(v|beam)" in w.header.value
    for i, row in enumerate(rows):  # every candidate: the beam it extends, its summed log p and what became of it
        fate = f"→ beam {record.next_beam[i]}" if record.next_beam[i] >= 0 else "dropped"
        assert f"beam {record.beam[i]} + " in row.cells.value and f"{record.score[i]:.3f}" in row.cells.value
        assert fate in row.cells.value or "finished" in row.cells.value
        assert row.force.disabled  # nothing to force
    # the text: the best beam's tokens, then every beam with its summed log-probability
    assert w.text_view.value.count("Σ log p") == len(stepper.beams()) == 3
    best_ids, best_log_p = stepper.beams()[0]
    assert f"{best_log_p:.3f}" in w.text_view.value and best_ids == stepper.token_ids()
    assert bytes(w.plot.value).startswith(PNG)
    w.force(1)
    assert "not meaningful for beam search" in w.message.value and len(w.trace.steps) == 3
    w.back_button.click()
    no_error(w)
    assert len(w.trace.steps) == 2 and w.stepper.step_index == 2
    w.run_button.click()
    no_error(w)
    assert w.stepper.done and "The search stopped" in w.text_view.value
    assert w.stepper.token_ids() == stepper.hypotheses()[0][0] and analysis.chosen_ids(w.trace) == w.stepper.token_ids()
    w.view.value = 0  # an earlier step: its table and its part of the tree
    no_error(w)
    assert w.shown_record().step == 0 and bytes(w.plot.value).startswith(PNG)
    before = plt.get_fignums()
    assert isinstance(w.snapshot(), Figure) and plt.get_fignums() == before


def test_step_through_shows_what_sampling_draws_from(models, image):
    w = StepThrough(models, image, decoder="typical")
    w.mass.value = 0.5
    w.next_button.click()
    no_error(w)
    record = w.shown_record()
    assert "filtered p" in w.header.value and "penalty" not in w.header.value
    for i, row in enumerate(visible_rows(w)):
        assert f"{record.sample_prob[i]:.3f}" in row.cells.value
    w.decoder.value = "greedy"
    assert "penalty" in w.header.value


def test_back_undoes_a_step_and_reset_clears(models, image):
    w = StepThrough(models, image)
    for _ in range(3):
        w.next_button.click()
    ids, plot_after_2 = w.stepper.token_ids(), None
    w.back_button.click()
    assert w.stepper.token_ids() == ids[:2] and len(w.trace.steps) == 2
    assert w.shown_record().step == 1
    plot_after_2 = bytes(w.plot.value)
    w.next_button.click()
    assert w.stepper.token_ids() == ids  # the same decode again
    w.back_button.click()
    assert bytes(w.plot.value) == plot_after_2
    w.reset_button.click()
    assert len(w.trace.steps) == 0 and w.back_button.disabled and visible_rows(w) == []
    w.back_button.click()  # nothing to undo: a message, not a traceback
    assert "nothing to undo" in w.message.value


def test_force_a_candidate_and_the_decode_goes_on_from_it(models, image):
    w = StepThrough(models, image)
    w.next_button.click()
    w.next_button.click()
    record = w.shown_record()
    pick = next(i for i in range(record.k) if i != record.chosen)
    forced_id = record.token_ids[pick]
    w.rows[pick].force.click()
    no_error(w)
    shown = w.shown_record()
    assert shown.step == 1 and shown.forced and shown.chosen == pick and shown.chosen_token_id == forced_id
    assert w.stepper.token_ids()[1] == forced_id
    assert "forced" in w.text_view.value and "▶ forced" in w.rows[pick].cells.value
    # continue: the next step starts from the forced token
    w.next_button.click()
    assert len(w.trace.steps) == 3 and w.trace.steps[2].text == models.lm.output_text(w.stepper.token_ids()[:2])
    # the same as a decode told to take that token
    s = Stepper(models.lm, "magic", models.clip, image, k=5, alpha=0.3, beta=1.0, max_new_tokens=8)
    s.step()
    s.step(force=forced_id)
    s.step()
    assert w.stepper.token_ids() == s.token_ids()


def test_force_at_an_earlier_step_redecodes_to_the_end(models, image):
    w = StepThrough(models, image)
    w.run_button.click()
    assert w.stepper.done and w.next_button.disabled and "Ended" in w.text_view.value
    w.view.value = 0  # look at the first step
    record = w.shown_record()
    assert record.step == 0 and bytes(w.plot.value).startswith(PNG)
    pick = (record.chosen + 1) % record.k
    w.rows[pick].force.click()
    no_error(w)
    assert w.stepper.token_ids()[0] == record.token_ids[pick]
    assert w.stepper.done  # it had run to the end, so the new path does too
    assert w.trace.steps[0].forced and not any(s.forced for s in w.trace.steps[1:])
    assert w.view.value == 0


def test_next_after_the_end_shows_a_message(models, image):
    w = StepThrough(models, image)
    w.run_button.click()
    w.next_button.click()
    assert "has ended" in w.message.value and "Traceback" not in w.message.value


def test_settings_redecode_to_the_same_step(models, image):
    w = StepThrough(models, image)
    for _ in range(3):
        w.next_button.click()
    w.alpha.value = 0.8
    no_error(w)
    assert w.trace.settings["alpha"] == 0.8 and len(w.trace.steps) == 3
    w.k.value = 7
    assert w.shown_record().k == 7 and len(visible_rows(w)) == 7
    w.decoder.value = "greedy"
    no_error(w)
    assert w.beta.disabled and w.alpha.disabled and not w.length.disabled
    assert w.trace.settings["decoder"] == "greedy" and len(w.trace.steps) == 3
    assert "–" in visible_rows(w)[0].cells.value  # no penalty for greedy
    w.decoder.value = "top_k"
    assert not w.seed.disabled and not w.k.disabled


def test_step_through_shows_zerocaps_distributions_and_beams(models, image):
    w = StepThrough(models, image, decoder="zerocap")
    enabled = {n for n, c in w.controls.items() if not c.disabled}
    assert enabled == set(DECODERS["zerocap"].param_names) - {"num_beams"} | {"zerocap.num_beams"}
    # ZeroCap's beams are its own control, at its own default (the MAGIC paper's baseline: 1), not beam search's 4
    assert w.zerocap_num_beams.value == 1 and w.num_beams.value == 4 and w.num_beams.disabled
    w.num_iterations.value, w.candidates.value, w.zerocap_num_beams.value = 1, 6, 2
    for _ in range(2):
        w.next_button.click()
    no_error(w)
    record, stepper = w.shown_record(), w.stepper
    assert w.trace.settings["num_iterations"] == 1 and w.trace.settings["num_beams"] == 2
    rows = visible_rows(w)
    assert len(rows) == record.k == 20 and "CLIP target" in w.header.value
    for i, row in enumerate(rows):  # p0, p steered, CLIP's target, q, and what became of it
        for column in ("lm_prob", "steered_prob", "clip_score", "fused_prob"):
            assert f"{getattr(record, column)[i]:.3f}" in row.cells.value
        fate = f"→ beam {record.next_beam[i]}" if record.next_beam[i] >= 0 else "dropped"
        assert f"beam {record.beam[i]} + " in row.cells.value and fate in row.cells.value
        assert row.force.disabled
    assert w.text_view.value.count("Σ log q") == len(stepper.beams()) == 2
    assert bytes(w.plot.value).startswith(PNG)
    w.force(1)
    assert "not meaningful for ZeroCap" in w.message.value and len(w.trace.steps) == 2
    w.back_button.click()
    no_error(w)
    assert len(w.trace.steps) == 1 and w.stepper.step_index == 1
    assert isinstance(w.snapshot(), Figure)


def test_the_decoders_and_their_controls_come_from_the_registry(models, image):
    w = StepThrough(models, image, decoder="top-k")  # an alias names the decoder too
    assert w.decoder.value == "top_k"
    # every decoder that takes steps (CLIP retrieval picks a whole caption: CompareDecoders shows it)
    assert w.decoder.options == tuple((d.label, d.name) for d in DECODERS.values() if not d.retrieves)
    # one control per parameter name; ZeroCap's num_beams (beam search has one too) is its own
    assert set(w.controls) == {p.name for d in DECODERS.values() for p in d.params} | {"zerocap.num_beams"}
    assert w.controls["k"] is w.k and w.controls["seed"] is w.seed and w.controls["p"] is w.p
    for decoder in (d for d in DECODERS.values() if not d.retrieves):
        w.decoder.value = decoder.name
        no_error(w)
        keys = {n: f"{decoder.name}.{n}" if f"{decoder.name}.{n}" in w.controls else n for n in decoder.param_names}
        assert {n for n, c in w.controls.items() if not c.disabled} == set(keys.values()), decoder.name
        assert not w.length.disabled
        # the decode got exactly the decoder's parameters, from the controls
        assert {n: w.trace.settings[n] for n in decoder.param_names} == {n: w.controls[k].value
                                                                         for n, k in keys.items()}
    # the sliders' ranges are the registry's, widened for the preset's values
    assert (w.alpha.min, w.alpha.max, w.alpha.step) == DECODERS["magic"].param("alpha").slider
    assert (w.p.min, w.p.max, w.p.step) == DECODERS["nucleus"].param("p").slider
    assert (w.k.value, w.alpha.value, w.beta.value) == (5, 0.3, 1.0)  # the preset's
    assert w.k.max == 50 and w.beta.max == 5.0
    with pytest.raises(MagicEduError, match="decoder must be one of greedy, top_k, nucleus, typical, beam, "
                                            "contrastive, magic"):
        StepThrough(models, image, decoder="diverse_beam")


def test_bad_settings_show_a_message_in_the_widget(models, image):
    w = StepThrough(models, image)
    w.next_button.click()
    w.prompt.value = "a red circle " * 60  # longer than the model's context
    assert "Problem" in w.message.value and "prompt" in w.message.value
    # no stale decode: nothing to step until the settings are fixed
    assert w.trace is None and w.next_button.disabled and "no decode" in w.text_view.value
    w.next()
    assert "fix the settings" in w.message.value
    w.prompt.value = ""
    no_error(w)
    assert len(w.trace.steps) == 1 and w.trace.settings["prompt"] is None  # as far as before, new settings
    w.force(99)
    assert "candidate index" in w.message.value


def test_image_picker_scenes_photos_and_uploads(models):
    picker = ImagePicker(models, source="scene", seed=9_000_001)
    scene = shapes.make_scene(9_000_001)
    assert np.array_equal(np.asarray(picker.image), np.asarray(scene.image))
    assert "9000001" in picker.caption.value and bytes(picker.preview.value).startswith(PNG)
    seen = []
    picker.on_change(lambda: seen.append(picker.description))
    picker.new_scene.click()
    assert picker.seed.value != 9_000_001 and seen == [f"toy scene {picker.seed.value}"]
    picker.source.value = "photo"
    assert picker.image.size == (451, 300) and "chelsea" in picker.description
    picker.source.value = "upload"
    assert "choose an image file" in picker.message.value
    picker.upload.value = (upload_entry(b"not an image at all", "notes.png"),)
    assert "not a readable image" in picker.message.value and "notes.png" in picker.message.value
    assert "chelsea" in picker.description  # the image did not change
    picker.upload.value = (upload_entry(png_file(5)),)
    assert "Problem" not in picker.message.value
    assert picker.image.size == (40, 32) and "mine.png" in picker.description
    picker.seed.value = 9_000_002  # a scene control switches back to scenes
    assert picker.source.value == "scene" and picker.description == "toy scene 9000002"


def test_step_through_follows_the_picker(models, image):
    w = StepThrough(models, image)
    w.next_button.click()
    w.next_button.click()
    first = w.trace.steps[0].clip_cosine
    w.picker.upload.value = (upload_entry(png_file(11)),)  # uploading switches to the upload
    assert w.picker.source.value == "upload"
    no_error(w)
    assert len(w.trace.steps) == 2 and w.trace.steps[0].clip_cosine != first
    w.picker.upload.value = (upload_entry(b"\x89PNG broken"),)
    assert "not a readable image" in w.picker.message.value
    no_error(w)


def test_step_through_snapshot_is_a_static_figure(models, image):
    before = plt.get_fignums()
    w = StepThrough(models, image)
    empty = w.snapshot()
    assert isinstance(empty, Figure)
    w.next_button.click()
    w.next_button.click()
    fig = w.snapshot()
    assert isinstance(fig, Figure) and len(fig.axes) >= 2
    assert "[" + analysis.token_label(w.trace.steps[-1].chosen_token) + "]" in fig._suptitle.get_text()
    assert plt.get_fignums() == before  # nothing left open in pyplot


def test_step_through_saves_the_decode_as_one_html_page(models, image, tmp_path):
    """Save HTML writes the decode so far (every step taken, the image for MAGIC) as one page; without
    a step, or where no file can be written (under a file), it says so in the message."""
    from magic_edu.views.export import decode_data

    w = StepThrough(models, image)
    w.save_html(str(tmp_path / "none.html"))
    assert "take a first step" in w.message.value and not (tmp_path / "none.html").exists()
    for _ in range(3):
        w.next_button.click()
    w.html_path.value = str(tmp_path / "decode.html")
    w.html_button.click()
    no_error(w)
    page = (tmp_path / "decode.html").read_text()
    assert "wrote" in w.message.value and "<img" in page and "http://" not in page and "https://" not in page
    assert len(decode_data(w.trace)["steps"]) == 3 and page.count('"step"') >= 3
    w.save_html(str(tmp_path / "decode.html" / "inside_a_file.html"))
    assert "cannot write it" in w.message.value and "Traceback" not in w.message.value


# -- CompareDecoders -------------------------------------------------------------------------
def test_compare_decoders_runs_zerocap_when_asked(tiny_lm, tiny_clip, image):
    models = ModelSet(name="tiny", kind="caption", lm=tiny_lm, clip=tiny_clip,
                      defaults={"k": 5, "alpha": 0.3, "beta": 1.0, "max_new_tokens": 3})
    w = CompareDecoders(models, image, zerocap=True)
    no_error(w)
    assert list(w.frame["decoder"]) == ["greedy", "beam", "contrastive", "magic", "zerocap", "top_k"]
    settings = {n: w.controls["zerocap.num_beams" if n == "num_beams" else n].value
                for n in DECODERS["zerocap"].param_names}
    # each at its own default: beam search 4 beams, ZeroCap 1 (the MAGIC paper's baseline)
    assert settings["num_beams"] == 1 and w.generations["beam"].trace.settings["num_beams"] == 4
    want = Stepper(tiny_lm, "zerocap", clip=tiny_clip, image=image, max_new_tokens=3, **settings).run()[0]
    assert w.generations["zerocap"].token_ids == want.token_ids and "zerocap" in w.table.value
    with pytest.raises(MagicEduError, match="zerocap must be True or False"):
        CompareDecoders(models, image, zerocap="yes")


def test_compare_decoders_side_by_side(models, image):
    w = CompareDecoders(models, image)
    no_error(w)
    frame = w.frame
    assert list(frame["decoder"]) == ["greedy", "beam", "contrastive", "magic", "top_k"]  # ZeroCap: when asked
    gens = w.generations
    assert w.divergence == analysis.divergence_step([gens[n].token_ids for n in ("greedy", "beam", "contrastive",
                                                                                 "magic")])
    if w.divergence is not None:
        assert f"split at step {w.divergence}" in w.summary.value
    leaves = analysis.divergence_step([gens["greedy"].token_ids, gens["top_k"].token_ids])
    assert w.leaves["top_k"] == leaves
    assert (f"leaves the greedy path at step {leaves}" if leaves is not None else "all the way") in w.summary.value
    for (_, row), gen in zip(frame.iterrows(), gens.values()):
        assert row["text"] == gen.text
        assert row["log_likelihood"] == pytest.approx(analysis.lm_log_likelihood(models.lm, gen.token_ids))
        assert row["log_likelihood_per_token"] == pytest.approx(row["log_likelihood"] / len(gen.token_ids))
        assert row["clip_cosine"] == pytest.approx(float(analysis.caption_clip_score(models.clip, image, gen.text)),
                                                   abs=1e-6)
        assert f"{row['log_likelihood']:.2f}" in w.table.value
    assert bytes(w.plot.value).startswith(PNG)
    # contrastive search uses MAGIC's k and alpha; beta = 0 would make MAGIC the same as it
    w.beta.value = 0.0
    assert w.generations["magic"].token_ids == w.generations["contrastive"].token_ids
    assert w.sampler.options == tuple((d.label, d.name) for d in DECODERS.values() if d.samples)
    assert w.p.disabled  # no decoder compared takes p
    w.sampler.value = "nucleus"
    assert list(w.frame["decoder"])[-1] == "nucleus" and not w.p.disabled
    w.p.value = 0.5
    no_error(w)
    assert w.generations["nucleus"].trace.settings["p"] == 0.5 and w.generations["nucleus"].trace.settings["seed"] == 0
    assert "nucleus sampling" in w.summary.value
    fig = w.snapshot()
    assert isinstance(fig, Figure)
    with pytest.raises(MagicEduError, match="sampler must be one of top_k, nucleus"):
        CompareDecoders(models, image, sampler="greedy")


def test_compare_decoders_reports_repeats_and_bad_settings(models, image):
    w = CompareDecoders(models, image)
    greedy = w.generations["greedy"].text
    expected = analysis.repeated_ngrams(greedy, 2)
    assert w.frame.loc[0, "repeated_2grams"] == sum(c - 1 for c in expected.values())
    w.prompt.value = "x " * 300
    assert "Problem" in w.message.value


# -- Sweep -----------------------------------------------------------------------------------
def test_sweep_runs_a_grid_with_progress(models, image):
    w = Sweep(models, image, alphas="0, 0.5", betas="0, 1", ks="3")
    assert w.frame.empty and isinstance(w.snapshot(), Figure)
    w.length.value = 4
    w.run_button.click()
    no_error(w)
    assert w.progress.value == w.progress.max == 4 and w.progress.description == "4 / 4"
    frame = w.frame
    assert len(frame) == 4 and set(zip(frame["alpha"], frame["beta"])) == {(0, 0), (0, 1), (0.5, 0), (0.5, 1)}
    gen = Stepper(models.lm, "magic", models.clip, image, k=3, alpha=0.5, beta=1.0, max_new_tokens=4).run()[0]
    row = frame[(frame["alpha"] == 0.5) & (frame["beta"] == 1.0)].iloc[0]
    assert row["text"] == gen.text and row["tokens"] == len(gen.token_ids)
    assert bytes(w.plot.value).startswith(PNG) and "<table" in w.table.value
    before = bytes(w.plot.value)
    w.value.value = "log_likelihood_per_token"
    assert bytes(w.plot.value) != before
    assert isinstance(w.snapshot(), Figure)


@pytest.mark.parametrize("field, value, expected", [
    ("alphas", "0, abc", "not a list of numbers"),
    ("alphas", "0.2, 1.5", "between 0 and 1"),
    ("betas", "", "at least one value"),
    ("ks", "0", "every k must be"),
    ("alphas", ", ".join(str(i / 100) for i in range(100)), "at most"),  # x 4 betas = 400 settings
])
def test_sweep_bad_grids_show_a_message(models, image, field, value, expected):
    w = Sweep(models, image, alphas="0", betas="0, 1, 2, 3", ks="2")
    getattr(w, field).value = value
    w.run_button.click()
    assert expected in w.message.value and w.frame.empty


def test_sweep_runs_any_decoder_of_the_registry(models, image):
    """Nucleus sampling over p x seed: each row is the decoder's own output with that setting (the
    same call outside the widget); switching decoder gives that decoder's boxes, and the heat map
    puts the parameter with the most values on x."""
    w = Sweep(models, image, decoder="nucleus", values={"p": "0.3, 0.9", "seed": "0, 1, 2"})
    assert set(w.fields) == {"p", "temperature", "seed"} and w.fields["temperature"].value == "1"
    w.length.value = 5
    w.run_button.click()
    no_error(w)
    assert len(w.frame) == 6 and w.axes() == ("seed", "p", None)
    for _, row in w.frame.iterrows():
        gen = Stepper(models.lm, "nucleus", p=row["p"], seed=int(row["seed"]), max_new_tokens=5).run()[0]
        assert row["text"] == gen.text and row["temperature"] == 1.0
    assert bytes(w.plot.value).startswith(PNG)
    w.decoder.value = "beam"
    assert set(w.fields) == {"num_beams", "length_penalty"} and w.frame.empty
    w.fields["num_beams"].value = "1, 3"
    w.run_button.click()
    no_error(w)
    want = Stepper(models.lm, "beam", num_beams=3, length_penalty=1.0, max_new_tokens=5).run()[0]
    assert w.frame[w.frame["num_beams"] == 3].iloc[0]["text"] == want.text
    assert w.axes() == ("num_beams", None, None) and isinstance(w.snapshot(), Figure)  # one row of cells
    w.decoder.value = "greedy"
    w.run_button.click()
    no_error(w)
    assert len(w.frame) == 1 and w.frame.iloc[0]["text"] == Stepper(models.lm, "greedy", max_new_tokens=5).run()[0].text


def test_sweep_varies_at_most_three_parameters(models, image):
    w = Sweep(models, image, decoder="magic", alphas="0, 0.5", betas="0, 1", ks="2, 3",
              values={"clip_text_max_len": "10, 20"})
    w.run_button.click()
    assert "vary at most three parameters" in w.message.value and w.frame.empty
    w.fields["clip_text_max_len"].value = "20"
    w.length.value = 3
    w.run_button.click()
    no_error(w)
    assert len(w.frame) == 8 and w.axes() == ("k", "alpha", "beta")


# -- the real toy models ---------------------------------------------------------------------
def test_widgets_on_the_toy_models():
    if not (data_dir() / "toy" / "defaults.json").is_file():
        pytest.skip(f"the toy models are not trained yet: {data_dir() / 'toy'} has no defaults.json "
                    "(python -m magic_edu.toyworld.train --out data/toy)")
    toy = load_models("toy")
    w = StepThrough(toy)
    no_error(w)
    assert w.picker.source.value == "scene"
    w.next_button.click()
    w.next_button.click()
    record = w.shown_record()
    assert len(visible_rows(w)) == toy.defaults["k"]
    pick = (record.chosen + 1) % record.k
    w.rows[pick].force.click()
    assert w.stepper.token_ids()[record.step] == record.token_ids[pick]
    w.run_button.click()
    no_error(w)
    assert w.stepper.done and w.stepper.text() in w.text_view.value
    compare = CompareDecoders(toy)
    no_error(compare)
    assert list(compare.frame["decoder"]) == ["greedy", "beam", "contrastive", "magic", "top_k"]
    sweep = Sweep(toy, alphas="0.1", betas="0, 1")
    sweep.run_button.click()
    no_error(sweep)
    assert len(sweep.frame) == 2


def test_an_invalid_seed_blocks_stepping_until_fixed(models, image):
    """The hardening issue's probe: seed -1, then Next, must not step the old decode."""
    w = StepThrough(models, image, decoder="top_k")
    w.next_button.click()
    w.seed.value = -1
    assert "seed" in w.message.value and w.trace is None
    w.next_button.click()  # a click on a disabled button still reaches the handler in tests
    assert w.trace is None and "fix the settings" in w.message.value
    w.seed.value = 3
    no_error(w)
    assert w.trace.settings["seed"] == 3 and len(w.trace.steps) == 1
