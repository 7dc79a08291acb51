"""Sweeps: many decoder settings over a whole image set, on this machine or on a cluster.

    magic-edu sweep --toy 50 --grid data/sweeps/toy_beta.yaml --out sweeps/toy-beta
    magic-edu sweep photos/ --setting "magic beta=0,1,2" --setting contrastive --out sweeps/photos
    magic-edu sweep --results magic_result.json --images val2014/ --preset paper-mscoco \\
                    --grid grid.toml --out sweeps/coco --address tcp://head:8786

A *grid* is a list of decoder settings, each a decoder with values for some of its parameters
(a list of values is swept: the settings are the product), plus one model preset and the length.
Every parameter is checked against its range in :data:`magic_edu.registry.DECODERS` before any
work starts. The *images* are a folder (or files), a result file in the paper's JSON format (its
references come along), or the toy world's held-out scenes (whose truth is known).

Every (setting, image) pair gives one row of a tidy table (``captions.parquet``, or ``.csv``):
the setting's parameters, the caption and its token ids, CLIP-S and RefCLIP-S, the caption's
mean log-probability under the LM, the toy world's grounding where the truth is known, and the
work its batch did (:mod:`magic_edu.costs`, shared out over the batch's captions). The per-setting
summary (``summary.parquet`` / ``.csv`` / ``.json``) adds the COCO metrics where references
exist (one Java run for all settings), rep-n and diversity.

**Engine: Dask distributed** (the optional extra ``magic_edu[sweep]``), not Ray: on this project's
2-core machine a local Dask cluster started in 2 s with 140 MB in its own processes (a 45 MB
install), Ray's in 29 s with 870 MB (260 MB), and both rerun a dead worker's task and join a running
cluster by address, so for sweeps that must also start quickly on a laptop and in CI Dask fits
better. Each worker process keeps its models in a module-level cache (loaded by its first batch, so
once per worker), and a local cluster's workers are forked from a server that has imported torch,
transformers and open_clip (:func:`start_worker_server`), so a worker, or one restarted after a crash,
is ready in about a second.

How it stays reliable:

* **Batches are fixed** by the image list and the batch size, never by the workers: every caption
  is decoded in the same batch whatever runs it, with one torch thread (``threads``), the CLIP
  prefix memo cleared before each batch, and a sampling decoder's seed derived from the setting
  and the image id (:func:`sample_seed`). In-process (``workers=0``) and any cluster give the same
  tokens.
* **Resumable**: each finished (setting, batch) is written atomically as a part file
  (``parts/<setting id>/<batch>.json``); a rerun skips them. ``manifest.json`` keeps the image
  list and the batch size: a rerun with other images or another batch size is refused (batches
  would change); a changed grid is handled: settings are identified by their content, so new
  ones run, finished ones are reused, and the table holds the current grid's settings.
* **Failures**: an image that cannot be read or decoded gets a row with status ``failed`` and the
  reason, and the sweep goes on; a worker process that dies has its batch rerun by Dask's
  scheduler (if it dies more often than ``distributed.scheduler.allowed-failures``, 3, the batch's
  rows are recorded as failed); ``retry_failed`` decodes failed rows' batches again.
* **Progress**: a tqdm bar in captions, with captions per second and the time left.

Workers of a cluster given by ``address`` need magic_edu and the preset's models installed, and
an image folder at the same path (a shared filesystem); the toy world's scenes are made on the
worker from their seeds. All access to the toy world is in one marked section below.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..costs import COUNTS
from ..errors import MagicEduError
from ..registry import DECODERS, MAX_NEW_TOKENS, get_decoder

FORMAT = "magic_edu.sweep"
VERSION = 1
DEFAULT_BATCH_SIZE = 16
TABLE_FORMATS = ("parquet", "csv")
INSTALL_HINT = "pip install 'magic_edu[sweep]'  (or: pip install distributed)"
PARQUET_HINT = "pip install 'magic_edu[sweep]'  (or: pip install pyarrow), or write CSV (--format csv)"
COST_COLUMNS = (*COUNTS, "seconds")
STATUS_OK, STATUS_FAILED = "ok", "failed"
FAULTS_ENV = "MAGIC_EDU_SWEEP_FAULTS"  # tests only: JSON of run_sweep's faults for the command line
TOY_N_CAPTIONS = 5  # references per toy scene (for the COCO metrics)


# == the toy world adapter ==================================================================================
# ALL access to magic_edu.toyworld is in this section (ShapesWorld v1: toyworld.shapes and
# toyworld.tuning). After ShapesWorld v2, repoint these four functions; nothing else in this
# module knows the toy world.
TOY_GROUPS = {"single": "1 shape", "multi": "2-3 shapes"}


def toy_items(n: int) -> list[ImageItem]:
    """The toy world's held-out scenes as sweep items: ``n`` with one shape, then ``n`` with two or
    three, the seeds of :func:`magic_edu.toyworld.report.held_out_scenes` (never used in training),
    each with :data:`TOY_N_CAPTIONS` reference captions."""
    from ..inputs import check_int
    from ..toyworld import shapes

    n = check_int(n, "toy scenes", 1)
    items = []
    for kind, base, objects in (("single", shapes.HELD_OUT_SEED, lambda i: 1),
                                ("multi", shapes.HELD_OUT_SEED + 100_000, lambda i: 2 + i % 2)):
        for i in range(n):
            where = [base + i, objects(i)]
            scene = _toy_scene(where)
            items.append(ImageItem(f"{kind}-{base + i}", "toy", where, tuple(scene.captions), TOY_GROUPS[kind]))
    return items


def _toy_scene(where: Sequence[int]) -> Any:
    """The toy scene an item names: ``where`` = [seed, number of objects]."""
    from ..toyworld import shapes

    seed, n_objects = int(where[0]), int(where[1])
    return shapes.make_scene(seed, n_objects=n_objects, n_captions=TOY_N_CAPTIONS)


def toy_image_and_truth(where: Sequence[int]) -> tuple[Any, Any]:
    """(image, truth) of a toy item: the scene's PIL image and its objects."""
    scene = _toy_scene(where)
    return scene.image, list(scene.objects)


def toy_scores(caption: str, truth: Any) -> dict[str, bool]:
    """The toy report's judgements of one caption: ``grounded`` (names the colour and shape of an
    object in the scene), ``all_right`` (names every object, invents nothing), ``fluent`` (a
    sentence the caption templates could produce; for one shape also no repeated bigram)."""
    from ..toyworld import shapes
    from ..toyworld.tuning import fluent_caption

    g = shapes.grounding(caption, truth)
    return {"grounded": bool(g.any_right), "all_right": bool(g.all_right),
            "fluent": bool(fluent_caption(caption, len(truth)))}


TOY_COLUMNS = ("grounded", "all_right", "fluent")
# == end of the toy world adapter ===========================================================================


# -- settings -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One decoder setting of a sweep: every parameter resolved (the grid's value, else the preset's
    where the registry says it applies, else the registry's default; a sampler's seed 0), and the
    parameters the grid gave (``given``, for the label). ``id`` is a hash of what decides the
    captions (preset, decoder, parameters, length): the same setting has the same id in any grid."""

    preset: str
    decoder: str
    params: dict[str, Any]
    max_new_tokens: int
    given: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        key = json.dumps({"preset": self.preset, "decoder": self.decoder, "params": self.params,
                          "max_new_tokens": self.max_new_tokens}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """e.g. ``magic k=10 alpha=0.1 beta=0.5``: the decoder and the values the grid gave."""
        spec = get_decoder(self.decoder)
        parts = [self.decoder] + [f"{n}={_fmt(self.given[n])}" for n in spec.param_names if n in self.given]
        if MAX_NEW_TOKENS.name in self.given:
            parts.append(f"len={self.max_new_tokens}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setting:
        return cls(data["preset"], data["decoder"], dict(data["params"]), int(data["max_new_tokens"]),
                   dict(data.get("given", {})))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_grid(path: str | os.PathLike) -> dict[str, Any]:
    """A grid file: YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON, holding ``settings`` (a list
    of ``{decoder: NAME, PARAM: value or [values], ...}``) and optionally ``preset`` and
    ``max_new_tokens``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MagicEduError(f"--grid {path}: cannot read it ({err})") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise MagicEduError(f"--grid {path}: a YAML grid needs pyyaml ({INSTALL_HINT.split('  ')[0]}); "
                                    "or write the grid as TOML or JSON") from None
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise MagicEduError(f"--grid {path}: the file must end in .yaml, .yml, .toml or .json")
    except MagicEduError:
        raise
    except Exception as err:  # noqa: BLE001 (yaml, tomllib and json each raise their own parse error)
        raise MagicEduError(f"--grid {path}: cannot parse it: {err}") from None
    if isinstance(data, list):
        data = {"settings": data}
    if not isinstance(data, dict):
        raise MagicEduError(f"--grid {path}: expected a mapping with 'settings' (a list of decoder settings)")
    return data


def parse_setting(spec: str) -> dict[str, Any]:
    """A command-line setting, ``"magic k=10 alpha=0.1,0.3 beta=0,0.5,1"``: the decoder, then
    ``name=value[,value...]`` (comma-separated values are swept). ``max_new_tokens`` is allowed."""
    words = spec.split()
    if not words:
        raise MagicEduError("--setting: empty; expected e.g. \"magic beta=0,0.5,1 alpha=0.1\"")
    out: dict[str, Any] = {"decoder": words[0]}
    for word in words[1:]:
        name, sep, values = word.partition("=")
        name = name.replace("-", "_")
        if not sep or not name or not values:
            raise MagicEduError(f"--setting {spec!r}: {word!r} must be name=value or name=value,value,...")
        parsed = [_number(v, f"--setting {spec!r}: {name}") for v in values.split(",")]
        out[name] = parsed if len(parsed) > 1 else parsed[0]
    return out


def _number(text: str, where: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise MagicEduError(f"{where}: {text!r} is not a number") from None


GRID_KEYS = ("settings", "preset", "max_new_tokens")


def expand_grid(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
                preset: str | None = None, max_new_tokens: int | None = None) -> list[Setting]:
    """The settings of a grid (a file, a mapping as :func:`read_grid` returns, or a list of setting
    mappings), each entry's lists of values multiplied out, in the grid's order, duplicates dropped.
    ``preset`` and ``max_new_tokens`` given here win over the grid's. Anything wrong (an unknown
    decoder or parameter, a value out of its range, an empty list, a preset that does not caption)
    is a :class:`MagicEduError` naming the entry and what is allowed, before any model loads."""
    if isinstance(grid, (str, os.PathLike)):
        grid = read_grid(grid)
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        grid = {"settings": list(grid)}
    if not isinstance(grid, Mapping):
        raise MagicEduError(f"grid must be a file, a mapping with 'settings' or a list of settings; got {grid!r:.80}")
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise MagicEduError(f"grid: unknown key {unknown[0]!r}; a grid has {', '.join(GRID_KEYS)}")
    preset = preset if preset is not None else grid.get("preset", "toy")
    defaults = preset_defaults(preset)
    top_length = max_new_tokens if max_new_tokens is not None else grid.get("max_new_tokens")
    if top_length is not None:
        top_length = _checked(MAX_NEW_TOKENS, top_length, "grid")
    entries = grid.get("settings")
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
        raise MagicEduError("grid: 'settings' must be a non-empty list of decoder settings, e.g. "
                            "[{decoder: magic, beta: [0, 0.5, 1]}] (or --setting \"magic beta=0,0.5,1\")")
    settings: dict[str, Setting] = {}
    for i, entry in enumerate(entries):
        for setting in _expand_entry(i, entry, preset, defaults, top_length):
            settings.setdefault(setting.id, setting)
    return list(settings.values())


def _expand_entry(i: int, entry: Any, preset: str, defaults: Mapping[str, Any],
                  top_length: int | None) -> list[Setting]:
    where = f"grid settings[{i}]"
    if isinstance(entry, str):
        entry = parse_setting(entry)
    if not isinstance(entry, Mapping) or "decoder" not in entry:
        raise MagicEduError(f"{where}: each setting must be a mapping with 'decoder' (one of {', '.join(DECODERS)}) "
                            f"and parameter values; got {entry!r:.80}")
    try:
        decoder = get_decoder(entry["decoder"])
    except MagicEduError as err:
        raise MagicEduError(f"{where}: {err}") from None
    where = f"{where} ({decoder.name})"
    lists: dict[str, list[Any]] = {}
    for name, value in entry.items():
        if name == "decoder":
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise MagicEduError(f"{where}: {name} has an empty list of values; give at least one")
        if name == MAX_NEW_TOKENS.name:
            lists[name] = [_checked(MAX_NEW_TOKENS, v, where) for v in values]
            continue
        if name not in decoder.param_names:
            raise MagicEduError(f"{where}: {decoder.label} has no parameter {name!r}; its parameters are "
                                f"{', '.join(decoder.param_names) or 'none'} (and max_new_tokens)")
        lists[name] = [_checked(decoder.param(name), v, where) for v in values]
    names = list(lists)
    out = []
    for combo in itertools.product(*(lists[n] for n in names)):
        given = dict(zip(names, combo))
        length = given.get(MAX_NEW_TOKENS.name, top_length)
        if length is None:
            length = defaults.get(MAX_NEW_TOKENS.name, MAX_NEW_TOKENS.default)
        params_given = {n: v for n, v in given.items() if n != MAX_NEW_TOKENS.name}
        params, _ = decoder.settings(params_given, preset=defaults)
        if decoder.samples and params.get("seed") is None:
            params["seed"] = 0  # a sweep is reproducible
        out.append(Setting(preset, decoder.name, params, int(length), given))
    return out


def _checked(param: Any, value: Any, where: str) -> Any:
    """``param.check(value)``, its error prefixed with ``where`` (its message names the parameter)."""
    try:
        return param.check(value)
    except MagicEduError as err:
        raise MagicEduError(f"{where}: {err}") from None


def preset_defaults(name: str) -> dict[str, Any]:
    """A caption preset's decoding settings (k, alpha, beta, max_new_tokens) without loading its
    models; an unknown preset, or a story preset (its length counts a title), is an error."""
    from .. import presets

    if not isinstance(name, str) or name not in presets.PRESETS:
        raise MagicEduError(f"preset must be one of {', '.join(presets.PRESETS)}; got {name!r}")
    preset = presets.PRESETS[name]
    if preset.kind != "caption":
        captioners = ", ".join(n for n, p in presets.PRESETS.items() if p.kind == "caption")
        raise MagicEduError(f"preset {name!r} writes stories from a title; a sweep captions images, so use a "
                            f"caption preset ({captioners})")
    if preset.defaults is not None:
        return dict(preset.defaults)
    path = presets.data_dir() / "toy" / "defaults.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MagicEduError(f"preset {name!r}: cannot read its settings {path} ({err}); the toy models come with "
                            f"the repository in data/toy/ (or set {presets.DATA_ENV})") from None
    if not isinstance(settings, dict):
        raise MagicEduError(f"preset {name!r}: {path} must hold a JSON object of settings")
    return presets._check_defaults(settings, name)


# -- images --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageItem:
    """One image of a sweep: ``id`` (unique; a file's name, a toy scene's kind and seed), ``kind``
    (``"file"`` or ``"toy"``), ``where`` (the path, or a toy scene's [seed, objects]), its reference
    captions, and a ``group`` (the toy world's "1 shape" / "2-3 shapes"; else empty)."""

    id: str
    kind: str
    where: Any
    references: tuple[str, ...] = ()
    group: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "where": self.where, "references": list(self.references),
                "group": self.group}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageItem:
        return cls(data["id"], data["kind"], data["where"], tuple(data.get("references", ())), data.get("group", ""))


def folder_items(paths: Sequence[str | os.PathLike], references: Mapping[str, Sequence[str]] | None = None
                 ) -> list[ImageItem]:
    """Image files given or inside given folders (their image files, not recursive, sorted), with
    references by file name if given; a path that does not exist is an error."""
    from .cli import collect_images

    found, missing = collect_images([str(p) for p in paths])
    if missing:
        raise MagicEduError(f"images: {missing[0]['path']}: {missing[0]['reason']}")
    refs = references or {}
    return [ImageItem(name, "file", str(path), tuple(refs.get(name, ()))) for name, path in found]


def results_items(results: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageItem]:
    """The images of a result file in the paper's format (``image_name`` inside ``images_dir``),
    with its reference captions; the predictions are not used."""
    from .evaluation import _image_path, load_results

    entries = load_results(results, require_references=False)
    items, seen = [], set()
    for i, e in enumerate(entries):
        if e["image_name"] in seen:
            continue
        seen.add(e["image_name"])
        items.append(ImageItem(e["image_name"], "file", str(_image_path(images_dir, i, e["image_name"])),
                               tuple(e["captions"])))
    return items


def _load_item(item: ImageItem) -> tuple[Any, Any]:
    """(PIL image, truth or None) of an item."""
    if item.kind == "toy":
        return toy_image_and_truth(item.where)
    from ..inputs import load_image

    return load_image(item.where, name=f"image {item.id}"), None


# -- the work of one batch (on a worker, or in this process) --------------------------------------------------
_MODELS: dict[tuple[str, str | None], Any] = {}  # per process: (preset, device) -> ModelSet, loaded once


def worker_models(preset: str, device: str | None = None) -> Any:
    """The preset's models, loaded once per process (each Dask worker keeps its own)."""
    key = (preset, device)
    if key not in _MODELS:
        import magic_edu

        _MODELS[key] = magic_edu.load_models(preset, device=device) if device else magic_edu.load_models(preset)
    return _MODELS[key]


def sample_seed(setting_id: str, image_id: str) -> int:
    """A sampling decoder's seed for one image: from a hash of the setting and the image id, so it
    does not depend on batches, workers or what ran before."""
    digest = hashlib.sha256(f"{setting_id}/{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


@dataclass
class BatchTask:
    """One unit of work: one setting over one batch of images."""

    setting: dict[str, Any]
    batch: int
    items: list[dict[str, Any]]
    device: str | None = None
    threads: int = 1
    faults: dict[str, Any] = field(default_factory=dict)  # tests only: see _fault


def run_batch(task: BatchTask) -> dict[str, Any]:
    """Decode one setting over one batch of images and measure every caption: ``{"rows": [...],
    "seconds": ...}``. An image that cannot be read or decoded gets a failed row with the reason;
    anything else that goes wrong (the models do not load) raises."""
    import torch

    setting = Setting.from_dict(task.setting)
    items = [ImageItem.from_dict(d) for d in task.items]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        models = worker_models(setting.preset, task.device)
        _fault(task, "exit_once")
        return _run_batch(setting, task.batch, items, models, task)
    finally:
        torch.set_num_threads(threads_before)


def _fault(task: BatchTask, kind: str, item: ImageItem | None = None) -> None:
    """Test hooks (``faults``): ``exit_once: [[setting id, batch], ...]`` ends the worker process on its
    first attempt at that batch (a marker file in ``marker_dir`` remembers the attempt);
    ``raise_on: [image ids]`` makes decoding those images raise; ``delay``: seconds to sleep per batch;
    ``interrupt_after``: the run raises KeyboardInterrupt (as Ctrl-C does) once that many batches are written."""
    faults = task.faults
    if not faults:
        return
    if kind == "exit_once" and [task.setting["id"], task.batch] in faults.get("exit_once", []):
        marker = Path(faults["marker_dir"]) / f"exit-{task.setting['id']}-{task.batch}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(17)
    if kind == "raise_on" and item is not None and item.id in faults.get("raise_on", []):
        raise RuntimeError(f"injected failure decoding {item.id}")
    if kind == "delay" and faults.get("delay"):
        time.sleep(float(faults["delay"]))


def _run_batch(setting: Setting, batch: int, items: list[ImageItem], models: Any, task: BatchTask) -> dict[str, Any]:
    from .evaluation import clip_score, ref_clip_score

    lm, clip = models.lm, models.clip
    rows: dict[str, dict[str, Any]] = {}
    loaded: list[tuple[ImageItem, Any, Any]] = []
    for item in items:
        rows[item.id] = _row(setting, batch, item)
        try:
            image, truth = _load_item(item)
        except (MagicEduError, OSError, ValueError) as err:
            _failed(rows[item.id], f"cannot read the image: {err}")
            continue
        loaded.append((item, image, truth))

    clip.prefix_memo.clear()  # what the CLIP text tower remembers must not depend on earlier batches
    work_before, started = lm.cost + clip.cost, time.perf_counter()
    results = _decode(setting, loaded, models, task) if loaded else []
    _synchronize(lm)
    cost = lm.cost + clip.cost - work_before
    seconds = time.perf_counter() - started

    done = []
    for (item, image, truth), result in zip(loaded, results):
        row = rows[item.id]
        if isinstance(result, BaseException):
            _failed(row, f"decoding failed: {type(result).__name__}: {result}")
            continue
        row.update(caption=result.text, token_ids=" ".join(map(str, result.token_ids)),
                   tokens=len(result.token_ids))
        done.append((item, image, truth, row, result))
    for name in COUNTS:  # the batch's work, shared out over its captions
        share = getattr(cost, name) / max(1, len(done))
        for *_, row, _ in done:
            row[name] = share
    for *_, row, _ in done:
        row["seconds"] = seconds / len(done)

    if done:
        try:
            _measure(done, lm, clip, clip_score, ref_clip_score)
        except Exception as err:  # noqa: BLE001 (a metric failing must not lose the captions)
            for *_, row, _ in done:
                row["error"] = f"metrics failed: {type(err).__name__}: {err}"
    _fault(task, "delay")
    return {"setting": setting.id, "batch": batch, "images": [i.id for i in items],
            "rows": [rows[i.id] for i in items], "seconds": seconds, "pid": os.getpid()}


def _measure(done: list, lm: Any, clip: Any, clip_score: Callable, ref_clip_score: Callable) -> None:
    """Per caption: CLIP-S (and RefCLIP-S with references), the mean log-probability of its tokens
    under the LM, and the toy world's judgements where the truth is known."""
    from .analysis import token_log_probs

    images = [image for _, image, *_ in done]
    captions = [row["caption"] for *_, row, _ in done]
    for (*_, row, _), value in zip(done, clip_score(clip, images, captions)):
        row["clip_s"] = float(value)
    with_refs = [d for d in done if d[0].references]
    if with_refs:
        values = ref_clip_score(clip, [d[1] for d in with_refs], [d[3]["caption"] for d in with_refs],
                                [list(d[0].references) for d in with_refs])
        for d, value in zip(with_refs, values):
            d[3]["ref_clip_s"] = float(value)
    logprob: dict[tuple[int, ...], float] = {}
    for *_, row, gen in done:
        ids = tuple(gen.token_ids)
        if ids and ids not in logprob:
            logprob[ids] = float(np.mean(token_log_probs(lm, list(ids))))
        row["lm_logprob"] = logprob.get(ids, math.nan)
    for _, _, truth, row, _ in done:
        if truth is not None:
            row.update(toy_scores(row["caption"], truth))


def _decode(setting: Setting, loaded: list[tuple[ImageItem, Any, Any]], models: Any, task: BatchTask) -> list[Any]:
    """One Generation (or the exception it raised) per loaded image.

    MAGIC decodes the batch as one (exactly as one by one; if the batch fails, image by image, so
    the failure is pinned on its image); a sampler image by image with :func:`sample_seed`; ZeroCap
    image by image; a decoder that does not look at the image and does not sample once for all."""
    import magic_edu

    decoder = get_decoder(setting.decoder)
    fn = getattr(magic_edu, decoder.function)
    kwargs = {**setting.params, MAX_NEW_TOKENS.name: setting.max_new_tokens, "record": False}
    lm, clip = models.lm, models.clip

    def one(item: ImageItem, image: Any) -> Any:
        try:
            _fault(task, "raise_on", item)
            if decoder.samples:
                seeded = {**kwargs, "seed": sample_seed(setting.id, item.id)}
                return fn(lm, clip, image, **seeded) if decoder.needs_image else fn(lm, **seeded)
            return fn(lm, clip, image, **kwargs)
        except Exception as err:  # noqa: BLE001 (recorded in the image's row; the sweep goes on)
            return err

    if decoder.samples or decoder.steers:
        return [one(item, image) for item, image, _ in loaded]
    if decoder.needs_image:
        try:
            for item, _, _ in loaded:
                _fault(task, "raise_on", item)
            return list(fn(lm, clip, [image for _, image, _ in loaded], **kwargs))
        except Exception:  # noqa: BLE001 (decode image by image to find the one that fails)
            return [one(item, image) for item, image, _ in loaded]
    # greedy, beam and contrastive search do not look at the image: one caption, decoded once, fits all
    shared, out = None, []
    for item, _, _ in loaded:
        try:
            _fault(task, "raise_on", item)
            shared = fn(lm, **kwargs) if shared is None else shared
            out.append(shared)
        except Exception as err:  # noqa: BLE001 (recorded in the image's row)
            out.append(err)
    return out


def _synchronize(lm: Any) -> None:
    if lm.device.type == "cuda":
        import torch

        torch.cuda.synchronize(lm.device)


def _row(setting: Setting, batch: int, item: ImageItem) -> dict[str, Any]:
    decoder = get_decoder(setting.decoder)
    return {
        "setting_id": setting.id, "setting": setting.label, "preset": setting.preset, "decoder": setting.decoder,
        **setting.params, "max_new_tokens": setting.max_new_tokens,
        "image_id": item.id, "group": item.group, "batch": batch, "status": STATUS_OK, "error": "",
        "caption": "", "token_ids": "", "tokens": 0,
        "sample_seed": sample_seed(setting.id, item.id) if decoder.samples else None,
        "clip_s": math.nan, "ref_clip_s": math.nan, "lm_logprob": math.nan,
        **(dict.fromkeys(TOY_COLUMNS, None) if item.kind == "toy" else {}),
        **dict.fromkeys(COST_COLUMNS, math.nan),
    }


def _failed(row: dict[str, Any], reason: str) -> None:
    row.update(status=STATUS_FAILED, error=reason)


# -- the sweep's folder: manifest, parts, table ---------------------------------------------------------------
MANIFEST = "manifest.json"
REFERENCES = "references.json"
PARTS = "parts"


def batches_of(items: Sequence[ImageItem], batch_size: int) -> list[list[ImageItem]]:
    """The fixed batches: consecutive runs of ``batch_size`` images of the image list."""
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def part_path(out: Path, setting_id: str, batch: int) -> Path:
    return out / PARTS / setting_id / f"{batch:06d}.json"


def read_part(path: Path) -> dict[str, Any] | None:
    """A part file's content, or None if it is missing or unreadable (then its batch runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def _check_manifest(out: Path, items: Sequence[ImageItem], batch_size: int) -> dict[str, Any] | None:
    """The existing manifest of ``out`` (None if new); refuses other images or another batch size."""
    path = out / MANIFEST
    if not path.exists():
        if any(p.name != ".lock" for p in out.iterdir()):
            raise MagicEduError(f"--out {out} is a folder that holds other files and no {MANIFEST}; give an empty "
                                "or new folder for the sweep")
        return None
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MagicEduError(f"--out {out}: its {MANIFEST} is not readable ({err}); choose a new --out") from None
    if not isinstance(before, dict) or before.get("format") != FORMAT:
        raise MagicEduError(f"--out {out}: {path} is not a magic-edu sweep manifest; choose a new --out")
    ids = [i.id for i in items]
    if before.get("batch_size") != batch_size:
        raise MagicEduError(f"--out {out} was swept with --batch-size {before.get('batch_size')}, now {batch_size}: "
                            "every caption must be decoded in the same batch, so resume with the same batch size, "
                            "or choose a new --out")
    old = before.get("images", [])
    if old != ids:
        diff = next((j for j, (a, b) in enumerate(zip(old, ids)) if a != b), min(len(old), len(ids)))
        shown = (f"{len(old)} images before, {len(ids)} now" if len(old) != len(ids) else
                 f"image {diff} was {old[diff]!r}, now {ids[diff]!r}")
        raise MagicEduError(f"--out {out} was swept over other images ({shown}): the batches would change, so resume "
                            "with the same images, or choose a new --out")
    return before


def _write_manifest(out: Path, items: Sequence[ImageItem], batch_size: int, settings: Sequence[Setting],
                    before: dict[str, Any] | None, source: str) -> None:
    from ..trace import write_json_atomic

    known = dict(before.get("settings", {})) if before else {}
    for s in settings:
        known[s.id] = s.to_dict()
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "batch_size": batch_size,
                "images": [i.id for i in items], "grid": [s.id for s in settings], "settings": known}
    write_json_atomic(out / MANIFEST, manifest)
    write_json_atomic(out / REFERENCES, {i.id: list(i.references) for i in items if i.references})
    write_json_atomic(out / "items.json", [i.to_dict() for i in items])


def _remove_stale_temporary_files(out: Path) -> int:
    """Remove ``.<name>.<random>.tmp`` files a killed run left (only while holding the lock)."""
    n = 0
    for tmp in itertools.chain(out.glob(".*.tmp"), out.glob(f"{PARTS}/*/.*.tmp")):
        try:
            tmp.unlink()
            n += 1
        except FileNotFoundError:
            continue
    return n


def _write_table_atomic(frame: pd.DataFrame, path: Path, table_format: str) -> None:
    """``frame`` as Parquet or CSV at ``path``, through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if table_format == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_table_format(table_format: str) -> None:
    if table_format not in TABLE_FORMATS:
        raise MagicEduError(f"--format must be one of {', '.join(TABLE_FORMATS)}; got {table_format!r}")
    if table_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise MagicEduError(f"--format parquet needs pyarrow, which is not installed: {PARQUET_HINT}") from None


# -- running a sweep -------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the table (a row per (setting, image)), the per-setting summary,
    and what this run did (``decoded``: captions decoded now, ``reused``: found finished; ``batches``:
    (setting id, batch) pairs run now; ``completions``: seconds since the start at which each batch
    finished; ``seconds``: the whole run, cluster start and model loading included)."""

    out: Path
    table: pd.DataFrame
    summary: pd.DataFrame
    decoded: int = 0
    reused: int = 0
    batches: list[tuple[str, int]] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    notes: list[str] = field(default_factory=list)


def run_sweep(
    grid: Any, images: Sequence[ImageItem] | str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
    *, preset: str | None = None, max_new_tokens: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None, address: str | None = None, threads: int = 1, device: str | None = None,
    table_format: str = "parquet", coco: bool = True, retry_failed: bool = False, progress: bool = True,
    faults: dict[str, Any] | None = None,
) -> SweepResult:
    """Run a sweep: every setting of ``grid`` (see :func:`expand_grid`) over ``images`` (a list of
    :class:`ImageItem` such as :func:`toy_items` makes, or image files and folders), into the folder
    ``out``; return the table and the summary (also written there).

    ``workers=0`` decodes in this process; ``workers=N`` starts a local Dask cluster of N processes
    (None, the default: one per core; in this process if Dask is not installed) and stops it at the
    end; ``address`` joins a running Dask cluster instead (its workers need magic_edu and the models).
    ``threads``: torch threads per decode (1: the same numbers everywhere). Everything is checked
    before any work starts; interrupted (Ctrl-C), it keeps what is finished and raises
    KeyboardInterrupt: run it again to continue. ``faults``: test hooks (see ``_fault``)."""
    from filelock import FileLock, Timeout

    started = time.perf_counter()
    settings = expand_grid(grid, preset, max_new_tokens)
    items = _as_items(images)
    batch_size = _check_int_option(batch_size, "--batch-size", 1)
    threads = _check_int_option(threads, "--threads", 1)
    _check_table_format(table_format)
    n_workers, workers_note = _check_workers(workers, address)
    _check_device(device, local=address is None)
    if not items:
        raise MagicEduError("images: the image set is empty; give image files or folders, --results with --images, "
                            "or --toy N")
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise MagicEduError(f"images: {dup!r} appears twice; every image id must be unique")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MagicEduError(f"--out {out} is a file; a sweep writes a folder (give a new folder name)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MagicEduError(f"--out {out}: cannot create it ({err})") from None

    lock = FileLock(str(out / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise MagicEduError(f"another magic-edu sweep is writing {out}; wait for it or choose another --out") from None
    try:
        before = _check_manifest(out, items, batch_size)
        stale = _remove_stale_temporary_files(out)
        _write_manifest(out, items, batch_size, settings, before, _source_of(items))
        batches = batches_of(items, batch_size)
        todo, reused = [], 0
        for b, batch in enumerate(batches):  # batch by batch: a partial sweep has every setting on the same images
            for s in settings:
                part = read_part(part_path(out, s.id, b))
                if part is not None and not (retry_failed and any(r.get("status") != STATUS_OK for r in part["rows"])):
                    reused += len(batch)
                    continue
                todo.append(BatchTask(s.to_dict(), b, [i.to_dict() for i in batch], device, threads,
                                      dict(faults or {})))
        result = SweepResult(out, pd.DataFrame(), pd.DataFrame(), reused=reused, workers=n_workers)
        if workers_note:
            result.notes.append(workers_note)
        if stale:
            result.notes.append(f"removed {stale} temporary file(s) a killed earlier run left")
        if todo:
            _execute(todo, out, n_workers, address, result, progress, started)
        result.table, result.summary, notes = assemble(out, settings, coco=coco, table_format=table_format)
        result.notes += notes
        result.seconds = time.perf_counter() - started
        return result
    finally:
        lock.release()


def _as_items(images: Any) -> list[ImageItem]:
    if isinstance(images, (str, os.PathLike)):
        return folder_items([images])
    images = list(images)
    if all(isinstance(i, ImageItem) for i in images):
        return images
    if all(isinstance(i, (str, os.PathLike)) for i in images):
        return folder_items(images) if images else []
    raise MagicEduError("images must be ImageItems (folder_items, results_items, toy_items) or image paths")


def _source_of(items: Sequence[ImageItem]) -> str:
    kinds = sorted({i.kind for i in items})
    return "toy world held-out scenes" if kinds == ["toy"] else "image files"


def _check_int_option(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MagicEduError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def _check_device(device: str | None, local: bool) -> None:
    """A torch device name; CUDA must be there when this machine's workers are to use it."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise MagicEduError(f"--device must be a torch device such as cpu, cuda or cuda:1; got {device!r}") from None
    if local and parsed.type == "cuda" and not torch.cuda.is_available():
        raise MagicEduError(f"--device {device}: no CUDA GPU on this machine; use --device cpu (or --address a "
                            "cluster whose workers have GPUs)")


def _check_workers(workers: int | None, address: str | None) -> tuple[int, str | None]:
    """(local worker processes, 0: this process; a note), checking that Dask is there when needed.
    With no Dask and ``workers`` None (the default), the sweep runs in this process, with a note."""
    if workers is not None:
        _check_int_option(workers, "--workers", 0)
    if address is not None:
        if not isinstance(address, str) or not address.strip():
            raise MagicEduError(f"--address must be a scheduler address such as tcp://10.0.0.1:8786; got {address!r}")
        if workers:
            raise MagicEduError("--address joins a running cluster, whose workers are its own: leave out --workers")
    elif workers == 0:
        return 0, None
    try:
        import distributed  # noqa: F401
    except ImportError:
        if address is None and workers is None:
            return 0, f"Dask distributed is not installed, so the sweep ran in this process ({INSTALL_HINT})"
        what = f"--address {address}" if address else f"--workers {workers}"
        raise MagicEduError(f"{what} needs Dask distributed, which is not installed: {INSTALL_HINT}; "
                            "or run in this process with --workers 0") from None
    if address is not None:
        return 0, None
    return (workers if workers else (os.cpu_count() or 1)), None


def _execute(todo: list[BatchTask], out: Path, n_workers: int, address: str | None, result: SweepResult,
             progress: bool, started: float) -> None:
    """Run the batches, writing each part as it finishes, with a progress bar in captions."""
    from tqdm import tqdm

    from ..trace import write_json_atomic

    captions = sum(len(t.items) for t in todo)
    where = f"cluster {address}" if address else (f"{n_workers} local workers" if n_workers else "this process")
    with tqdm(total=captions, unit="cap", desc=f"sweep ({where})", file=sys.stderr, disable=not progress,
              smoothing=0.1) as bar:
        def finished(task: BatchTask, part: dict[str, Any]) -> None:
            write_json_atomic(part_path(out, task.setting["id"], task.batch), part)
            result.decoded += len(part["rows"])
            result.batches.append((task.setting["id"], task.batch))
            result.completions.append(time.perf_counter() - started)
            bar.update(len(part["rows"]))
            if len(result.batches) == task.faults.get("interrupt_after"):  # tests only: Ctrl-C here
                raise KeyboardInterrupt

        if address is None and n_workers == 0:
            for task in todo:
                finished(task, run_batch(task))
        else:
            _execute_dask(todo, n_workers, address, finished)


def _execute_dask(todo: list[BatchTask], n_workers: int, address: str | None,
                  finished: Callable[[BatchTask, dict[str, Any]], None]) -> None:
    """The batches on a Dask cluster: a local one of ``n_workers`` processes (one thread each),
    started and stopped here, or the running one at ``address``. A worker that dies has its batch
    rerun by the scheduler; past ``allowed-failures`` deaths the batch's rows are recorded failed."""
    from distributed import Client, KilledWorker, LocalCluster, as_completed

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_dask_logs())
        if address:
            try:
                client = stack.enter_context(Client(address, timeout="30s"))
            except (OSError, TimeoutError) as err:
                raise MagicEduError(f"--address {address}: cannot reach a Dask scheduler there ({err})") from None
        else:
            stack.enter_context(_worker_start_method())  # for the cluster's life: a restarted worker starts alike
            cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        run = uuid.uuid4().hex[:8]
        futures: dict[Any, BatchTask] = {}
        queue = iter(enumerate(todo))
        running = as_completed()

        def submit() -> None:
            """Keep about two batches per worker thread in flight (a cluster joined by address may grow):
            the scheduler holds a few tasks, not the whole sweep, and Ctrl-C cancels little."""
            window = max(4, 2 * sum(client.nthreads().values()))
            while len(futures) < window:
                i, task = next(queue, (None, None))
                if task is None:
                    return
                key = f"magic-edu-sweep-{task.setting['id']}-{task.batch}-{run}"
                future = client.submit(run_batch, task, key=key, priority=-i, retries=0)
                futures[future] = task
                running.add(future)

        try:
            submit()
            for future in running:
                task = futures.pop(future)
                try:
                    part = future.result()
                except KilledWorker as err:
                    part = _killed_part(task, err)
                except MagicEduError:
                    raise
                except Exception as err:  # a batch failing as a whole (not one image) fails the sweep
                    raise MagicEduError(f"batch {task.batch} of setting {task.setting['label']!r} failed on a worker: "
                                        f"{type(err).__name__}: {err}") from err
                future.release()
                finished(task, part)
                submit()
        finally:
            for future in futures:
                future.cancel()


# Imported once by the local cluster's fork server, so that a worker (and a worker restarted after
# it died) starts without importing torch, transformers and open_clip again (about 12 s on 2 cores).
WORKER_PRELOAD = ("distributed", "magic_edu.tools.sweep", "open_clip", "transformers.models.gpt2.modeling_gpt2")


@contextlib.contextmanager
def _quiet_dask_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Dask's loggers at ``level`` while the sweep runs (its INFO lines about every worker and
    connection would bury the progress bar, where a library has given the root logger a handler)."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def start_worker_server() -> bool:
    """Start now the fork server that a local cluster's workers come from (it imports
    :data:`WORKER_PRELOAD`, about 12 s of one core), so that its imports overlap other work;
    False where the platform has no fork server (then workers are spawned, each importing)."""
    import multiprocessing
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    forkserver.ensure_running()
    return True


@contextlib.contextmanager
def _worker_start_method() -> Iterator[None]:
    """While in it, Dask starts worker processes from the fork server of :func:`start_worker_server`
    (where the platform has one; else its default, spawn)."""
    import dask

    if not start_worker_server():  # it runs from here on with our imports, whatever Dask asks of it later
        yield
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield


def _killed_part(task: BatchTask, err: BaseException) -> dict[str, Any]:
    setting = Setting.from_dict(task.setting)
    rows = []
    for d in task.items:
        row = _row(setting, task.batch, ImageItem.from_dict(d))
        _failed(row, f"the worker process died on every attempt at this batch ({type(err).__name__})")
        rows.append(row)
    return {"setting": setting.id, "batch": task.batch, "images": [d["id"] for d in task.items], "rows": rows,
            "seconds": math.nan, "pid": None}


# -- the table and the summary ------------------------------------------------------------------------------------
def assemble(out: str | os.PathLike, settings: Sequence[Setting] | None = None, *, coco: bool = True,
             table_format: str = "parquet") -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Build the table from the part files of ``settings`` (default: the manifest's current grid),
    summarise it, and write both (atomically) into ``out``: (table, summary, notes)."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if settings is None:
        settings = [Setting.from_dict(manifest["settings"][i]) for i in manifest["grid"]]
    items = [ImageItem.from_dict(d) for d in json.loads((out / "items.json").read_text(encoding="utf-8"))]
    batches = batches_of(items, manifest["batch_size"])
    rows, missing = [], 0
    for s in settings:
        for b, batch in enumerate(batches):
            part = read_part(part_path(out, s.id, b))
            if part is None:
                missing += len(batch)
                continue
            rows += part["rows"]
    table = _table(rows, settings)
    notes = []
    if missing:
        notes.append(f"{missing} (setting, image) pairs are not finished yet: run the sweep again to continue")
    summary, more = summarize(table, settings, {i.id: i.references for i in items}, coco=coco)
    notes += more
    _write_table_atomic(table, out / f"captions.{table_format}", table_format)
    _write_table_atomic(summary, out / f"summary.{table_format}", table_format)
    from ..trace import write_json_atomic

    write_json_atomic(out / "summary.json", {"notes": notes, "settings": summary.to_dict(orient="records")})
    return table, summary, notes


def _param_columns(settings: Sequence[Setting]) -> list[str]:
    """Every parameter of the settings' decoders, in the order the settings and the registry give."""
    params: list[str] = []
    for s in settings:
        params += [p for p in get_decoder(s.decoder).param_names if p not in params]
    return params


def _table(rows: list[dict[str, Any]], settings: Sequence[Setting]) -> pd.DataFrame:
    """The rows as one frame with a fixed column order: identity, parameters, outcome, metrics, costs."""
    params = _param_columns(settings)
    front = ["setting_id", "setting", "preset", "decoder", *params, "max_new_tokens", "image_id", "group", "batch",
             "status", "error", "caption", "token_ids", "tokens", "sample_seed", "clip_s", "ref_clip_s",
             "lm_logprob", *TOY_COLUMNS, *COST_COLUMNS]
    frame = pd.DataFrame(rows)
    for column in front:
        if column not in frame.columns:
            frame[column] = None
    frame = frame[front + [c for c in frame.columns if c not in front]]
    if not any(c in frame for c in TOY_COLUMNS) or frame[list(TOY_COLUMNS)].isna().all().all():
        frame = frame.drop(columns=list(TOY_COLUMNS))
    return frame.reset_index(drop=True)


def summarize(table: pd.DataFrame, settings: Sequence[Setting], references: Mapping[str, Sequence[str]] | None = None,
              *, coco: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """One row per setting: its parameters; images, ok, failed; the COCO metrics where every image
    has references (``references``: image id -> captions; one Java run for all settings); CLIP-S,
    RefCLIP-S, mean log-probability; rep-n and diversity; the toy world's shares (overall and per
    group); tokens and the work per caption. Failed rows are left out of every metric."""
    from .evaluation import COCO_COLUMNS, repetition_and_diversity

    notes: list[str] = []
    rows = []
    coco_sets: dict[str, list[dict[str, Any]]] = {}
    references = references or {}
    empty = 0
    for s in settings:
        sub = table[table["setting_id"] == s.id] if len(table) else table
        ok = sub[sub["status"] == STATUS_OK] if len(sub) else sub
        row: dict[str, Any] = {"setting_id": s.id, "setting": s.label, "decoder": s.decoder, **s.params,
                               "max_new_tokens": s.max_new_tokens, "images": len(sub), "ok": len(ok),
                               "failed": int((sub["status"] != STATUS_OK).sum()) if len(sub) else 0}
        captions = list(ok["caption"]) if len(ok) else []
        row.update({m: _mean(ok, m) for m in ("clip_s", "ref_clip_s", "lm_logprob")})
        row.update(repetition_and_diversity(captions) if captions else {})
        for column in TOY_COLUMNS:
            if column in ok and ok[column].notna().any():
                row[column] = float(ok[column].astype(float).mean())
                for group, part in ok.groupby("group"):
                    if group:
                        row[f"{column} ({group})"] = float(part[column].astype(float).mean())
        row["tokens"] = _mean(ok, "tokens")
        for name in COST_COLUMNS:
            row[f"{name} / caption"] = _mean(ok, name)
        row["ms / caption"] = 1000 * row.pop("seconds / caption")  # NaN stays NaN
        rows.append(row)
        if len(ok) and all(references.get(i) for i in ok["image_id"]):
            entries = [{"image_name": i, "captions": list(references[i]), "prediction": c}
                       for i, c in zip(ok["image_id"], ok["caption"])]
            coco_sets[s.id] = [e for e in entries if e["prediction"].strip()]
            empty += len(entries) - len(coco_sets[s.id])
    summary = pd.DataFrame(rows)
    front = ["setting_id", "setting", "decoder", *_param_columns(settings), "max_new_tokens"]
    summary = summary[[c for c in front if c in summary] + [c for c in summary.columns if c not in front]]
    if coco and coco_sets:
        if empty:
            notes.append(f"{empty} empty captions left out of the COCO metrics")
        try:
            import warnings

            from .evaluation import compare_caption_metrics

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = compare_caption_metrics({k: v for k, v in coco_sets.items() if v})
            for column in COCO_COLUMNS:
                summary[column] = [scores.get(sid, {}).get(column, math.nan) for sid in summary["setting_id"]]
        except MagicEduError as err:
            notes.append(f"COCO metrics skipped: {err}")
    elif coco and len(table) and not coco_sets:
        notes.append("no reference captions: BLEU, METEOR, ROUGE-L and CIDEr skipped")
    return summary, notes


def _mean(frame: pd.DataFrame, column: str) -> float:
    if not len(frame) or column not in frame:
        return math.nan
    values = pd.to_numeric(frame[column], errors="coerce")
    return float(values.mean()) if values.notna().any() else math.nan


TEXT_COLUMNS = ("setting_id", "setting", "preset", "decoder", "image_id", "group", "status", "error", "caption",
                "token_ids")


def load_sweep(out: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, summary) of a sweep folder, as the last run wrote them."""
    out = Path(out)
    for table_format in TABLE_FORMATS:
        path = out / f"captions.{table_format}"
        if not path.exists():
            continue
        if table_format == "parquet":
            return pd.read_parquet(path), pd.read_parquet(out / "summary.parquet")
        frames = []
        for name in ("captions", "summary"):  # CSV: text columns as text, an empty cell as ""
            frame = pd.read_csv(out / f"{name}.csv", dtype=dict.fromkeys(TEXT_COLUMNS, str))
            for column in TEXT_COLUMNS:
                if column in frame:
                    frame[column] = frame[column].fillna("")
            frames.append(frame)
        return frames[0], frames[1]
    raise MagicEduError(f"{out} holds no sweep table (captions.parquet or captions.csv); run the sweep first")


# -- printing -----------------------------------------------------------------------------------------------------
SHOWN = (("images", "n"), ("failed", "failed"), ("BLEU-4", "BLEU-4"), ("CIDEr", "CIDEr"), ("clip_s", "CLIP-S"),
         ("ref_clip_s", "RefCLIP-S"), ("lm_logprob", "log p"), ("rep-2", "rep-2"), ("diversity", "div"),
         ("grounded", "grounded"), ("all_right", "all right"), ("fluent", "fluent"), ("tokens", "tokens"),
         ("ms / caption", "ms/cap"))


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a plain-text table, one line per setting (the main metrics present)."""
    columns = [(c, label) for c, label in SHOWN if c in summary and summary[c].notna().any()]
    width = max([len("setting"), *(len(s) for s in summary["setting"])]) if len(summary) else 7
    lines = [f"{'setting':<{width}}  " + "  ".join(f"{label:>9}" for _, label in columns)]
    for _, row in summary.iterrows():
        cells = []
        for c, _ in columns:
            v = row[c]
            cells.append(f"{'n/a':>9}" if pd.isna(v) else f"{int(v):>9d}" if c in ("images", "failed")
                         else f"{v:>9.3f}" if abs(v) < 10 else f"{v:>9.1f}")
        lines.append(f"{row['setting']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# -- throughput ----------------------------------------------------------------------------------------------------
BENCH_GRID = {"settings": [{"decoder": "magic"}]}


def bench_sweep(workers: Sequence[int] = (0, 1, 2), scenes: int = 32, batch_size: int = DEFAULT_BATCH_SIZE,
                grid: Any = None, preset: str = "toy", progress: bool = False) -> pd.DataFrame:
    """Throughput of the same sweep (default: MAGIC with the preset's settings over ``scenes`` single-
    and ``scenes`` multi-object toy scenes) in this process and on local clusters of each number of
    ``workers``: one row each with the whole run's seconds (cluster start and model loading
    included), captions per second over the whole run, and the steady rate (captions after the first
    finished batch per second after it: what a long sweep sees). Each run writes a fresh temporary folder."""
    items = toy_items(scenes)
    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="magic-edu-sweep-bench-") as tmp:
            r = run_sweep(grid or BENCH_GRID, items, Path(tmp) / "out", preset=preset, batch_size=batch_size,
                          workers=n, coco=False, progress=progress, table_format="csv")
        done = sorted(r.completions)
        first_batch = len(r.table) / max(1, len(r.batches))
        steady = (r.decoded - first_batch) / (done[-1] - done[0]) if len(done) > 1 else math.nan
        rows.append({"workers": n, "mode": "this process" if n == 0 else f"local cluster, {n} worker(s)",
                     "captions": r.decoded, "batches": len(r.batches), "seconds": r.seconds,
                     "captions / s": r.decoded / r.seconds, "steady captions / s": steady,
                     "first result after s": done[0] if done else math.nan})
    return pd.DataFrame(rows)


# -- the command line ---------------------------------------------------------------------------------------------
def add_sweep_command(subparsers: Any) -> None:
    """``magic-edu sweep``: decoder settings over an image set, in this process or on a Dask cluster."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of decoder settings over an image set (resumable; local or on a Dask cluster)",
        description="Run every decoder setting of a grid over an image set into a folder: a tidy table "
                    "(captions.parquet, a row per setting and image) and a per-setting summary. Resumable: "
                    "finished batches are kept and a rerun continues. By default on a local Dask cluster of one "
                    "worker per core; --workers 0 runs in this process, --address joins a running cluster.")
    p.add_argument("images", nargs="*", help="image files and/or folders (their image files, not recursive)")
    p.add_argument("--out", help="the sweep's folder (created; a rerun resumes it)")
    p.add_argument("--toy", type=int, metavar="N", help="the toy world's held-out scenes: N with one shape, N with 2-3")
    p.add_argument("--results", metavar="RESULTS.json",
                   help="the images (and reference captions) of a result file in the paper's format; needs --images")
    p.add_argument("--images", dest="images_dir", metavar="DIR", help="the folder of --results' image names")
    p.add_argument("--references", metavar="REFS.json",
                   help='reference captions for image files: {"image_name": ["ref", ...]} or a result-format list')
    p.add_argument("--grid", metavar="GRID.yaml", help="the settings: a YAML, TOML or JSON file (see the README)")
    p.add_argument("--setting", action="append", default=[], metavar='"DECODER name=v1,v2 ..."',
                   help='a setting on the command line, e.g. "magic alpha=0.1 beta=0,0.5,1" (repeatable)')
    p.add_argument("--preset", default=None, help="model preset (default: the grid's, else toy)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate at most (default: the grid's, else the preset's)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per batch (a task), fixed for the whole sweep (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=None,
                   help="local Dask worker processes (default: one per core); 0: run in this process")
    p.add_argument("--address", help="join the running Dask cluster at this scheduler address (tcp://host:8786)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per decode (default 1: the same numbers "
                                                          "whatever the machine)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the library's choice)")
    p.add_argument("--format", dest="table_format", choices=TABLE_FORMATS, default="parquet",
                   help="the table's format (default parquet)")
    p.add_argument("--no-coco", action="store_true", help="skip the COCO metrics (they start Java, about 15 s)")
    p.add_argument("--retry-failed", action="store_true", help="decode again the batches that have failed rows")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--report", action="store_true", help="print the summary of the sweep in --out; run nothing")
    p.add_argument("--bench", action="store_true",
                   help="measure the sweep's throughput on the toy world (in this process, 1 and 2 local workers)")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    if args.bench:
        scenes = args.toy or 32
        workers = [0, 1, 2] if args.workers is None else [args.workers]
        grid = _grid_from_args(args) or BENCH_GRID
        table = bench_sweep(workers, scenes=scenes, batch_size=args.batch_size, grid=grid,
                            preset=args.preset or "toy")
        what = ("MAGIC (the preset's settings)" if grid is BENCH_GRID
                else f"{len(expand_grid(grid, args.preset))} settings")
        print(f"sweep throughput: {what} over {2 * scenes} toy scenes, batch {args.batch_size}, one torch thread "
              f"per worker, {os.cpu_count()} cores, load average before: {_load_average()}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        return 0
    if not args.out:
        raise MagicEduError("--out: give the sweep's folder")
    if args.report:
        _, summary = load_sweep(args.out)
        notes = json.loads((Path(args.out) / "summary.json").read_text(encoding="utf-8")).get("notes", [])
        _print_summary(summary, notes, args.json)
        return 0
    grid = _grid_from_args(args)
    if not grid:
        raise MagicEduError('give the settings: --grid GRID.yaml or --setting "magic beta=0,0.5,1" (repeatable)')
    items = _items_from_args(args)
    faults = json.loads(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None  # tests only
    try:
        result = run_sweep(grid, items, args.out, preset=args.preset, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, workers=args.workers, address=args.address,
                           threads=args.threads, device=args.device, table_format=args.table_format,
                           coco=not args.no_coco, retry_failed=args.retry_failed, faults=faults)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished batches are in {args.out}; run the same command again to continue",
              file=sys.stderr)
        return 130
    print(f"{result.decoded} captions decoded, {result.reused} found finished, in {result.seconds:.1f} s; "
          f"table: {Path(args.out) / ('captions.' + args.table_format)}", file=sys.stderr)
    _print_summary(result.summary, result.notes, args.json)
    return 0


def _grid_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The grid of --grid and the --setting options ({} if neither is given)."""
    grid: dict[str, Any] = read_grid(args.grid) if args.grid else {}
    if args.setting:
        grid = {**grid, "settings": list(grid.get("settings", [])) + [parse_setting(s) for s in args.setting]}
    return grid


def _load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _items_from_args(args: argparse.Namespace) -> list[ImageItem]:
    sources = [bool(args.images), args.results is not None, args.toy is not None]
    if sum(sources) != 1:
        raise MagicEduError("images: give exactly one of image files/folders, --results RESULTS.json --images DIR, "
                            "or --toy N")
    if args.toy is not None:
        if args.toy < 1:
            raise MagicEduError(f"--toy must be at least 1; got {args.toy}")
        return toy_items(args.toy)
    if args.results is not None:
        if not args.images_dir:
            raise MagicEduError("--results needs --images DIR, the folder that holds its image names")
        return results_items(args.results, args.images_dir)
    from .cli import read_references

    refs = read_references(args.references) if args.references else {}
    items = folder_items(args.images, refs)
    if not items:
        raise MagicEduError(f"no images in {' '.join(args.images)} (image files end in .jpg, .png, ...)")
    return items


def _print_summary(summary: pd.DataFrame, notes: Sequence[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(json.loads(summary.to_json(orient="records")), indent=2))
    else:
        print(format_summary(summary))
    for note in notes:
        print(f"note: {note}", file=sys.stderr if as_json else sys.stdout)
