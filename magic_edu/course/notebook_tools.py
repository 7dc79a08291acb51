"""Run, clean and check the course notebooks (``notebooks/NN_*.ipynb``).

    python -m magic_edu.course.notebook_tools run            # execute every notebook in place, clean, check
    python -m magic_edu.course.notebook_tools run 05         # only notebooks whose name starts with 05
    python -m magic_edu.course.notebook_tools check          # check the committed notebooks, run nothing
    python -m magic_edu.course.notebook_tools course-map     # the README's course map (goal, run time)

``run`` executes each notebook top to bottom with nbclient in the ``python3`` kernel of the
interpreter that runs it (so ``.venv/bin/python -m magic_edu.course.notebook_tools run`` uses the
venv), offline (``HF_HUB_OFFLINE=1``) and with one intra-op thread (``OMP_NUM_THREADS=1``: the
toy models gain nothing from more, and lose a lot when other processes compete for the cores),
then cleans what it writes:

* no widget state: ``metadata.widgets`` and every ``application/vnd.jupyter.widget-state+json``
  go. A live widget's output (``application/vnd.jupyter.widget-view+json``) would point at a
  model that no longer exists once the kernel is gone: JupyterLab shows "Error displaying
  widget: model not found" and GitHub shows the widget's Python repr. So it is replaced by one
  plain-text line saying that the widget comes alive when the notebook runs; each notebook
  shows the widget's ``snapshot()`` figure right under it.
* no timing or run-specific metadata (``execution``, ``ExecuteTime``, the Python version).

Each notebook's wall time (kernel start to last cell) goes to ``notebooks/run_times.json``,
from which ``course-map`` prints the README's table. ``check`` fails on a notebook of 2 MB or
more, on widget state, error outputs, stderr output, or a missing section (learning goals,
exercises with their checkers and hidden solutions, further reading).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trace import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
RUN_TIMES = "run_times.json"
MAX_BYTES = 2_000_000
TIME_LIMIT_S = 60.0  # each notebook, top to bottom, on 2 CPU cores

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_PLACEHOLDER = ("[interactive widget: it comes alive when you run this notebook in JupyterLab; "
                      "the figure below is a snapshot of it]")
CELL_METADATA_DROP = ("execution", "ExecuteTime", "widgets")
ANSWER_TAG, CHECK_TAG = "answer", "check"
OFFLINE_ENV = {  # the environment of the kernels that run the notebooks
    "HF_HUB_OFFLINE": "1",
    # one intra-op thread: the toy models are too small to gain from more, and on a busy machine
    # OpenMP threads spinning against other processes make them many times slower
    "OMP_NUM_THREADS": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also silences transformers' "Loading weights" bars
    "TQDM_DISABLE": "1",
}
RIGHT_MARK = "✅"
# progress lines of tools the notebooks call, harmless and dropped from committed outputs
# (pycocoevalcap's Java PTB tokenizer writes one to stderr on every call)
NOISE = re.compile(r"^PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.\n?", re.M)


# -- finding notebooks ----------------------------------------------------------------------
def notebook_paths(folder: str | os.PathLike = NOTEBOOKS, only: Sequence[str] = ()) -> list[Path]:
    """The course notebooks in teaching order (``NN_name.ipynb``); ``only`` keeps names starting
    with one of its strings (``"05"``, ``"05_magic"``) or equal to a path."""
    paths = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) or Path(o).resolve() == p.resolve() for o in only)]
    return paths


def read(path: str | os.PathLike) -> Any:
    import nbformat

    return nbformat.read(str(path), as_version=4)


def tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


# -- executing ---------------------------------------------------------------------------
@dataclass
class Execution:
    """One run of a notebook: the executed notebook, its wall time and, with solutions
    checked, the checker's verdict (first output line) for every exercise's hidden solution."""

    nb: Any
    seconds: float
    solutions: dict[int, str] = field(default_factory=dict)  # index of the check cell -> verdict line


def solution_code(nb: Any, check_index: int) -> str | None:
    """The Python code of the hidden solution after the check cell ``check_index``: the first
    ```python block of the next markdown cell holding a <details> block."""
    for cell in nb.cells[check_index + 1:]:
        if cell.cell_type == "code":
            return None
        if "<details" in cell.source:
            m = re.search(r"```python\n(.*?)```", cell.source, flags=re.S)
            return m.group(1) if m else None
    return None


def _output_text(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "".join(parts)


def execute(
    source: str | os.PathLike | Any,
    *,
    cell_timeout: float = TIME_LIMIT_S,
    time_limit: float | None = None,
    check_solutions: bool = False,
    cwd: str | os.PathLike | None = None,
) -> Execution:
    """Execute a notebook (a path or a NotebookNode, not modified) top to bottom.

    Raises nbclient's ``CellExecutionError`` on the first cell that raises, and
    ``TimeoutError`` once ``time_limit`` seconds have passed since the kernel was started.
    With ``check_solutions`` every exercise's hidden solution is run right after the answer
    cell it belongs to, its checker is run, and the answer cell is run again so the notebook
    goes on exactly as shipped (the solutions' verdicts are in ``Execution.solutions``).
    """
    import copy

    from nbclient import NotebookClient

    if isinstance(source, (str, os.PathLike)):
        nb = read(source)
        cwd = cwd or Path(source).resolve().parent
    else:
        nb = copy.deepcopy(source)
    cwd = str(cwd or NOTEBOOKS)
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    solutions: dict[int, str] = {}
    start = time.perf_counter()
    try:
        client = NotebookClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=False,
                                record_timing=False, resources={"metadata": {"path": cwd}})
        with client.setup_kernel():
            last_answer: int | None = None
            n = len(nb.cells)
            for index in range(n):
                cell = nb.cells[index]
                if cell.cell_type != "code":
                    continue
                client.execute_cell(cell, index)
                if ANSWER_TAG in tags(cell):
                    last_answer = index
                if check_solutions and CHECK_TAG in tags(cell) and last_answer is not None:
                    code = solution_code(nb, index)
                    if code is not None:
                        solutions[index] = _run_solution(client, nb, code, cell.source, nb.cells[last_answer].source)
                if time_limit is not None and time.perf_counter() - start > time_limit:
                    raise TimeoutError(f"still running after {time_limit:.0f} s (at cell {index} of {n})")
        seconds = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Execution(nb, seconds, solutions)


def _run_solution(client: Any, nb: Any, solution: str, check: str, answer: str) -> str:
    """Run solution + checker + the shipped answer again in scratch cells; the checker's output."""
    import nbformat

    verdict = ""
    for source in (solution, check, answer):
        scratch = nbformat.v4.new_code_cell(source)
        nb.cells.append(scratch)
        try:
            client.execute_cell(scratch, len(nb.cells) - 1)
        finally:
            nb.cells.pop()
        if source is check:
            verdict = _output_text(scratch).strip()
    return verdict


# -- cleaning ----------------------------------------------------------------------------
def clean(nb: Any) -> Any:
    """Strip widget state and run-specific metadata, in place (see the module docstring)."""
    nb.metadata.pop("widgets", None)
    lang = nb.metadata.get("language_info")
    if isinstance(lang, dict):
        lang.pop("version", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    for cell in nb.cells:
        for key in CELL_METADATA_DROP:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        merged: list[Any] = []  # consecutive pieces of one stream joined, as the page shows them
        for out in cell.outputs:
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == out.get("name")):
                merged[-1]["text"] += out.get("text", "")
            else:
                merged.append(out)
        outputs = []
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = NOISE.sub("", out.get("text", ""))
                if not out["text"]:
                    continue
            data = out.get("data")
            if data is not None:
                data.pop(WIDGET_STATE, None)
                if WIDGET_VIEW in data:
                    data.pop(WIDGET_VIEW)
                    for key in list(data):
                        del data[key]
                    data["text/plain"] = WIDGET_PLACEHOLDER
                    out["metadata"] = {}
                if "image/png" in data:
                    data.pop("image/jpeg", None)  # IPython sends PIL images twice; one is enough
                if not data:
                    continue
            outputs.append(out)
        cell.outputs = outputs
    return nb


def write(nb: Any, path: str | os.PathLike) -> None:
    import nbformat

    nbformat.validate(nb)
    write_text_atomic(path, nbformat.writes(nb) + "\n")


# -- checking ----------------------------------------------------------------------------
SECTIONS = {
    "learning goals": re.compile(r"^#+\s*Learning goals", re.M | re.I),
    "an exercise": re.compile(r"^#+\s*Exercise", re.M | re.I),
    "further reading": re.compile(r"^#+\s*Further reading", re.M | re.I),
}


def problems(path: str | os.PathLike, nb: Any | None = None) -> list[str]:
    """What is wrong with a committed notebook (an empty list if nothing)."""
    path = Path(path)
    nb = nb if nb is not None else read(path)
    found: list[str] = []
    size = path.stat().st_size
    if size >= MAX_BYTES:
        found.append(f"{size / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    if "widgets" in nb.metadata:
        found.append("metadata.widgets (widget state) is present")
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for name, pattern in SECTIONS.items():
        if not pattern.search(markdown):
            found.append(f"no '{name}' heading")
    if "MODELS = \"toy\"" not in "\n".join(c.source for c in nb.cells if c.cell_type == "code"):
        found.append("no MODELS = \"toy\" switch")
    answers = [i for i, c in enumerate(nb.cells) if ANSWER_TAG in tags(c)]
    checks = [i for i, c in enumerate(nb.cells) if CHECK_TAG in tags(c)]
    if not answers or len(answers) != len(checks):
        found.append(f"{len(answers)} answer cells and {len(checks)} check cells (tags 'answer', 'check')")
    for i in checks:
        if solution_code(nb, i) is None:
            found.append(f"cell {i}: a check with no hidden solution (<details> with a ```python block) after it")
        elif "<summary>" not in "".join(c.source for c in nb.cells[i + 1:i + 3] if c.cell_type == "markdown"):
            found.append(f"cell {i}: the solution's <details> block has no <summary>")
    unexecuted = 0
    local = str(ROOT)  # outputs must not show this machine's paths
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is None and cell.source.strip():
            unexecuted += 1
        for key in CELL_METADATA_DROP:
            if key in cell.metadata:
                found.append(f"cell {i}: metadata.{key}")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: error output {out.get('ename')}: {out.get('evalue')}")
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found.append(f"cell {i}: stderr output {out.get('text', '')[:120]!r}")
            data = out.get("data", {})
            shown = out.get("text", "") + "".join(v for v in data.values() if isinstance(v, str))
            if local in shown:
                found.append(f"cell {i}: an output shows the local path {local}")
            if WIDGET_STATE in data:
                found.append(f"cell {i}: widget state in an output")
            if WIDGET_VIEW in data:
                found.append(f"cell {i}: a widget view output (its model is gone once the kernel stops)")
    if unexecuted:
        found.append(f"{unexecuted} code cells were never executed (run the notebook and commit its outputs)")
    return found


# -- run times and the course map ------------------------------------------------------------
def read_run_times(folder: str | os.PathLike = NOTEBOOKS) -> dict[str, Any]:
    path = Path(folder) / RUN_TIMES
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"notebooks": {}}


def write_run_times(times: dict[str, float], folder: str | os.PathLike = NOTEBOOKS) -> Path:
    data = read_run_times(folder)
    data["notebooks"].update({k: round(v, 1) for k, v in times.items()})
    data["notebooks"] = dict(sorted(data["notebooks"].items()))
    data["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    data.pop("torch_threads", None)
    data["kernel_threads"] = int(OFFLINE_ENV["OMP_NUM_THREADS"])
    data["measured"] = time.strftime("%Y-%m-%d")
    data["note"] = "wall time of python -m magic_edu.course.notebook_tools run: kernel start to last cell, toy world"
    path = Path(folder) / RUN_TIMES
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")  # the committed file's format
    return path


def title_and_goal(nb: Any) -> tuple[str, str]:
    """The notebook's title (its first heading) and goal (the first markdown line starting
    with '**Goal:**' or 'Goal:')."""
    title = goal = ""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if not title and line.startswith("# "):
                title = line[2:].strip()
            m = re.match(r"\s*\**Goal:?\**:?\s*(.*)", line)
            if not goal and m and m.group(1):
                goal = m.group(1).strip()
        if title and goal:
            break
    return title, goal


def course_map(folder: str | os.PathLike = NOTEBOOKS, link_prefix: str = "notebooks/") -> str:
    """The README's course map: one table row per notebook (title, goal, run time)."""
    times = read_run_times(folder).get("notebooks", {})
    rows = ["| notebook | goal | run time |", "|---|---|---|"]
    for path in notebook_paths(folder):
        title, goal = title_and_goal(read(path))
        t = times.get(path.name)
        rows.append(f"| [{title or path.stem}]({link_prefix}{path.name}) | {goal} | "
                    f"{f'{t:.0f} s' if t is not None else '?'} |")
    return "\n".join(rows)


# -- command line ------------------------------------------------------------------------
def _run(paths: Iterable[Path], limit: float, solutions: bool) -> int:
    from nbclient.exceptions import CellExecutionError

    times: dict[str, float] = {}
    failed = 0
    for path in paths:
        print(f"{path.name}: running ...", flush=True)
        try:
            result = execute(path, time_limit=None, check_solutions=solutions)
        except (CellExecutionError, TimeoutError) as err:
            failed += 1
            print(f"{path.name}: FAILED\n{str(err)[-3000:]}", file=sys.stderr)
            continue
        write(clean(result.nb), path)
        times[path.name] = result.seconds
        found = problems(path)
        bad_solutions = [f"cell {i}: the hidden solution gets {v!r}" for i, v in result.solutions.items()
                         if not v.startswith(RIGHT_MARK)]
        over = [f"took {result.seconds:.1f} s, over {limit:.0f} s"] if result.seconds > limit else []
        issues = found + bad_solutions + over
        size = path.stat().st_size / 1e6
        print(f"{path.name}: {result.seconds:.1f} s, {size:.2f} MB" + ("" if not issues else " -- PROBLEMS:"))
        for p in issues:
            print(f"    {p}")
        failed += bool(issues)
    if times:
        print(f"run times written to {write_run_times(times)}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magic_edu.course.notebook_tools",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks in place (clean metadata, record run times), then check")
    run.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    run.add_argument("--limit", type=float, default=TIME_LIMIT_S, help="seconds a notebook may take (default 60)")
    run.add_argument("--solutions", action="store_true", help="also check every hidden solution with its checker")
    check = sub.add_parser("check", help="check committed notebooks without running them")
    check.add_argument("only", nargs="*")
    sub.add_parser("course-map", help="print the README's course map")
    args = parser.parse_args(argv)
    if args.command == "course-map":
        print(course_map())
        return 0
    paths = notebook_paths(NOTEBOOKS, args.only)
    if not paths:
        print(f"no notebooks match {args.only} in {NOTEBOOKS}", file=sys.stderr)
        return 2
    if args.command == "run":
        return _run(paths, args.limit, args.solutions)
    bad = 0
    for path in paths:
        found = problems(path)
        print(f"{path.name}: " + ("ok" if not found else "; ".join(found)))
        bad += bool(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
