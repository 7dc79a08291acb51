"""The magic-edu command line: evaluate (table and --json) and caption (batches, resume,
atomic writes, skipped images). Captioning runs on fake models here, and end to end on the
toy preset when its weights are in data/toy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import magic_edu
from magic_edu.registry import DECODERS
from magic_edu.tools import cli, evaluation
from magic_edu.tools.evaluation import evaluate, load_results, table_to_dict

REPO = Path(__file__).resolve().parents[1]
needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None,
    reason="the COCO metrics need pycocoevalcap and Java on PATH",
)
COLORS = {(255, 0, 0): "red", (0, 128, 0): "green", (0, 0, 255): "blue", (255, 255, 0): "yellow",
          (128, 0, 128): "purple"}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# -- evaluate -------------------------------------------------------------------------------
RESULTS = [
    {"image_name": "1.jpg", "captions": ["a man riding a horse", "a person on a horse"],
     "prediction": "a man riding a horse on a horse", "split": "test"},
    {"image_name": "2.jpg", "captions": ["a cat on a mat"], "prediction": "a cat sitting on the mat"},
    {"image_name": "3.jpg", "captions": ["two dogs in the snow"], "prediction": "dogs playing in the snow"},
]


@pytest.fixture
def results_file(tmp_path) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(RESULTS))
    return path


@pytest.fixture
def stub_meteor(monkeypatch):
    monkeypatch.setattr(evaluation, "_meteor", lambda coco, pairs: dict.fromkeys(pairs, 0.25))


@needs_coco
def test_evaluate_prints_the_table_and_json_of_the_same_numbers(results_file, stub_meteor, capsys):
    expected = table_to_dict(evaluate(results_file))

    status, out, _ = run(["evaluate", str(results_file)], capsys)
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["metric", str(results_file)]
    printed = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert set(printed) == set(expected)
    for key, value in expected.items():
        assert float(printed[key]) == pytest.approx(value, abs=5e-4), key

    status, out, _ = run(["evaluate", str(results_file), "--json"], capsys)
    assert status == 0
    assert json.loads(out) == pytest.approx(expected)


@needs_coco
def test_evaluate_spice_note_goes_to_stderr_with_json(results_file, stub_meteor, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "spice_models_present", lambda: False)
    status, out, err = run(["evaluate", str(results_file), "--json", "--spice"], capsys)
    assert status == 0 and "SPICE" not in json.loads(out)
    assert "note: SPICE skipped" in err
    status, out, _ = run(["evaluate", str(results_file), "--spice"], capsys)
    assert "note: SPICE skipped" in out


def test_evaluate_of_a_malformed_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RESULTS[0], {"image_name": "x", "captions": ["r"], "prediction": ""}]))
    status, out, err = run(["evaluate", str(path)], capsys)
    assert status == 2 and out == ""
    assert err.strip() == "magic-edu evaluate: error: entry 1: 'prediction' is empty"


@needs_coco
@pytest.mark.slow
def test_evaluate_as_a_module_with_the_real_metrics(results_file):
    """The command as a user runs it (python -m magic_edu.tools.cli == the magic-edu script), real METEOR."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "magic_edu.tools.cli", "evaluate", str(results_file), "--json"],
                          check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                            "rep-2", "rep-3", "rep-4", "diversity", "images"]
    assert 0 < scores["METEOR"] < 100 and scores["images"] == 3
    # "a man riding a horse on a horse": 7 bigrams, "a horse" twice; the others 5 and 4, all distinct.
    assert scores["rep-2"] == pytest.approx(100 * (1 - (6 + 5 + 4) / (7 + 5 + 4)))


# -- caption with fake models -----------------------------------------------------------------
class FakeDecoders:
    """Stand-ins for the decoders: MAGIC names each image's colour; the others name the call."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.fail_on_call: int | None = None
        self.models = SimpleNamespace(lm="LM", clip="CLIP",
                                      defaults={"k": 4, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 7})

    def _call(self, name: str, **kw) -> None:
        self.calls.append((name, kw))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt

    def magic_search(self, lm, clip, images, **kw):
        assert (lm, clip) == ("LM", "CLIP") and isinstance(images, list)
        self._call("magic", n=len(images), **kw)
        return [SimpleNamespace(text=f"a {COLORS[im.getpixel((0, 0))]} image") for im in images]

    def greedy_search(self, lm, **kw):
        self._call("greedy", **kw)
        return SimpleNamespace(text="a picture")

    def top_k_sampling(self, lm, **kw):
        self._call("top-k", **kw)
        return SimpleNamespace(text=f"sample {kw['seed']}")

    def nucleus_sampling(self, lm, **kw):
        self._call("nucleus", **kw)
        return SimpleNamespace(text=f"nucleus {kw['seed']}")

    def contrastive_search(self, lm, **kw):
        self._call("contrastive", **kw)
        return SimpleNamespace(text="a contrastive picture")


@pytest.fixture
def fake(monkeypatch) -> FakeDecoders:
    f = FakeDecoders()
    f.loads = []
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: f.loads.append(preset) or f.models)
    for name in ("magic_search", "greedy_search", "top_k_sampling", "nucleus_sampling", "contrastive_search"):
        monkeypatch.setattr(magic_edu, name, getattr(f, name))
    return f


@pytest.fixture
def folder(tmp_path) -> Path:
    """Five coloured PNGs, one corrupt PNG and a text file (not an image: ignored)."""
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate(COLORS):
        Image.new("RGB", (16, 16), color).save(images / f"img{i}.png")
    (images / "img2b.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a picture")
    (images / "notes.txt").write_text("not an image")
    return images


def expected_entries() -> list[dict]:
    return [{"image_name": f"img{i}.png", "captions": [], "prediction": f"a {name} image"}
            for i, name in enumerate(COLORS.values())]


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp"))


def test_caption_a_folder_in_batches_and_skip_the_unreadable(fake, folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    status, _, err = run(["caption", str(folder), "--out", str(out), "--batch-size", "2"], capsys)
    assert status == 0
    assert json.loads(out.read_text()) == expected_entries()
    load_results(out, require_references=False)  # evaluate reads what caption writes
    # sorted: img0 img1 | img2 img2b(corrupt) | img3 img4 -> batches of 2, 1, 2 images
    assert [kw["n"] for name, kw in fake.calls] == [2, 1, 2]
    # nothing given: nothing passed but record=False (the decoders take the preset's settings)
    assert fake.calls[0][1] == {"n": 2, "record": False}
    skipped = json.loads((tmp_path / "results.skipped.json").read_text())
    assert [s["image_name"] for s in skipped] == ["img2b.png"]
    assert "not a readable image" in skipped[0]["reason"]
    assert "skipped 1 images" in err and "img2b.png" in err and "caption (magic)" in err  # tqdm's bar
    assert leftovers(tmp_path) == []


def test_caption_resumes_after_an_interruption(fake, folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["caption", str(folder), "--out", str(out), "--batch-size", "2"]
    fake.fail_on_call = 2  # Ctrl-C while the second batch decodes
    status, _, err = run(argv, capsys)
    assert status == 130 and "run the same command again" in err
    assert json.loads(out.read_text()) == expected_entries()[:2]  # the first batch, complete
    assert leftovers(tmp_path) == []

    fake.fail_on_call, fake.calls = None, []
    status, _, err = run(argv, capsys)
    assert status == 0 and "2 of 6 images already in" in err
    assert [kw["n"] for _, kw in fake.calls] == [1, 2]  # only img2 (+ the corrupt one), img3, img4
    assert json.loads(out.read_text()) == expected_entries()

    fake.calls = []
    status, _, err = run(argv, capsys)  # nothing left but the corrupt file: no decoding at all
    assert status == 0 and fake.calls == [] and "5 of 6 images already in" in err


def test_a_failed_write_leaves_the_previous_file_whole(fake, folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    run(["caption", str(folder / "img0.png"), "--out", str(out)], capsys)
    before = out.read_text()
    real_replace = os.replace

    def broken_replace(src, dst):
        if Path(dst).name == "results.json":
            raise PermissionError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", broken_replace)
    status, _, err = run(["caption", str(folder), "--out", str(out)], capsys)
    assert status == 2, err  # a clear error, not a traceback
    assert f"magic-edu caption: error: --out {out}: cannot write it: disk full" in err
    assert out.read_text() == before and leftovers(tmp_path) == []


def test_an_unwritable_out_is_a_clear_error(fake, folder, tmp_path, capsys):
    blocker = tmp_path / "file.txt"  # a file where --out needs a folder (as root, chmod would not stop writes)
    blocker.write_text("x")
    status, _, err = run(["caption", str(folder), "--out", str(blocker / "r.json")], capsys)
    assert status == 2 and "cannot create its folder" in err and "Traceback" not in err
    assert fake.loads == [] and blocker.read_text() == "x"


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_the_lock(fake, folder, tmp_path, capsys):
    import filelock

    out = tmp_path / "results.json"
    run(["caption", str(folder / "img0.png"), "--out", str(out)], capsys)
    before = out.read_text()
    settings_before = (tmp_path / "results.settings.json").read_text()
    fake.calls = []
    with filelock.FileLock(str(out) + ".lock"):  # the other run
        status, _, err = run(["caption", str(folder), "--out", str(out), "--decoder", "greedy"], capsys)
    assert status == 2
    assert f"another magic-edu caption is writing {out}; wait for it or choose another --out" in err
    assert out.read_text() == before and (tmp_path / "results.settings.json").read_text() == settings_before
    assert fake.calls == [] and fake.loads == ["toy"]  # only the first run loaded models
    # the lock is free again: the same command now works
    assert run(["caption", str(folder), "--out", str(out)], capsys)[0] == 0


def test_the_settings_sidecar_and_a_resume_with_other_settings(fake, folder, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["caption", str(folder / "img0.png"), "--out", str(out), "--decoder", "top-k", "--k", "3",
            "--max-new-tokens", "5"]
    assert run(argv, capsys)[0] == 0
    sidecar = tmp_path / "r.settings.json"
    assert json.loads(sidecar.read_text()) == {
        "format": "magic_edu.caption_settings", "version": 1, "preset": "toy", "decoder": "top_k",
        "params": {"k": 3, "temperature": 1.0}, "max_new_tokens": 5, "seed": 0}

    # a resume with the same settings (another spelling of the decoder) works as before
    fake.calls = []
    status, _, err = run(["caption", str(folder / "img0.png"), str(folder / "img1.png"), "--out", str(out),
                          "--decoder", "top_k", "--k", "3", "--max-new-tokens", "5", "--seed", "0"], capsys)
    assert status == 0 and "1 of 2 images already in" in err and len(fake.calls) == 1
    written = out.read_text()

    for other, differs in [(["--decoder", "top-k", "--k", "4", "--max-new-tokens", "5"], "k 3 before, 4 now"),
                           (["--decoder", "top-k", "--k", "3"], "max_new_tokens 5 before, (the preset's) now"),
                           (["--decoder", "top-k", "--k", "3", "--max-new-tokens", "5", "--seed", "1"],
                            "seed 0 before, 1 now"),
                           (["--decoder", "greedy", "--max-new-tokens", "5"], 'decoder "top_k" before, "greedy" now'),
                           (["--decoder", "top-k", "--k", "3", "--max-new-tokens", "5", "--preset", "paper"],
                            'preset "toy" before, "paper" now')]:
        fake.calls = []
        status, _, err = run(["caption", str(folder), "--out", str(out), *other], capsys)
        assert status == 2 and differs in err and "choose a new --out" in err, (other, err)
        assert fake.calls == [] and out.read_text() == written
    assert json.loads(sidecar.read_text())["params"] == {"k": 3, "temperature": 1.0}

    # a sidecar written before top-k sampling took a temperature: it sampled at temperature 1, so the
    # same settings resume, and another temperature is refused
    old = json.loads(sidecar.read_text())
    del old["params"]["temperature"]
    sidecar.write_text(json.dumps(old))
    same = ["caption", str(folder), "--out", str(out), "--decoder", "top-k", "--k", "3", "--max-new-tokens", "5"]
    status, _, err = run([*same, "--temperature", "0.5"], capsys)
    assert status == 2 and "temperature 1.0 before, 0.5 now" in err and out.read_text() == written
    assert run(same, capsys)[0] == 0 and len(fake.calls) == 3  # the three images not yet captioned

    # a new --out takes any settings; the registry's default of a parameter no preset sets is written out
    assert run(["caption", str(folder / "img0.png"), "--out", str(tmp_path / "n.json"), "--decoder", "top-k"],
               capsys)[0] == 0
    default_k = DECODERS["top_k"].param("k").default
    assert json.loads((tmp_path / "n.settings.json").read_text())["params"] == {"k": default_k, "temperature": 1.0}
    # magic: the preset's parameters stay null (the preset's value) unless given
    assert run(["caption", str(folder / "img0.png"), "--out", str(tmp_path / "m.json"), "--beta", "1.5"],
               capsys)[0] == 0
    assert json.loads((tmp_path / "m.settings.json").read_text())["params"] == {
        "k": None, "alpha": None, "beta": 1.5, "clip_text_max_len": None}


def test_a_result_file_without_a_sidecar_resumes_and_gets_one(fake, folder, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text(json.dumps(expected_entries()[:1]))  # written before sidecars existed
    status, _, err = run(["caption", str(folder / "img0.png"), str(folder / "img1.png"), "--out", str(out)], capsys)
    assert status == 0 and "1 of 2 images already in" in err
    assert json.loads((tmp_path / "r.settings.json").read_text())["decoder"] == "magic"


@pytest.mark.parametrize("inputs", [["missing-folder"], ["empty"], ["empty", "nope.png"]])
def test_no_images_at_all_is_an_error(fake, tmp_path, capsys, inputs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = tmp_path / "r.json"
    status, _, err = run(["caption", *[str(tmp_path / i) for i in inputs], "--out", str(out)], capsys)
    assert status == 2 and "no images to caption" in err and "0 captions" not in err
    assert not out.exists() and fake.loads == []
    if "nope.png" in inputs:
        assert "nope.png: no such file or folder" in err


def test_an_interruption_while_writing_counts_only_the_captions_written(fake, folder, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "results.json"
    real_replace, writes = os.replace, []

    def interrupted_replace(src, dst):
        if Path(dst).name == "results.json":
            writes.append(dst)
            if len(writes) == 2:  # Ctrl-C while the second batch is being written
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    status, _, err = run(["caption", str(folder), "--out", str(out), "--batch-size", "2"], capsys)
    assert status == 130
    assert "interrupted: 2 captions are in" in err
    assert len(json.loads(out.read_text())) == 2 and leftovers(tmp_path) == []


def test_stale_temporary_files_of_a_killed_run_are_removed(fake, folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    stale = [tmp_path / ".results.json.ab_12xyz.tmp", tmp_path / ".results.settings.json.q1w2e3r4.tmp",
             tmp_path / ".results.skipped.json.zzzzzzzz.tmp"]
    keep = [tmp_path / ".other.json.ab12xyzq.tmp", tmp_path / "results.json.tmp", tmp_path / ".results.json.x.y.tmp"]
    for path in stale + keep:
        path.write_text("{half a fi")
    status, _, err = run(["caption", str(folder / "img0.png"), "--out", str(out)], capsys)
    assert status == 0 and "removed 3 temporary file(s)" in err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_caption_files_references_and_missing_paths(fake, folder, tmp_path, capsys):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"img0.png": ["a red square", "red"], "img4.png": "a purple square"}))
    out = tmp_path / "out" / "r.json"
    status, _, err = run(["caption", str(folder / "img0.png"), str(folder / "img4.png"), str(tmp_path / "nope.png"),
                          "--out", str(out), "--references", str(refs)], capsys)
    assert status == 0
    got = json.loads(out.read_text())
    assert [(e["image_name"], e["captions"]) for e in got] == [("img0.png", ["a red square", "red"]),
                                                               ("img4.png", ["a purple square"])]
    assert "nope.png: no such file or folder" in err

    # references in the result format also work, and are added to entries captioned before
    refs.write_text(json.dumps([{"image_name": "img4.png", "captions": ["violet"], "prediction": "x"}]))
    run(["caption", str(folder / "img4.png"), "--out", str(out), "--references", str(refs)], capsys)
    assert json.loads(out.read_text())[1]["captions"] == ["violet"]
    # and so do the paper's test files (no prediction: image_name, captions, split, ...)
    refs.write_text(json.dumps([{"split": "test", "image_name": "img4.png", "captions": ["lilac", "mauve"]}]))
    run(["caption", str(folder / "img4.png"), "--out", str(out), "--references", str(refs)], capsys)
    assert json.loads(out.read_text())[1]["captions"] == ["lilac", "mauve"]


def test_caption_refuses_ambiguous_names_and_foreign_out_files(fake, folder, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8), "red").save(other / "img0.png")
    status, _, err = run(["caption", str(folder), str(other), "--out", str(tmp_path / "r.json")], capsys)
    assert status == 2 and "two images are named 'img0.png'" in err

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"my": "notes"}')
    status, _, err = run(["caption", str(folder), "--out", str(foreign)], capsys)
    assert status == 2 and "left alone" in err and foreign.read_text() == '{"my": "notes"}'
    status, _, err = run(["caption", str(folder), "--out", str(folder)], capsys)
    assert status == 2 and "is a folder" in err
    assert fake.calls == []

    once = tmp_path / "once.json"  # one file named twice (in its folder, and relative) is captioned once
    assert run(["caption", str(folder), os.path.relpath(folder / "img0.png"), "--out", str(once)], capsys)[0] == 0
    assert [e["image_name"] for e in json.loads(once.read_text())] == [f"img{i}.png" for i in range(5)]


def test_image_blind_decoders(fake, folder, tmp_path, capsys):
    out = tmp_path / "greedy.json"
    run(["caption", str(folder), "--out", str(out), "--decoder", "greedy"], capsys)
    assert {e["prediction"] for e in json.loads(out.read_text())} == {"a picture"}
    assert fake.calls == [("greedy", {"record": False})]  # one caption fits every image

    # top-k: one seed per image name, so the batch size does not change any caption
    texts = []
    for batch_size in ("1", "4"):
        out = tmp_path / f"topk{batch_size}.json"
        run(["caption", str(folder), "--out", str(out), "--decoder", "top-k", "--seed", "5",
             "--batch-size", batch_size, "--k", "3"], capsys)
        texts.append([e["prediction"] for e in json.loads(out.read_text())])
    assert texts[0] == texts[1] == [f"sample {cli.image_seed(5, f'img{i}.png')}" for i in range(5)]
    assert fake.calls[-1][1] == {"k": 3, "seed": cli.image_seed(5, "img4.png"), "record": False}
    assert len(set(texts[0])) == 5


@pytest.mark.parametrize("spelling", ["top-k", "top_k"])
def test_decoder_names_and_aliases(fake, folder, tmp_path, capsys, spelling):
    out = tmp_path / "r.json"
    status, _, err = run(["caption", str(folder / "img0.png"), "--out", str(out), "--decoder", spelling], capsys)
    assert status == 0 and "caption (top_k)" in err
    assert fake.calls == [("top-k", {"seed": cli.image_seed(0, "img0.png"), "record": False})]  # seed 0 by default


def test_every_registry_decoder_and_alias_is_a_choice(capsys):
    assert set(cli.decoder_choices()) == {*DECODERS, "top-k", "top-p", "typical-p", "beam-search", "clip-retrieval"}
    with pytest.raises(SystemExit):
        cli.main(["caption", "x.png", "--out", "r.json", "--decoder", "diverse_beam"])
    err = capsys.readouterr().err
    assert "invalid choice: 'diverse_beam'" in err and all(name in err for name in DECODERS)
    with pytest.raises(SystemExit):
        cli.main(["caption", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # (argparse wraps the lines anywhere)
    for decoder in DECODERS.values():
        assert decoder.name in help_text and decoder.label in help_text
    for option in ("--k", "--alpha", "--beta", "--p", "--top-p", "--seed", "--max-new-tokens", "--clip-text-max-len",
                   "--temperature", "--mass", "--num-beams", "--length-penalty", "--num-iterations", "--stepsize",
                   "--fusion-factor", "--clip-temperature", "--candidates"):
        assert option in help_text


def test_settings_given_are_passed_and_the_rest_left_to_the_preset(fake, folder, tmp_path, capsys):
    out = tmp_path / "magic.json"
    argv = ["caption", str(folder / "img0.png"), "--out", str(out), "--k", "3", "--alpha", "0.2", "--beta", "1.5",
            "--clip-text-max-len", "20", "--max-new-tokens", "5"]
    assert run(argv, capsys)[0] == 0
    assert fake.calls == [("magic", {"n": 1, "k": 3, "alpha": 0.2, "beta": 1.5, "clip_text_max_len": 20,
                                     "max_new_tokens": 5, "record": False})]
    fake.calls = []
    run(["caption", str(folder / "img0.png"), "--out", str(tmp_path / "c.json"), "--decoder", "contrastive",
         "--alpha", "0.3"], capsys)
    assert fake.calls == [("contrastive", {"alpha": 0.3, "record": False})]
    for spelling in ("--p", "--top-p"):  # the old spelling still works
        fake.calls = []
        run(["caption", str(folder / "img1.png"), "--out", str(tmp_path / f"n{spelling}.json"), "--decoder",
             "nucleus", spelling, "0.5", "--seed", "2"], capsys)
        assert fake.calls == [("nucleus", {"p": 0.5, "seed": cli.image_seed(2, "img1.png"), "record": False})]


@pytest.mark.parametrize("argv, expected", [
    (["--decoder", "greedy", "--beta", "1"], "--beta: --decoder greedy (greedy search) does not take it"),
    (["--decoder", "greedy", "--seed", "3"], "--seed: --decoder greedy"),
    (["--decoder", "top-k", "--alpha", "0.1"], "it takes --k, --temperature, --seed"),
    (["--decoder", "beam", "--seed", "1"], "it takes --num-beams, --length-penalty"),
    (["--decoder", "zerocap", "--beta", "1"], "--beta: --decoder zerocap (ZeroCap) does not take it"),
    (["--decoder", "zerocap", "--num-iterations", "-1"], "num_iterations must be an integer >= 0; got -1"),
    (["--decoder", "typical", "--temperature", "0"], "temperature must be a number > 0.0 (finite); got 0.0"),
    (["--decoder", "nucleus", "--p", "0"], "p must be a number in (0.0, 1.0]"),
    (["--alpha", "1.5"], "alpha must be a number between 0.0 and 1.0; got 1.5"),
    (["--k", "0"], "k must be an integer"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_a_setting_the_decoder_does_not_take_is_an_error_before_loading(fake, folder, tmp_path, capsys, argv,
                                                                       expected):
    status, _, err = run(["caption", str(folder), "--out", str(tmp_path / "r.json"), *argv], capsys)
    assert status == 2 and expected in err, err
    assert fake.loads == [] and fake.calls == [] and not (tmp_path / "r.json").exists()


def test_subcommands_are_registered_from_one_list(monkeypatch, capsys):
    def add_hello_command(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(func=lambda args: print("hi") or 0)

    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [add_hello_command])
    assert run(["hello"], capsys) == (0, "hi\n", "")
    with pytest.raises(SystemExit):
        cli.main([])  # a subcommand is required


# -- caption with the real decoders on tiny random models ------------------------------------------
@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    from magic_edu.tools.random_models import random_clip, random_language_model

    return SimpleNamespace(lm=random_language_model(seed=1), clip=random_clip(tmp_path_factory.mktemp("clip")),
                           defaults={"k": 4, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 6})


@pytest.mark.slow
def test_every_decoder_through_the_real_decoding_code(random_models, folder, tmp_path, capsys, monkeypatch):
    from magic_edu.retrieval import build_text_index

    monkeypatch.setattr(magic_edu, "load_models", lambda preset: random_models, raising=False)
    monkeypatch.setattr("magic_edu.presets.load_clip", lambda preset: random_models.clip)
    index = build_text_index(random_models.clip, ["a red square.", "a green circle."], tmp_path / "i.safetensors",
                             progress=False)
    for decoder in [*DECODERS, "top-k"]:
        out = tmp_path / f"{decoder}.json"
        # CLIP retrieval writes no tokens: an index instead of a length
        how = ["--index", str(index.path)] if DECODERS.get(decoder) and DECODERS[decoder].retrieves else \
            ["--max-new-tokens", "4"]
        status, _, err = run(["caption", str(folder), "--out", str(out), "--decoder", decoder,
                              "--batch-size", "4", *how], capsys)
        assert status == 0, err
        written = load_results(out, require_references=False) if out.exists() else []
        skipped = json.loads((tmp_path / f"{decoder}.skipped.json").read_text())
        assert sorted([e["image_name"] for e in written] + [s["image_name"] for s in skipped]) == \
            sorted(["img0.png", "img1.png", "img2.png", "img2b.png", "img3.png", "img4.png"]), decoder


def test_zerocap_captions_image_by_image_as_zerocap_search_does(random_models, folder, tmp_path, capsys,
                                                                monkeypatch):
    """``--decoder zerocap`` runs the real zerocap_search, with the settings given and ZeroCap's own
    defaults for the rest, and writes what zerocap_search writes for each image on its own."""
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: random_models, raising=False)
    out = tmp_path / "z.json"
    argv = ["caption", str(folder / "img0.png"), str(folder / "img1.png"), "--out", str(out), "--decoder", "zerocap",
            "--num-iterations", "1", "--candidates", "5", "--num-beams", "2", "--max-new-tokens", "3"]
    status, _, err = run(argv, capsys)
    assert status == 0, err
    written = {e["image_name"]: e["prediction"] for e in load_results(out, require_references=False)}
    for name in ("img0.png", "img1.png"):
        image = Image.open(folder / name).convert("RGB")
        want = magic_edu.zerocap_search(random_models.lm, random_models.clip, image, num_iterations=1,
                                        candidates=5, num_beams=2, max_new_tokens=3)
        assert written[name] == want.text
    assert json.loads((tmp_path / "z.settings.json").read_text())["params"]["fusion_factor"] == 0.99


@pytest.mark.slow
def test_an_interrupted_magic_run_ends_like_an_uninterrupted_one(random_models, folder, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: random_models, raising=False)
    real_magic, calls = magic_edu.magic_search, []

    def counted_magic(*args, **kwargs):
        calls.append(len(args[2]))
        if calls == [3, 2]:  # Ctrl-C in the second batch (img2b is corrupt: 2 images)
            raise KeyboardInterrupt
        return real_magic(*args, **kwargs)

    monkeypatch.setattr(magic_edu, "magic_search", counted_magic)
    argv = ["caption", str(folder), "--batch-size", "3"]
    assert run(argv + ["--out", str(tmp_path / "resumed.json")], capsys)[0] == 130
    first = json.loads((tmp_path / "resumed.json").read_text())
    assert [e["image_name"] for e in first] == ["img0.png", "img1.png", "img2.png"]
    assert run(argv + ["--out", str(tmp_path / "resumed.json")], capsys)[0] == 0
    assert calls == [3, 2, 2]  # the resumed run decoded only the interrupted batch
    assert run(argv + ["--out", str(tmp_path / "fresh.json")], capsys)[0] == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed[:3] == first
    assert resumed == json.loads((tmp_path / "fresh.json").read_text())


@needs_coco
def test_evaluate_with_images_adds_clipscore(random_models, folder, tmp_path, capsys, monkeypatch, stub_meteor):
    monkeypatch.setattr(magic_edu, "load_models", lambda preset: random_models, raising=False)
    results = [{"image_name": f"img{i}.png", "captions": ["a red square", "a shape"], "prediction": f"a {c} square"}
               for i, c in enumerate(COLORS.values())]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    status, out, _ = run(["evaluate", str(path), "--json", "--images", str(folder)], capsys)
    assert status == 0
    images = [folder / r["image_name"] for r in results]
    captions = [r["prediction"] for r in results]
    refs = [r["captions"] for r in results]
    scores = json.loads(out)
    assert scores["CLIP-S"] == pytest.approx(evaluation.clip_score(random_models.clip, images, captions).mean())
    assert scores["RefCLIP-S"] == pytest.approx(
        evaluation.ref_clip_score(random_models.clip, images, captions, refs).mean())


# -- caption end to end on the toy models ---------------------------------------------------------
def toy_models_or_skip():
    try:
        return magic_edu.load_models("toy")
    except (AttributeError, magic_edu.MagicEduError) as err:
        pytest.skip(f"the toy preset is not available: {err}")


@pytest.mark.slow
def test_caption_then_evaluate_end_to_end_on_the_toy_preset(folder, tmp_path, capsys, monkeypatch):
    toy_models_or_skip()
    out = tmp_path / "toy.json"
    argv = ["caption", str(folder), "--out", str(out), "--preset", "toy", "--batch-size", "3"]

    real_magic = magic_edu.magic_search
    calls = []

    def interrupted_magic(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_magic(*args, **kwargs)

    monkeypatch.setattr(magic_edu, "magic_search", interrupted_magic)
    assert run(argv, capsys)[0] == 130
    first = json.loads(out.read_text())
    assert [e["image_name"] for e in first] == ["img0.png", "img1.png", "img2.png"]

    monkeypatch.setattr(magic_edu, "magic_search", real_magic)
    status, _, err = run(argv, capsys)
    assert status == 0 and "img2b.png" in err
    final = load_results(out, require_references=False)
    assert [e["image_name"] for e in final] == [f"img{i}.png" for i in range(5)]
    assert final[:3] == first

    fresh = tmp_path / "fresh.json"  # an uninterrupted run gives the same captions
    assert run(["caption", str(folder), "--out", str(fresh), "--preset", "toy", "--batch-size", "3"], capsys)[0] == 0
    assert json.loads(fresh.read_text()) == final

    status, text, _ = run(["evaluate", str(out), "--json", "--images", str(folder), "--preset", "toy"], capsys)
    scores = json.loads(text)
    assert status == 0 and scores["images"] == 5 and 0 <= scores["CLIP-S"] <= 2.5 and "BLEU-1" not in scores


def test_fuzzed_images_through_caption_are_captioned_or_skipped_never_fatal(fake, tmp_path, capsys):
    """The hardening issue's corpus through the batch CLI: mutated PNG/JPEG/GIF files, a 45-byte
    PNG declaring 50000 x 50000 and a 1 x 100000 strip; the run finishes, every file is either
    captioned or in the skipped list with its reason, and load_image agrees on which."""
    import random

    from test_inputs import encoded, mutate, png_header_only

    from magic_edu.inputs import load_image

    images = tmp_path / "fuzz"
    images.mkdir()
    rng = random.Random(7)
    seeds = {"png": encoded("PNG"), "jpg": encoded("JPEG", 3, (24, 17)), "gif": encoded("GIF", 4, (11, 14))}
    for i in range(120):
        suffix = rng.choice(sorted(seeds))
        (images / f"f{i:03d}.{suffix}").write_bytes(mutate(seeds[suffix], rng))
    (images / "bomb.png").write_bytes(png_header_only(50000, 50000))
    Image.new("L", (1, 100000)).save(images / "strip.png")
    status, _, _ = run(["caption", str(images), "--out", str(tmp_path / "r.json"), "--batch-size", "16",
                        "--decoder", "greedy"], capsys)
    assert status == 0
    captioned = {e["image_name"] for e in json.loads((tmp_path / "r.json").read_text())}
    skipped = {s["image_name"]: s["reason"] for s in json.loads((tmp_path / "r.skipped.json").read_text())}
    assert {"bomb.png", "strip.png"} <= set(skipped) and not captioned & set(skipped)
    assert captioned | set(skipped) == {p.name for p in images.iterdir()}
    for name in sorted(captioned | set(skipped)):
        try:
            load_image(images / name)
            loads = True
        except magic_edu.MagicEduError:
            loads = False
        assert loads == (name in captioned), (name, skipped.get(name))


def test_caption_with_typical_sampling_and_beam_search_on_the_toy_preset(folder, tmp_path, capsys):
    """The new decoders through the real command line give the library's captions."""
    toy = toy_models_or_skip()
    beam_out, typical_out = tmp_path / "beam.json", tmp_path / "typical.json"
    assert run(["caption", str(folder), "--out", str(beam_out), "--decoder", "beam", "--num-beams", "3",
                "--length-penalty", "0.5", "--max-new-tokens", "8"], capsys)[0] == 0
    want = magic_edu.beam_search(toy.lm, num_beams=3, length_penalty=0.5, max_new_tokens=8).text
    assert [e["prediction"] for e in json.loads(beam_out.read_text())] == [want] * 5  # it does not see the image
    assert run(["caption", str(folder / "img0.png"), str(folder / "img1.png"), "--out", str(typical_out),
                "--decoder", "typical", "--mass", "0.6", "--temperature", "1.3", "--seed", "7",
                "--max-new-tokens", "8"], capsys)[0] == 0
    got = [e["prediction"] for e in json.loads(typical_out.read_text())]
    assert got == [magic_edu.typical_sampling(toy.lm, mass=0.6, temperature=1.3, seed=cli.image_seed(7, name),
                                              max_new_tokens=8).text for name in ("img0.png", "img1.png")]
