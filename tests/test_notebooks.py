"""The course notebooks: committed clean, and every one runs top to bottom, headless and offline.

* Static checks (fast): the nine notebooks exist in teaching order; each is under 2 MB, holds no
  widget state and no error or stderr output, has its outputs committed, and has learning
  goals, the MODELS switch, exercises (answer cell, checker cell, hidden solution) and further
  reading. See ``magic_edu.course.notebook_tools.problems``.
* Execution (slow): each notebook runs in a fresh ``python3`` kernel with nbclient on the toy
  world, fails on the first error, and must finish within ``MAGIC_EDU_NOTEBOOK_LIMIT_S``
  seconds (default 90: 1.5 x the course's promise of 60 s on 2 CPU cores, which is checked on
  the run times recorded in ``notebooks/run_times.json``). Along the way every exercise's
  hidden solution is run through its checker, which must answer "✅ Right".
"""

from __future__ import annotations

import os

import pytest

from magic_edu.course import notebook_tools as nt
from magic_edu.presets import data_dir

COURSE = [
    "01_tour_and_setup.ipynb",
    "02_decoding_basics.ipynb",
    "03_contrastive_search.ipynb",
    "04_clip.ipynb",
    "05_magic_step_by_step.ipynb",
    "06_comparing_decoders.ipynb",
    "07_hyperparameters.ipynb",
    "08_beyond_captions_stories.ipynb",
    "09_evaluation_and_speed.ipynb",
]
# The course promises < 60 s per notebook on 2 cores; test_run_times_are_recorded_and_within_the_limit
# checks that on the recorded times. Executing here allows 1.5 x that, so that a machine busy with
# other work does not fail the suite, while a notebook that hangs or gets much slower still does.
LIMIT_S = float(os.environ.get("MAGIC_EDU_NOTEBOOK_LIMIT_S", 1.5 * nt.TIME_LIMIT_S))


def test_the_course_is_complete_and_in_order():
    assert [p.name for p in nt.notebook_paths()] == COURSE


@pytest.mark.parametrize("name", COURSE)
def test_committed_notebook_is_clean(name):
    path = nt.NOTEBOOKS / name
    assert path.is_file(), f"{path} is missing"
    assert nt.problems(path) == []


@pytest.mark.parametrize("name", COURSE)
def test_course_map_has_a_goal_for_every_notebook(name):
    title, goal = nt.title_and_goal(nt.read(nt.NOTEBOOKS / name))
    assert title and title[0].isdigit(), title
    assert len(goal) > 30, goal


def test_run_times_are_recorded_and_within_the_limit():
    times = nt.read_run_times().get("notebooks", {})
    assert sorted(times) == COURSE, "run python -m magic_edu.course.notebook_tools run to record them"
    slow = {name: t for name, t in times.items() if t > nt.TIME_LIMIT_S}
    assert not slow, f"notebooks over {nt.TIME_LIMIT_S:.0f} s: {slow}"


def test_cleaning_strips_widget_state_and_keeps_a_text_fallback():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    cell = nbformat.v4.new_code_cell("w", execution_count=1)
    cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
            "text/plain": "VBox(children=(...))"}),
        nbformat.v4.new_output("stream", name="stderr", text="PTBTokenizer tokenized 12 tokens at 3.5 tokens per "),
        nbformat.v4.new_output("stream", name="stderr", text="second.\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBO", "image/jpeg": "/9j/", "text/plain": "x"}),
    ]
    nb.cells = [cell]
    nt.clean(nb)
    assert "widgets" not in nb.metadata and "execution" not in cell.metadata
    assert cell.outputs[0]["data"] == {"text/plain": nt.WIDGET_PLACEHOLDER}
    assert len(cell.outputs) == 2 and set(cell.outputs[1]["data"]) == {"image/png", "text/plain"}
    nbformat.validate(nb)


@pytest.mark.slow
@pytest.mark.parametrize("name", COURSE)
def test_notebook_runs_headless(name):
    if not (data_dir() / "toy" / "defaults.json").is_file():
        pytest.fail(f"the toy world is missing from {data_dir() / 'toy'}: the notebooks run on it", pytrace=False)
    from nbclient.exceptions import CellExecutionError

    try:
        result = nt.execute(nt.NOTEBOOKS / name, cell_timeout=LIMIT_S, time_limit=LIMIT_S, check_solutions=True)
    except CellExecutionError as err:
        pytest.fail(f"{name} raised:\n{str(err)[-4000:]}", pytrace=False)
    except TimeoutError as err:
        pytest.fail(f"{name} is too slow: {err}", pytrace=False)
    assert result.seconds <= LIMIT_S, f"{name} took {result.seconds:.1f} s (limit {LIMIT_S:.0f} s)"
    errors = [o for c in result.nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    checks = [i for i, c in enumerate(result.nb.cells) if nt.CHECK_TAG in nt.tags(c)]
    assert sorted(result.solutions) == checks, "an exercise's solution was not run"
    wrong = {i: v for i, v in result.solutions.items() if not v.startswith(nt.RIGHT_MARK)}
    assert not wrong, f"hidden solutions the checkers do not accept: {wrong}"


def test_write_is_atomic_leaves_no_temporary_file_and_keeps_the_format(tmp_path, monkeypatch):
    import json

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Título"), nbformat.v4.new_code_cell("1 + 1", execution_count=1)]
    path = tmp_path / "small.ipynb"
    nt.write(nb, path)
    assert path.read_bytes() == (nbformat.writes(nb) + "\n").encode("utf-8")
    assert os.listdir(tmp_path) == ["small.ipynb"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    path.chmod(0o600)
    nt.write(nb, path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)  # an existing file keeps its mode

    before = path.read_bytes()
    nb.cells[0].source = "# changed"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(nt.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        nt.write(nb, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["small.ipynb"]
    monkeypatch.undo()

    times = nt.write_run_times({"b.ipynb": 2.04, "a.ipynb": 1.0}, folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == [nt.RUN_TIMES, "small.ipynb"]
    text = times.read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=1) + "\n"
    assert data["notebooks"] == {"a.ipynb": 1.0, "b.ipynb": 2.0}
