"""Trace files without any model: the round trip (NaN included), old files with bare NaN,
every broken file a MagicEduError naming it, and write_json_atomic's handling of links,
permissions and targets that are not regular files."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest

from magic_edu.errors import MagicEduError
from magic_edu.trace import FORMAT_VERSION, StepRecord, Trace, write_json_atomic

NAN = float("nan")


def make_trace() -> Trace:
    """Two steps of a greedy-like decode: the penalty and CLIP columns are NaN / -1 / ""."""
    steps = [
        StepRecord(step=i, text="a" * i, token_ids=[10 + i, 20, 30], tokens=[f"t{i}", "b", "c"],
                   lm_prob=[0.5, 0.3, 0.2], degeneration_penalty=[NAN] * 3, penalty_position=[-1] * 3,
                   clip_text=[""] * 3, clip_cosine=[NAN] * 3, clip_score=[NAN, 0.25, float("inf")],
                   score=[0.5, 0.3, 0.2], chosen=i, forced=i == 1, chosen_similarity=[0.1, NAN][: i + 1])
        for i in range(2)
    ]
    return Trace({"decoder": "greedy", "max_new_tokens": 2}, [1, 2], ["<s>", "x"], steps)


def same_floats(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def assert_same(a: Trace, b: Trace) -> None:
    assert (a.settings, a.prefix_ids, a.prefix_tokens) == (b.settings, b.prefix_ids, b.prefix_tokens)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("step", "text", "token_ids", "tokens", "penalty_position", "clip_text", "chosen", "forced"):
            assert getattr(x, name) == getattr(y, name), name
        for name in ("lm_prob", "degeneration_penalty", "clip_cosine", "clip_score", "score", "chosen_similarity"):
            got, want = getattr(y, name), getattr(x, name)
            want = [None if math.isinf(v) else v for v in want]  # inf is written as null: read back as NaN
            assert same_floats([NAN if v is None else v for v in want], got), name


def test_round_trip_keeps_nan_and_writes_strict_json(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "sub" / "t.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    loaded = Trace.load(path)
    assert_same(trace, loaded)
    assert loaded.to_frame().equals(Trace.load(path).to_frame())
    assert math.isnan(loaded.steps[0].degeneration_penalty[0])
    assert not list(path.parent.glob(".*.tmp"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_an_old_file_with_bare_nan_loads(tmp_path):
    data = make_trace().to_dict()
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data, allow_nan=True))  # the format before null: bare NaN / Infinity
    assert "NaN" in path.read_text()
    loaded = Trace.load(path)
    assert math.isnan(loaded.steps[1].clip_cosine[2])
    assert loaded.steps[0].clip_score[2] == float("inf")


def broken_variants() -> list[tuple[str, object, str]]:
    good = make_trace().to_dict()
    good = json.loads(json.dumps(good, allow_nan=True))  # plain JSON types

    def changed(fn):
        data = copy.deepcopy(good)
        fn(data)
        return data

    return [
        ("missing steps", changed(lambda d: d.pop("steps")), "missing 'steps'"),
        ("missing a step field", changed(lambda d: d["steps"][0].pop("lm_prob")), "steps[0]: missing 'lm_prob'"),
        ("steps not a list", changed(lambda d: d.update(steps={"a": 1})), "'steps' must be a list"),
        ("a step not an object", changed(lambda d: d["steps"].append([1, 2])), "steps[2] must be an object"),
        ("chosen out of range", changed(lambda d: d["steps"][1].update(chosen=99)), "'chosen' is 99"),
        ("chosen negative", changed(lambda d: d["steps"][1].update(chosen=-1)), "'chosen' is -1"),
        ("chosen a string", changed(lambda d: d["steps"][1].update(chosen="1")), "'chosen' must be an integer"),
        ("token id a float", changed(lambda d: d["steps"][0]["token_ids"].__setitem__(0, 1.5)),
         "'token_ids' must be a list of integers"),
        ("prob a string", changed(lambda d: d["steps"][0]["lm_prob"].__setitem__(0, "x")), "'lm_prob' must be"),
        ("uneven columns", changed(lambda d: d["steps"][0]["score"].pop()), "'score' has 2 entries"),
        ("tokens not strings", changed(lambda d: d["steps"][0].update(tokens=[1, 2, 3])), "'tokens' must be"),
        ("forced not a bool", changed(lambda d: d["steps"][0].update(forced="yes")), "'forced' must be"),
        ("unknown step field", changed(lambda d: d["steps"][0].update(extra=1)), "unknown field 'extra'"),
        ("uneven optional column", changed(lambda d: d["steps"][0].update(next_beam=[0, 1])),
         "'next_beam' has 2 entries"),
        ("beam not an int", changed(lambda d: d["steps"][0].update(beam=[0, 1.5, 2])), "'beam' must be a list of int"),
        ("negative count", changed(lambda d: d["setup_cost"].update(clip_images=-2)),
         "'setup_cost': 'clip_images' must be an integer >= 0"),
        ("cost not an object", changed(lambda d: d["steps"][1].update(cost=3)), "steps[1]: 'cost' must be an object"),
        ("settings not an object", changed(lambda d: d.update(settings=[1])), "'settings' must be an object"),
        ("prefix ids not ints", changed(lambda d: d.update(prefix_ids="12")), "'prefix_ids' must be"),
        ("newer version", changed(lambda d: d.update(version=FORMAT_VERSION + 1)), "newer magic_edu"),
        ("version missing", changed(lambda d: d.pop("version")), "'version' must be"),
        ("not a trace", [1, 2, 3], "not a magic_edu trace"),
        ("wrong format", changed(lambda d: d.update(format="other")), "not a magic_edu trace"),
    ]


@pytest.mark.parametrize("name, data, message", broken_variants(), ids=[v[0] for v in broken_variants()])
def test_every_broken_trace_is_a_magic_edu_error_naming_the_file(tmp_path, name, data, message):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MagicEduError) as err:
        Trace.load(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(MagicEduError, match="^trace: "):  # from_dict alone: the same checks
        Trace.from_dict(data)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "{not json", "", "\xff\xfe garbage"])
def test_deep_nesting_and_non_json_are_magic_edu_errors(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="latin-1")
    with pytest.raises(MagicEduError) as err:
        Trace.load(path)
    assert str(path) in str(err.value)


def beam_like_trace() -> Trace:
    """Two steps with the sampling and beam columns filled (as beam search and sampling fill them)."""
    steps = [StepRecord(step=i, text="", token_ids=[5, 6, 7], tokens=["a", "b", "c"], lm_prob=[0.5, 0.3, 0.2],
                        degeneration_penalty=[NAN] * 3, penalty_position=[-1] * 3, clip_text=[""] * 3,
                        clip_cosine=[NAN] * 3, clip_score=[NAN] * 3, score=[-0.7, -1.2, -1.6], chosen=0,
                        sample_prob=[0.6, 0.4, 0.0], beam=[0, 0, 1], next_beam=[0, -1, 1],
                        hypothesis_score=[NAN, -1.2, NAN])
             for i in range(2)]
    return Trace({"decoder": "beam", "num_beams": 2}, [1], ["<s>"], steps)


def test_the_sampling_and_beam_columns_round_trip(tmp_path):
    trace = beam_like_trace()
    loaded = Trace.load(trace.save(tmp_path / "beam.json"))
    for name in ("beam", "next_beam"):
        assert getattr(loaded.steps[1], name) == getattr(trace.steps[1], name)
    for name in ("sample_prob", "hypothesis_score"):
        assert same_floats(getattr(loaded.steps[1], name), getattr(trace.steps[1], name))
    frame = loaded.to_frame()
    assert list(frame.columns[-15:-7]) == ["sample_prob", "beam", "next_beam", "hypothesis_score", "steered_prob",
                                           "fused_prob", "chosen", "forced"]
    assert list(frame["next_beam"]) == [0, -1, 1] * 2 and frame["hypothesis_score"].isna().sum() == 4
    assert loaded.to_frame().equals(trace.to_frame())


def test_a_version_1_file_loads_without_the_sampling_and_beam_columns(tmp_path):
    """Files written before those columns existed (format version 1) load; the columns read NaN / -1,
    as for a decoder that does not compute them. Records made without them (empty) read the same."""
    data = make_trace().to_dict()
    data["version"] = 1
    del data["setup_cost"]
    for step in data["steps"]:
        for name in ("sample_prob", "beam", "next_beam", "hypothesis_score", "cost"):
            del step[name]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data, allow_nan=True))
    loaded = Trace.load(path)
    assert loaded.steps[0].beam == [-1] * 3 and loaded.steps[0].next_beam == [-1] * 3
    assert all(math.isnan(x) for x in loaded.steps[0].sample_prob + loaded.steps[0].hypothesis_score)
    assert loaded.to_frame().equals(make_trace().to_frame())
    assert FORMAT_VERSION == 5 and make_trace().to_dict()["version"] == 5


def test_a_version_3_file_loads_without_zerocaps_columns(tmp_path):
    """Files written before ZeroCap's columns existed (version 3) load: steered_prob and fused_prob read
    NaN, the per-iteration lists empty, as for a decoder that does not compute them."""
    data = make_trace().to_dict()
    data["version"] = 3
    for step in data["steps"]:
        for name in ("steered_prob", "fused_prob", "iteration_probs", "iteration_targets", "kept_beam"):
            del step[name]
    path = tmp_path / "v3.json"
    path.write_text(json.dumps(data))
    loaded = Trace.load(path)
    assert all(math.isnan(x) for x in loaded.steps[0].steered_prob + loaded.steps[0].fused_prob)
    assert loaded.steps[0].iteration_probs == [] and loaded.steps[0].iteration_targets == []
    assert loaded.to_frame().equals(make_trace().to_frame())


def test_zerocaps_per_iteration_lists_are_saved_and_checked(tmp_path):
    trace = make_trace()
    trace.steps[0].iteration_probs = [[0.5, 0.25, None], [0.6, 0.2, 0.1]]
    trace.steps[0].iteration_targets = [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]]
    loaded = Trace.load(trace.save(tmp_path / "t.json"))
    assert loaded.steps[0].iteration_targets == [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]]
    assert loaded.steps[0].iteration_probs[1] == [0.6, 0.2, 0.1] and math.isnan(loaded.steps[0].iteration_probs[0][2])
    data = trace.to_dict()
    data["steps"][0]["iteration_probs"] = [[0.5, 0.5]]  # 2 values, 3 candidates
    with pytest.raises(MagicEduError, match="every list in 'iteration_probs' must have one entry per candidate"):
        Trace.from_dict(json.loads(json.dumps(data, allow_nan=True)))
    data["steps"][0]["iteration_probs"] = 0.5
    with pytest.raises(MagicEduError, match="'iteration_probs' must be a list of lists"):
        Trace.from_dict(data)


def test_zerocaps_kept_beams_are_saved_and_checked(tmp_path):
    """kept_beam (version 5) round-trips; older files (without it) read it empty; a value below -1 or
    a non-integer is refused with the field's name."""
    trace = make_trace()
    trace.steps[0].kept_beam = [-1, 2, 0]
    assert Trace.load(trace.save(tmp_path / "t.json")).steps[0].kept_beam == [-1, 2, 0]
    data = trace.to_dict()
    data["version"] = 4
    del data["steps"][0]["kept_beam"]
    assert Trace.from_dict(data).steps[0].kept_beam == []
    for bad in ([-2], [0.5], "0"):
        data["steps"][0]["kept_beam"] = bad
        with pytest.raises(MagicEduError, match="'kept_beam'"):
            Trace.from_dict(data)


def test_a_missing_file_is_an_error():
    with pytest.raises(MagicEduError, match="no trace file"):
        Trace.load("/nonexistent/trace.json")


# -- write_json_atomic ----------------------------------------------------------------------
def test_a_symlink_stays_a_link_and_its_target_is_updated(tmp_path):
    real = tmp_path / "data" / "real.json"
    real.parent.mkdir()
    real.write_text("[]")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert write_json_atomic(link, {"a": 1}) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".*.tmp")) and not list(real.parent.glob(".*.tmp"))

    dangling = tmp_path / "dangling.json"  # a link to a file not yet there: the file is made
    dangling.symlink_to(tmp_path / "data" / "new.json")
    write_json_atomic(dangling, [1])
    assert dangling.is_symlink() and json.loads((tmp_path / "data" / "new.json").read_text()) == [1]


def test_an_existing_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "secret.json"
    path.write_text("{}")
    path.chmod(0o600)
    write_json_atomic(path, {"x": NAN})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"x": None}
    new = write_json_atomic(tmp_path / "new.json", [])
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def test_a_folder_is_refused(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(MagicEduError, match="folder"):
        write_json_atomic(folder, [])
    assert folder.is_dir() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/null as a character device: Linux")
def test_dev_null_is_refused():
    with pytest.raises(MagicEduError, match="/dev/null.*not a regular file"):
        write_json_atomic("/dev/null", [])
    assert Path("/dev/null").is_char_device()


def test_a_fifo_is_refused(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(MagicEduError, match="not a regular file"):
        write_json_atomic(fifo, [])


def test_a_failed_write_removes_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("[1]")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, [2])
    assert path.read_text() == "[1]" and not list(tmp_path.glob(".*.tmp"))
