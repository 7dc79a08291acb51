"""``magic-edu sweep``: grids checked before any work, the table and the summary on the toy world,
the same tokens in this process and on a local Dask cluster (resumed after Ctrl-C, with a worker
killed on its first attempt at a batch), resume after a kill (SIGKILL) and after Ctrl-C on the
command line, failed images recorded, a changed grid handled and changed images refused, the plots."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import magic_edu
from magic_edu.errors import MagicEduError
from magic_edu.tools import cli
from magic_edu.tools import sweep as sw

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
GRID = {"max_new_tokens": 12, "settings": [
    {"decoder": "magic", "beta": [0, 0.5]},  # beta 0 is contrastive search
    {"decoder": "contrastive"},
    {"decoder": "nucleus", "seed": 0},
]}
SCENES = 3  # 3 with one shape, 3 with two or three: 6 images, 3 batches of 2, 4 settings: 12 batches
BATCH = 2
SAME = ["setting_id", "setting", "image_id", "group", "batch", "status", "error", "caption", "token_ids", "tokens",
        "sample_seed", "clip_s", "ref_clip_s", "lm_logprob", "grounded", "all_right", "fluent", "lm_forwards",
        "lm_tokens", "lm_backwards", "clip_texts", "clip_text_tokens", "clip_images"]
needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None,
    reason="the COCO metrics need pycocoevalcap and Java on PATH",
)
needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="the local cluster needs Dask distributed (magic_edu[sweep])")


def toy_or_skip() -> None:
    try:
        sw.preset_defaults("toy")
    except MagicEduError as err:
        pytest.skip(f"the toy preset is not available: {err}")


@pytest.fixture(scope="module", autouse=True)
def worker_server():
    """The local cluster's fork server imports torch & co. while this process loads the models."""
    if importlib.util.find_spec("distributed") is not None:
        sw.start_worker_server()


@pytest.fixture(scope="module")
def items():
    toy_or_skip()
    return sw.toy_items(SCENES)


@pytest.fixture(scope="module")
def in_process(items, tmp_path_factory):
    """The reference run: this process, no COCO metrics (one test adds them)."""
    out = tmp_path_factory.mktemp("sweep") / "in-process"
    return sw.run_sweep(GRID, items, out, batch_size=BATCH, workers=0, coco=False, progress=False)


# -- grids: checked before any work ------------------------------------------------------------------
@pytest.mark.parametrize(("grid", "message"), [
    ({"settings": [{"decoder": "magik"}]}, "grid settings[0]: decoder must be one of greedy, top_k"),
    ({"settings": [{"decoder": "magic", "beta": [0, -1]}]}, "grid settings[0] (magic): beta must be"),
    ({"settings": [{"decoder": "magic", "alpha": 1.5}]}, "alpha must be"),
    ({"settings": [{"decoder": "nucleus", "p": 0}]}, "p must be a number in (0.0, 1.0]"),
    ({"settings": [{"decoder": "contrastive", "beta": 1}]}, "contrastive search has no parameter 'beta'"),
    ({"settings": [{"decoder": "magic", "beta": []}]}, "beta has an empty list of values"),
    ({"settings": [{"decoder": "magic", "max_new_tokens": 0}]}, "max_new_tokens must be"),
    ({"settings": []}, "'settings' must be a non-empty list"),
    ({"settings": [{"beta": 1}]}, "each setting must be a mapping with 'decoder'"),
    ({"settings": [{"decoder": "magic"}], "presets": "toy"}, "unknown key 'presets'"),
    ({"settings": [{"decoder": "magic"}], "preset": "coco"}, "preset must be one of"),
    ({"settings": [{"decoder": "magic"}], "preset": "toy-story"}, "writes stories from a title"),
])
def test_a_bad_grid_is_refused_before_any_work(grid, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(MagicEduError, match=None) as err:
        sw.run_sweep(grid, [sw.ImageItem("x", "file", "x.png")], out, workers=0)
    assert message in str(err.value)
    assert not out.exists()  # nothing was written, no model loaded


def test_an_empty_image_set_and_bad_options_are_refused(tmp_path):
    toy_or_skip()
    grid = {"settings": [{"decoder": "greedy"}]}
    with pytest.raises(MagicEduError, match="the image set is empty"):
        sw.run_sweep(grid, [], tmp_path / "a", workers=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MagicEduError, match="the image set is empty"):
        sw.run_sweep(grid, empty, tmp_path / "b", workers=0)
    with pytest.raises(MagicEduError, match="--batch-size must be an integer >= 1"):
        sw.run_sweep(grid, [sw.ImageItem("x", "file", "x.png")], tmp_path / "c", batch_size=0, workers=0)
    with pytest.raises(MagicEduError, match="--workers must be an integer >= 0"):
        sw.run_sweep(grid, [sw.ImageItem("x", "file", "x.png")], tmp_path / "d", workers=-1)
    with pytest.raises(MagicEduError, match="--device must be a torch device"):
        sw.run_sweep(grid, [sw.ImageItem("x", "file", "x.png")], tmp_path / "e", workers=0, device="gpu please")
    with pytest.raises(MagicEduError, match="--address joins a running cluster"):
        sw.run_sweep(grid, [sw.ImageItem("x", "file", "x.png")], tmp_path / "f", workers=2, address="tcp://h:8786")
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_ci_installs_the_sweep_engine():
    """`make test` installs the test extra: it must bring what the cluster and Parquet tests need."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", spec, maxsplit=1)[0] for spec in project["optional-dependencies"]["test"]}
    assert {"distributed", "pyarrow", "pyyaml"} <= names
    assert {"distributed", "pyarrow"} <= {re.split(r"[<>=;\[ ]", spec, maxsplit=1)[0]
                                          for spec in project["optional-dependencies"]["sweep"]}


def test_the_command_line_names_the_bad_argument_and_exits_2(tmp_path, capsys):
    toy_or_skip()
    out = tmp_path / "out"
    for argv, message in [
        (["--toy", "2", "--setting", "magic beta=-1"], "beta must be"),
        (["--toy", "2", "--setting", "magic beta"], "must be name=value"),
        (["--toy", "2", "--setting", "magic beta=high"], "'high' is not a number"),
        (["--toy", "2"], "give the settings"),
        (["--setting", "greedy"], "give exactly one of image files/folders"),
        ([str(tmp_path / "nothing-here"), "--setting", "greedy"], "no such file or folder"),
        (["--toy", "2", "--grid", str(tmp_path / "g.ini")], "cannot read it"),
    ]:
        assert cli.main(["sweep", *argv, "--out", str(out), "--workers", "0"]) == 2
        assert message in capsys.readouterr().err, argv
    assert not out.exists()


def test_grid_files_in_yaml_toml_and_json_say_the_same(tmp_path):
    toy_or_skip()
    (tmp_path / "g.yaml").write_text("preset: toy\nmax_new_tokens: 12\nsettings:\n"
                                     "  - {decoder: magic, beta: [0, 0.5]}\n  - decoder: contrastive\n"
                                     "  - {decoder: nucleus, seed: 0}\n")
    (tmp_path / "g.toml").write_text('preset = "toy"\nmax_new_tokens = 12\n[[settings]]\ndecoder = "magic"\n'
                                     'beta = [0, 0.5]\n[[settings]]\ndecoder = "contrastive"\n'
                                     '[[settings]]\ndecoder = "nucleus"\nseed = 0\n')
    (tmp_path / "g.json").write_text(json.dumps(GRID))
    want = sw.expand_grid(GRID)
    assert [s.label for s in want] == ["magic beta=0", "magic beta=0.5", "contrastive", "nucleus seed=0"]
    for name in ("g.yaml", "g.toml", "g.json"):
        assert [s.id for s in sw.expand_grid(tmp_path / name)] == [s.id for s in want]
    cmd = [sw.parse_setting("magic beta=0,0.5"), sw.parse_setting("contrastive"), sw.parse_setting("nucleus seed=0")]
    assert [s.id for s in sw.expand_grid({"max_new_tokens": 12, "settings": cmd})] == [s.id for s in want]
    magic = want[1]
    assert magic.params == {"k": 10, "alpha": 0.1, "beta": 0.5, "clip_text_max_len": 60}  # the toy preset's k, alpha
    assert magic.max_new_tokens == 12
    # the committed example: the README's 10-setting toy sweep
    assert len(sw.expand_grid(REPO / "data" / "sweeps" / "toy-10.yaml")) == 10
    # the same setting, spelled twice, runs once
    assert len(sw.expand_grid({"settings": [{"decoder": "magic", "beta": [0.5, 0.50]}]})) == 1


def test_the_toy_adapter_makes_the_report_s_held_out_scenes():
    toy_or_skip()
    from magic_edu.toyworld import report

    items = sw.toy_items(3)
    scenes = report.held_out_scenes(3, multi=False) + report.held_out_scenes(3, multi=True)
    for item, scene in zip(items, scenes, strict=True):
        image, truth = sw.toy_image_and_truth(item.where)
        assert truth == scene.objects and image.tobytes() == scene.image.tobytes()
        assert len(item.references) == sw.TOY_N_CAPTIONS
    assert [i.group for i in items] == ["1 shape"] * 3 + ["2-3 shapes"] * 3
    truth = sw.toy_image_and_truth(items[0].where)[1]
    o = truth[0]
    assert sw.toy_scores(f"a large {o.colour} {o.shape}.", truth) == {"grounded": True, "all_right": True,
                                                                       "fluent": True}


# -- the table and the summary --------------------------------------------------------------------------
def test_the_table_has_a_row_per_setting_and_image_and_the_summary_a_row_per_setting(in_process, items):
    table, summary = in_process.table, in_process.summary
    assert len(table) == 4 * len(items) and (table["status"] == "ok").all()
    assert in_process.decoded == 24 and in_process.reused == 0 and len(in_process.batches) == 12
    assert list(summary["setting"]) == ["magic beta=0", "magic beta=0.5", "contrastive", "nucleus seed=0"]
    by = {label: rows for label, rows in table.groupby("setting", sort=False)}
    # MAGIC with beta = 0 is contrastive search, token for token
    assert list(by["magic beta=0"]["token_ids"]) == list(by["contrastive"]["token_ids"])
    # the image-blind, non-sampling decoder writes one caption for all; the sampler one per image
    assert by["contrastive"]["caption"].nunique() == 1
    assert by["nucleus seed=0"]["sample_seed"].nunique() == len(items)
    want = magic_edu.nucleus_sampling(sw.worker_models("toy").lm, p=0.95, max_new_tokens=12, record=False,
                                      seed=sw.sample_seed(sw.expand_grid(GRID)[3].id, items[0].id))
    assert by["nucleus seed=0"]["caption"].iloc[0] == want.text
    # MAGIC sees the image: it names what is there, and CLIP's work is counted
    s = summary.set_index("setting")
    assert s.loc["magic beta=0.5", "grounded"] > s.loc["magic beta=0", "grounded"]
    assert s.loc["magic beta=0.5", "clip_s"] > s.loc["contrastive", "clip_s"]
    assert s.loc["magic beta=0.5", "clip_texts / caption"] > 0 == s.loc["contrastive", "clip_texts / caption"]
    for column in ("rep-2", "diversity", "ref_clip_s", "lm_logprob", "grounded (1 shape)", "all_right (2-3 shapes)",
                   "fluent", "lm_forwards / caption", "ms / caption", "tokens"):
        assert s[column].notna().all(), column
    # what is on disk is what was returned
    on_disk, summary_on_disk = sw.load_sweep(in_process.out)
    pd.testing.assert_frame_equal(on_disk[SAME], table[SAME], check_dtype=False)
    assert list(summary_on_disk["setting_id"]) == list(summary["setting_id"])
    assert sw.format_summary(summary).splitlines()[0].split()[:3] == ["setting", "n", "failed"]


@needs_coco
def test_the_summary_has_the_coco_metrics_where_references_exist(in_process, monkeypatch):
    from magic_edu.tools import evaluation

    # METEOR's Java takes 10 s to start; the metrics themselves are tested in test_evaluation.py
    monkeypatch.setattr(evaluation, "_meteor", lambda coco, pairs: dict.fromkeys(pairs, 0.25))
    _, summary, notes = sw.assemble(in_process.out, coco=True)
    s = summary.set_index("setting")
    assert not notes
    for column in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert s[column].notna().all(), column
    assert s.loc["magic beta=0.5", "CIDEr"] > s.loc["magic beta=0", "CIDEr"]


def test_report_prints_the_summary_of_a_finished_sweep(in_process, capsys):
    assert cli.main(["sweep", "--report", "--out", str(in_process.out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in printed] == list(in_process.summary["setting"])


# -- in this process and on a cluster: the same tokens; Ctrl-C and resume; a killed worker's batch is rerun ----
@needs_dask
@pytest.mark.slow
def test_a_local_cluster_gives_the_same_tokens_resumes_after_ctrl_c_and_reruns_a_killed_worker_s_batch(
        in_process, items, tmp_path):
    out = tmp_path / "cluster"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after 5 of the 12 batches: the cluster is stopped
        sw.run_sweep(GRID, items, out, batch_size=BATCH, workers=2, coco=False, progress=False,
                     faults={"interrupt_after": 5})
    assert len(_parts(out)) == 5 and not (out / "captions.parquet").exists()
    killed = [sw.expand_grid(GRID)[1].id, 2]  # MAGIC beta 0.5, the last batch: its worker exits on the first attempt
    result = sw.run_sweep(GRID, items, out, batch_size=BATCH, workers=2, coco=False, progress=False,
                          faults={"exit_once": [killed], "marker_dir": str(tmp_path)})
    assert (tmp_path / f"exit-{killed[0]}-{killed[1]}").exists()  # the worker did die ...
    assert (result.table["status"] == "ok").all()  # ... and its batch was decoded again
    assert result.reused == 10 and result.decoded == 14 and result.workers == 2
    pd.testing.assert_frame_equal(result.table[SAME], in_process.table[SAME])


def test_ctrl_c_on_the_command_line_keeps_what_is_done_and_says_how_to_go_on(in_process, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "interrupted"
    monkeypatch.setenv(sw.FAULTS_ENV, json.dumps({"interrupt_after": 3}))
    assert cli.main(["sweep", *SWEEP_ARGS, "--out", str(out), "--workers", "0"]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert len(_parts(out)) == 3
    monkeypatch.delenv(sw.FAULTS_ENV)
    assert cli.main(["sweep", *SWEEP_ARGS, "--out", str(out), "--workers", "0", "--format", "csv"]) == 0
    assert "18 captions decoded, 6 found finished" in capsys.readouterr().err
    table, _ = sw.load_sweep(out)
    assert list(table["token_ids"]) == list(in_process.table["token_ids"])


# -- resume after a kill ----------------------------------------------------------------------------------------
SWEEP_ARGS = ["--toy", str(SCENES), "--batch-size", str(BATCH), "--no-coco", "--max-new-tokens", "12",
              "--setting", "magic beta=0,0.5", "--setting", "contrastive", "--setting", "nucleus seed=0"]


def _parts(out: Path) -> list[Path]:
    return sorted((out / sw.PARTS).glob("*/*.json")) if (out / sw.PARTS).exists() else []


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_table(in_process, items, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "magic_edu.tools.cli", "sweep", *SWEEP_ARGS, "--out", str(out), "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), sw.FAULTS_ENV: json.dumps({"delay": 0.25})}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_parts(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    done = len(_parts(out))
    assert 3 <= done < 12  # stopped partway
    assert all(sw.read_part(part) is not None for part in _parts(out))  # every part file whole
    resumed = sw.run_sweep(GRID, items, out, batch_size=BATCH, workers=0, coco=False, progress=False)
    assert resumed.reused == 2 * done and resumed.decoded == 24 - 2 * done
    assert not list(out.rglob("*.tmp"))
    pd.testing.assert_frame_equal(resumed.table[SAME], in_process.table[SAME])


# -- failures, changed grids, changed images ------------------------------------------------------------------
@pytest.fixture
def photos(items, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in items[:3]:
        sw.toy_image_and_truth(item.where)[0].save(folder / f"{item.id}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    return folder


def test_a_failed_image_is_recorded_with_its_reason_and_the_sweep_goes_on(photos, tmp_path, in_process):
    grid = {"max_new_tokens": 12, "settings": [{"decoder": "magic", "beta": 0.5}]}
    out = tmp_path / "failures"
    faults = {"raise_on": ["single-9000001.png"]}
    result = sw.run_sweep(grid, photos, out, batch_size=2, workers=0, coco=False, progress=False, faults=faults)
    rows = result.table.set_index("image_id")
    assert rows.loc["broken.png", "status"] == "failed" and "cannot read the image" in rows.loc["broken.png", "error"]
    assert rows.loc["single-9000001.png", "status"] == "failed"
    assert "injected failure decoding single-9000001.png" in rows.loc["single-9000001.png", "error"]
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == 2 and ok["caption"].str.len().gt(0).all()
    # the failing image's batch-mate was decoded on its own: the same caption as in a batch
    reference = in_process.table.set_index(["setting", "image_id"])
    assert ok.loc["single-9000002.png", "caption"] == reference.loc[("magic beta=0.5", "single-9000002"), "caption"]
    assert result.summary.loc[0, "failed"] == 2 and result.summary.loc[0, "ok"] == 2
    # a rerun keeps the recorded failures; --retry-failed decodes their batches again
    again = sw.run_sweep(grid, photos, out, batch_size=2, workers=0, coco=False, progress=False)
    assert again.decoded == 0 and again.reused == 4
    retried = sw.run_sweep(grid, photos, out, batch_size=2, workers=0, coco=False, progress=False, retry_failed=True)
    assert retried.decoded == 4 and (retried.table["status"] == "ok").sum() == 3  # broken.png stays unreadable


def test_a_changed_grid_is_handled_and_changed_images_are_refused(items, tmp_path, in_process):
    out = tmp_path / "grown"
    first = {"max_new_tokens": 12, "settings": [{"decoder": "magic", "beta": 0.5}]}
    sw.run_sweep(first, items, out, batch_size=BATCH, workers=0, coco=False, progress=False)
    grown = {"max_new_tokens": 12, "settings": [{"decoder": "magic", "beta": [0.5, 0]}]}
    result = sw.run_sweep(grown, items, out, batch_size=BATCH, workers=0, coco=False, progress=False)
    assert result.reused == 6 and result.decoded == 6  # only the new setting ran
    assert list(result.summary["setting"]) == ["magic beta=0.5", "magic beta=0"]
    assert set(result.table["setting"]) == {"magic beta=0.5", "magic beta=0"}
    with pytest.raises(MagicEduError, match="was swept with --batch-size 2, now 3"):
        sw.run_sweep(grown, items, out, batch_size=3, workers=0)
    with pytest.raises(MagicEduError, match="was swept over other images"):
        sw.run_sweep(grown, items[:4], out, batch_size=BATCH, workers=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MagicEduError, match="holds other files"):
        sw.run_sweep(grown, items, tmp_path / "other", workers=0)


def test_a_second_sweep_into_the_same_folder_is_refused_while_one_runs(items, tmp_path):
    from filelock import FileLock

    out = tmp_path / "busy"
    out.mkdir()
    with FileLock(str(out / ".lock")), pytest.raises(MagicEduError, match="another magic-edu sweep is writing"):
        sw.run_sweep({"settings": [{"decoder": "greedy"}]}, items[:2], out, workers=0)


def test_csv_tables_read_back_as_written(items, tmp_path):
    grid = {"max_new_tokens": 6, "settings": [{"decoder": "greedy"}]}
    result = sw.run_sweep(grid, items[:2], tmp_path / "csv", workers=0, coco=False, progress=False,
                          table_format="csv")
    table, _ = sw.load_sweep(tmp_path / "csv")
    assert (tmp_path / "csv" / "captions.csv").exists()
    assert list(table["caption"]) == list(result.table["caption"]) and list(table["error"]) == ["", ""]


def test_without_dask_the_default_runs_in_this_process_and_workers_n_says_what_to_install(items, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    grid = {"max_new_tokens": 6, "settings": [{"decoder": "greedy"}]}
    with pytest.raises(MagicEduError, match=r"--workers 2 needs Dask distributed.*magic_edu\[sweep\]"):
        sw.run_sweep(grid, items[:2], tmp_path / "a", workers=2)
    result = sw.run_sweep(grid, items[:2], tmp_path / "b", coco=False, progress=False)
    assert result.workers == 0 and any("ran in this process" in n for n in result.notes)


def test_bench_reports_throughput(items):
    table = sw.bench_sweep(workers=(0,), scenes=1, batch_size=2, grid={"max_new_tokens": 6,
                                                                      "settings": [{"decoder": "magic"}]})
    assert list(table["workers"]) == [0] and table.loc[0, "captions"] == 2
    assert table.loc[0, "captions / s"] > 0


# -- plots ------------------------------------------------------------------------------------------------------
def test_the_plots_draw_a_real_sweep(in_process):
    from magic_edu.views import sweeps

    table, summary = in_process.table, in_process.summary
    fig = sweeps.plot_frontier(summary)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("fluent") and ax.get_ylabel().startswith("grounded")
    assert [t.get_text() for t in ax.texts] == ["beta=0", "beta=0.5"]
    assert sweeps.pareto(summary, "fluent", "grounded").any()
    fig = sweeps.plot_heatmap(summary, "clip_s", facet=None)
    assert fig.axes[0].get_title() == "clip_s"
    frame = sweeps.disagreements(table, "magic beta=0", "magic beta=0.5")
    assert len(frame) == 6 and (frame["diff"] >= 0).all() and frame["diff"].iloc[0] == 1
    fig = sweeps.plot_disagreements(table, "magic beta=0", "magic beta=0.5", n=3)
    assert "6 of 6 images get different captions" in fig.axes[1].texts[0].get_text()
    with pytest.raises(MagicEduError, match="is not in the table"):
        sweeps.disagreements(table, "magic beta=9", "contrastive")
