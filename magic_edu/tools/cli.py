"""The ``magic-edu`` command line.

    magic-edu evaluate RESULTS.json [--json] [--spice] [--images DIR [--preset NAME]]
    magic-edu caption IMAGES... --out results.json [--preset toy] [--decoder magic] [--batch-size 8]
                      [--k K] [--alpha A] [--beta B] [--p P] [--seed S] [--max-new-tokens N] ...
    magic-edu bench [--models toy|paper-size|all]
    magic-edu sweep [IMAGES... | --results R.json --images DIR | --toy N] --out DIR [--grid GRID.yaml]
                    [--setting "magic beta=0,0.5,1"] [--workers N | --address tcp://HOST:8786] [--report | --bench]
    magic-edu toy [--report | --tune-only | --quick] [--out data/toy]
    magic-edu export TRACE.json -o decode.html [--image IMAGE] [--title TITLE]
    magic-edu adapt-lm --corpus CAPTIONS --out DIR [--base gpt2] [--steps N] ...   (torchrun for several processes)
    magic-edu index-text CAPTIONS -o index.safetensors [--preset toy]
    magic-edu index-images FOLDER -o images.safetensors [--preset toy]
    magic-edu caption IMAGES... --out results.json --decoder clip-retrieval --index index.safetensors
    magic-edu story TITLE (--index images.safetensors | --image IMAGE) [--preset toy-story]

Each subcommand is one ``add_*_command(subparsers)`` function listed in :data:`SUBCOMMANDS`;
a new one (``bench``, ...) is added by writing such a function and appending it there.
The function sets ``func``: called with the parsed arguments, it returns the exit status.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import MagicEduError
from ..registry import DECODERS, MAX_NEW_TOKENS, Decoder, Param, get_decoder
from ..retrieval import IMAGE_SUFFIXES
from ..training.adapt import add_adapt_lm_command
from .bench import add_bench_command
from .sweep import add_sweep_command

OPTION_ALIASES = {"p": ("--top-p",)}  # older spellings of a parameter's option, still accepted


# -- evaluate ------------------------------------------------------------------------------
def add_evaluate_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a result file (COCO metrics, rep-n/diversity, CLIPScore)",
        description="Score a JSON list of {image_name, captions: [references], prediction} "
                    "(the MAGIC release's result format).")
    p.add_argument("results", help="the result file")
    p.add_argument("--json", action="store_true", help="print a JSON object metric name -> value")
    p.add_argument("--spice", action="store_true", help="also SPICE (needs its Stanford models)")
    p.add_argument("--images", metavar="DIR", help="folder of the images: adds CLIP-S and RefCLIP-S")
    p.add_argument("--preset", default="toy", help="whose CLIP scores --images (default: toy)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import magic_edu

    from .evaluation import evaluate, table_to_dict

    clip = magic_edu.load_models(args.preset).clip if args.images else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are printed below instead
        table = evaluate(args.results, clip=clip, images_dir=args.images, spice=args.spice)
    notes = table.attrs.get("notes", [])
    if args.json:
        print(json.dumps(table_to_dict(table), indent=2))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        print(f"{'metric':<10} {args.results}")
        for key, value in table_to_dict(table).items():
            shown = "n/a" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}"
            print(f"{key:<10} {shown}")
        for note in notes:
            print(f"note: {note}")
    return 0


# -- caption -------------------------------------------------------------------------------
def add_caption_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "caption", help="caption a folder (or a list) of images into a result file",
        description="Caption images into the evaluate format. Resumable: images already in --out are "
                    "skipped, and --out is rewritten atomically after every batch. Unreadable images "
                    "are skipped with the reason, printed and listed in <out stem>.skipped.json. The settings are "
                    "kept in <out stem>.settings.json (a resume with other settings is refused), and "
                    "<out>.lock keeps a second run from writing the same --out.")
    p.add_argument("images", nargs="+", help="image files and/or folders (their image files, not recursive)")
    p.add_argument("--out", required=True, help="the result file to write (and resume from)")
    p.add_argument("--preset", default="toy", help="model preset for magic_edu.load_models (default: toy)")
    p.add_argument("--decoder", choices=decoder_choices(), default="magic", metavar="DECODER",
                   help="; ".join(f"{d.name}: {d.label}" + (f" (also {', '.join(d.aliases)})" if d.aliases else "")
                                  for d in DECODERS.values()) + " (default: magic)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    for name, param in decoder_params().items():
        p.add_argument(option(name), *OPTION_ALIASES.get(name, ()), dest=name, type=param.kind, default=None,
                       metavar=name.upper(), help=_param_help(name, param))
    p.add_argument(option(MAX_NEW_TOKENS.name), dest=MAX_NEW_TOKENS.name, type=int, default=None, metavar="N",
                   help=f"{MAX_NEW_TOKENS.help} (default: the preset's, else {MAX_NEW_TOKENS.default})")
    p.add_argument("--references", metavar="REFS.json",
                   help='reference captions: {"image_name": ["ref", ...]} or a result-format list')
    p.add_argument("--index", metavar="INDEX.safetensors",
                   help="--decoder clip_retrieval: the index of captions to retrieve from (magic-edu index-text), "
                        "built with the preset's CLIP")
    p.set_defaults(func=run_caption)


SETTINGS_FORMAT = "magic_edu.caption_settings"


def run_caption(args: argparse.Namespace) -> int:
    """Caption ``args.images`` into ``args.out``, holding ``<out>.lock`` for the whole run (a
    second run on the same --out is refused), with the settings in ``<out stem>.settings.json``
    (a resume with other settings is refused)."""
    from filelock import FileLock, Timeout

    if args.batch_size < 1:
        raise MagicEduError(f"--batch-size must be at least 1; got {args.batch_size}")
    decoder, _ = decoder_arguments(args)  # a bad setting fails here, before any model loads
    if decoder.retrieves:  # and so does an index that is not one (whether it fits the CLIP: once CLIP loads)
        from ..retrieval import as_index

        as_index(args.index, "text", "--index")
    out = Path(args.out)
    if out.is_dir():
        raise MagicEduError(f"--out {out} is a folder; give a file name such as {out / 'results.json'}")
    found, skipped = collect_images(args.images)
    if not found:
        missing = "".join(f"; {s['path']}: {s['reason']}" for s in skipped)
        raise MagicEduError(f"no images to caption in {' '.join(args.images)} (image files end in "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}){missing}")
    refs = read_references(args.references) if args.references else {}

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MagicEduError(f"--out {out}: cannot create its folder ({err})") from None
    lock = FileLock(str(out) + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise MagicEduError(f"another magic-edu caption is writing {out}; wait for it or choose another --out"
                            ) from None
    except OSError as err:
        raise MagicEduError(f"--out {out}: cannot create its lock file {out}.lock ({err})") from None
    try:
        return _caption_locked(args, decoder, out, found, skipped, refs)
    finally:
        lock.release()


def _caption_locked(args: argparse.Namespace, decoder: Decoder, out: Path, found: list[tuple[str, Path]],
                    skipped: list[dict[str, str]], refs: dict[str, list[str]]) -> int:
    from tqdm import tqdm

    skipped_path = out.with_name(out.stem + ".skipped.json")
    settings_path = out.with_name(out.stem + ".settings.json")
    stale = [p for path in (out, skipped_path, settings_path) for p in remove_stale_temporary_files(path)]
    if stale:
        print(f"removed {len(stale)} temporary file(s) a killed earlier run left: {', '.join(p.name for p in stale)}",
              file=sys.stderr)

    entries = read_previous_results(out)
    settings = caption_settings(args, decoder)
    check_settings(settings_path, settings, out, resuming=bool(entries))
    write_out(settings_path, settings, out)
    for entry in entries:
        entry["captions"] = refs.get(entry["image_name"], entry["captions"])
    written = len(entries)  # captions that are in the file
    done = {e["image_name"] for e in entries}
    todo = [(name, path) for name, path in found if name not in done]
    print(f"{len(found) - len(todo)} of {len(found)} images already in {out}; captioning {len(todo)}",
          file=sys.stderr)

    try:
        if todo:
            import magic_edu

            if decoder.retrieves:  # no LM needed: the preset's CLIP alone
                from ..presets import load_clip

                models = argparse.Namespace(lm=None, clip=load_clip(args.preset))
            else:
                models = magic_edu.load_models(args.preset)
            decode = make_decoder(args, models)
            with tqdm(total=len(todo), unit="img", desc=f"caption ({decoder.name})", file=sys.stderr) as bar:
                for start in range(0, len(todo), args.batch_size):
                    batch = todo[start:start + args.batch_size]
                    new, failed = caption_batch(batch, decode, refs)
                    entries += new
                    skipped += failed
                    write_out(out, entries, out)
                    written = len(entries)
                    if skipped:
                        write_out(skipped_path, skipped, out)
                    bar.update(len(batch))
        elif refs and entries:
            write_out(out, entries, out)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {written} captions are in {out}; run the same command again to continue",
              file=sys.stderr)
        return 130
    if skipped:
        write_out(skipped_path, skipped, out)
        print(f"skipped {len(skipped)} images (also listed in {skipped_path}):", file=sys.stderr)
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run; those images are captioned now
    print(f"{len(entries)} captions in {out}", file=sys.stderr)
    return 0


def write_out(path: Path, data: Any, out: Path) -> None:
    """write_json_atomic, with a failure to write (permissions, a full disk) a MagicEduError."""
    from ..trace import write_json_atomic

    try:
        write_json_atomic(path, data)
    except OSError as err:
        shown = "" if path == out else f" ({path.name})"
        raise MagicEduError(f"--out {out}: cannot write it{shown}: {err}") from None


def remove_stale_temporary_files(path: Path) -> list[Path]:
    """Remove the temporary files ``.<name>.<random>.tmp`` that write_json_atomic makes next to
    ``path`` (or next to the file a link ``path`` points to) and that a killed run left behind.
    Only call it while holding the lock of the run that writes ``path``."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    pattern = re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]+\.tmp")
    removed = []
    for name in glob.glob(glob.escape(f"{target.parent}/.{target.name}.") + "*.tmp"):
        stale = Path(name)
        if pattern.fullmatch(stale.name) and (stale.is_file() or stale.is_symlink()):
            try:
                stale.unlink()
            except FileNotFoundError:
                continue
            removed.append(stale)
    return removed


def caption_settings(args: argparse.Namespace, decoder: Decoder) -> dict[str, Any]:
    """What decides the captions: the preset, the decoder and each of its parameters (the value
    given; else the registry's default for a parameter a preset does not set; else null, the
    preset's value), max_new_tokens (null: the preset's) and the seed of a sampling decoder."""
    _, given = decoder_arguments(args)
    params: dict[str, Any] = {}
    if decoder.retrieves:  # the index decides the captions: a resume with another is refused
        params["index"] = str(Path(args.index).resolve())
    for p in decoder.params:
        if p.name == "seed":
            continue
        value = given.get(p.name)
        params[p.name] = value if value is not None else (None if p.from_preset else p.default)
    return {
        "format": SETTINGS_FORMAT, "version": 1, "preset": args.preset, "decoder": decoder.name, "params": params,
        MAX_NEW_TOKENS.name: given.get(MAX_NEW_TOKENS.name),
        "seed": (0 if args.seed is None else args.seed) if decoder.samples else None,
    }


def check_settings(path: Path, settings: dict[str, Any], out: Path, resuming: bool) -> None:
    """Refuse to resume ``out`` with settings other than those of its sidecar ``path``."""
    if not resuming or not path.exists():
        return  # a new run (any old sidecar is stale), or a result file from before the sidecar
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MagicEduError(f"--out {out}: its settings file {path} is not readable ({err}); "
                            "remove it to resume with these settings, or choose another --out") from None
    if not isinstance(before, dict) or before.get("format") != SETTINGS_FORMAT:
        raise MagicEduError(f"--out {out}: {path} is not a magic-edu caption settings file; "
                            "remove it to resume with these settings, or choose another --out")
    now = json.loads(json.dumps(settings))
    differ = []
    for key in ("preset", "decoder", MAX_NEW_TOKENS.name, "seed"):
        if before.get(key) != now[key]:
            differ.append(f"{key} {_shown(before.get(key), key)} before, {_shown(now[key], key)} now")
    if before.get("decoder") == now["decoder"]:
        old = before.get("params") if isinstance(before.get("params"), dict) else {}
        decoder = get_decoder(now["decoder"])
        for name in sorted(set(old) | set(now["params"])):
            # a parameter the old file lacks was added to the decoder since: it decoded with the default
            was = old[name] if name in old or name not in decoder.param_names else decoder.param(name).default
            if was != now["params"].get(name):
                differ.append(f"{name} {_shown(was)} before, {_shown(now['params'].get(name))} now")
    if differ:
        raise MagicEduError(f"--out {out} was captioned with other settings ({'; '.join(differ)}; see {path}); "
                            "resume with the same settings, or choose a new --out for these")


def _shown(value: Any, key: str = "") -> str:
    if value is None:
        return "none" if key in ("seed", "preset", "decoder") else "(the preset's)"
    return json.dumps(value)


def read_previous_results(out: Path) -> list[dict[str, Any]]:
    """The entries of an earlier run in ``out`` (none if it does not exist or is empty);
    anything that is not a result file is an error, so it is never overwritten."""
    from .evaluation import load_results

    if out.is_dir():
        raise MagicEduError(f"--out {out} is a folder; give a file name such as {out / 'results.json'}")
    if not out.exists() or out.read_text(encoding="utf-8", errors="replace").strip() in ("", "[]"):
        return []
    try:
        return load_results(out, require_references=False)
    except MagicEduError as err:
        raise MagicEduError(f"--out {out} exists but is not a result file, so it is left alone: {err}") from None


def caption_batch(
    batch: list[tuple[str, Path]], decode: Callable[[list, list[str]], list[str]], refs: dict[str, list[str]],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Read and caption one batch: (result entries, skipped entries with the reason)."""
    from ..inputs import load_image

    names, paths, images, skipped = [], [], [], []
    for name, path in batch:
        try:
            images.append(load_image(path))
        except (MagicEduError, OSError, ValueError) as err:
            skipped.append({"image_name": name, "path": str(path), "reason": str(err)})
            continue
        names.append(name)
        paths.append(path)
    entries = []
    for name, path, text in zip(names, paths, decode(images, names) if images else []):
        if text.strip():
            entries.append({"image_name": name, "captions": refs.get(name, []), "prediction": text})
        else:
            skipped.append({"image_name": name, "path": str(path), "reason": "the decoder produced an empty caption"})
    return entries, skipped


def collect_images(arguments: Sequence[str]) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """(image_name, path) for every image file given or inside a given folder (sorted, not
    recursive, by suffix), and the arguments that do not exist as skipped entries.
    ``image_name`` is the file name; two files of the same name are an error."""
    found: list[tuple[str, Path]] = []
    skipped: list[dict[str, str]] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            found += [(p.name, p) for p in sorted(path.iterdir())
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        elif path.is_file():
            found.append((path.name, path))
        else:
            skipped.append({"image_name": path.name, "path": str(path), "reason": "no such file or folder"})
    unique: dict[str, Path] = {}
    for name, path in found:
        if name in unique and unique[name].resolve() != path.resolve():
            raise MagicEduError(f"two images are named {name!r} ({unique[name]} and {path}); "
                                "image_name must identify one image, so caption them into separate files")
        unique.setdefault(name, path)
    return list(unique.items()), skipped


def read_references(path: str) -> dict[str, list[str]]:
    """image_name -> reference captions, from {"name": ["ref", ...] or "ref"}, a result-format list, or the
    paper's test files (a list of {"image_name", "captions", ...}: mscoco_test.json, flickr30k_test.json)."""
    from .evaluation import load_results

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MagicEduError(f"--references {path}: cannot read it as JSON ({err})") from None
    if isinstance(data, list):  # a result file, or the paper's test file (image_name and captions, no prediction)
        entries = [dict(e, prediction=e.get("prediction") or "-") if isinstance(e, dict) else e for e in data]
        return {e["image_name"]: e["captions"] for e in load_results(entries, require_references=False)}
    if not isinstance(data, dict):
        raise MagicEduError(f"--references {path}: expected an object image_name -> [captions] or a list")
    refs = {}
    for name, value in data.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise MagicEduError(f"--references {path}: {name!r} must map to a list of non-empty strings")
        refs[name] = value
    return refs


def decoder_choices() -> list[str]:
    """What ``--decoder`` accepts: every registry decoder's name and aliases."""
    return [*DECODERS, *(alias for d in DECODERS.values() for alias in d.aliases)]


def decoder_params() -> dict[str, Param]:
    """Every parameter name of the registry's decoders: one option each. Its description: the first
    one that takes the preset's value (the shared meaning, e.g. k as candidates), else the first."""
    params: dict[str, Param] = {}
    for decoder in DECODERS.values():
        for param in decoder.params:
            if param.name not in params or (param.from_preset and not params[param.name].from_preset):
                params[param.name] = param
    return params


def option(name: str) -> str:
    """A parameter's command-line option: clip_text_max_len -> --clip-text-max-len."""
    return "--" + name.replace("_", "-")


def _param_help(name: str, param: Param) -> str:
    if name == "seed":
        return ("sampling decoders: image NAME gets seed + crc32(NAME), so reruns and batch sizes agree "
                "(default 0)")
    defaults = []
    for d in DECODERS.values():
        if name in d.param_names:
            q = d.param(name)
            defaults.append(f"{d.name}: " + ("the preset's, else " if q.from_preset else "") + f"{q.default}")
    return f"{param.help} (default {'; '.join(defaults)})"


def decoder_arguments(args: argparse.Namespace) -> tuple[Decoder, dict[str, Any]]:
    """The decoder ``--decoder`` names and the keyword arguments the command line gives it: the
    parameters given, and nothing for those not given (the preset's setting or the registry's
    default then applies). A parameter the decoder does not take, or a value out of its range,
    is a :class:`MagicEduError` naming the option. A sampling decoder's seed is left out: each
    image gets its own (:func:`image_seed`)."""
    decoder = get_decoder(args.decoder)
    given = {name: getattr(args, name, None) for name in decoder_params()}
    unknown = [name for name, value in given.items() if value is not None and name not in decoder.param_names]
    if unknown:
        takes = ", ".join(option(n) for n in decoder.param_names) or "none of the decoder options"
        raise MagicEduError(f"{option(unknown[0])}: --decoder {decoder.name} ({decoder.label}) does not take it; "
                            f"it takes {takes}")
    decoder.settings(given)  # every value in its range
    index = getattr(args, "index", None)
    if decoder.retrieves and index is None:
        raise MagicEduError(f"--index: --decoder {decoder.name} ({decoder.label}) needs an index of captions; build "
                            "one with: magic-edu index-text CAPTIONS.txt -o index.safetensors --preset "
                            f"{getattr(args, 'preset', 'toy')}")
    if index is not None and not decoder.retrieves:
        raise MagicEduError(f"--index: only --decoder clip_retrieval takes it, not --decoder {decoder.name}")
    if decoder.retrieves and getattr(args, MAX_NEW_TOKENS.name, None) is not None:
        raise MagicEduError(f"{option(MAX_NEW_TOKENS.name)}: --decoder {decoder.name} writes no tokens; "
                            "it picks whole captions")
    kwargs = {name: value for name, value in given.items() if value is not None}
    if decoder.samples:
        kwargs.pop("seed", None)
    length = getattr(args, MAX_NEW_TOKENS.name, None)
    if length is not None:
        kwargs[MAX_NEW_TOKENS.name] = MAX_NEW_TOKENS.check(length)
    return decoder, kwargs


def make_decoder(args: argparse.Namespace, models: Any) -> Callable[[list, list[str]], list[str]]:
    """A function (images, image names) -> captions for ``args.decoder``, which runs the registry's
    ``function`` of that decoder (from :mod:`magic_edu`) without recording a trace.

    A sampling decoder decodes image by image, with the seed :func:`image_seed` of the image's
    name (so the batch size changes no caption). A decoder that needs the image decodes each
    batch as one. The others do not look at the image: one caption, computed once, fits all.
    """
    import magic_edu

    decoder, kwargs = decoder_arguments(args)
    if decoder.retrieves:  # CLIPRe: the index's best caption of each image, a batch at a time
        from ..retrieval import as_index, clip_retrieval

        index, clip = as_index(args.index, "text", "--index"), models.clip
        index.check_clip(clip, "--index")

        def decode(images: list, names: list[str]) -> list[str]:
            return [hit.text for hit in clip_retrieval(clip, list(images), index)]
        return decode
    fn = getattr(magic_edu, decoder.function)
    kwargs["record"] = False  # no trace needed here; saves time
    lm, clip = models.lm, (models.clip if decoder.needs_image else None)

    if decoder.samples:
        seed = 0 if args.seed is None else args.seed
        image_args = (lambda image: (clip, image)) if decoder.needs_image else (lambda image: ())

        def decode(images: list, names: list[str]) -> list[str]:
            return [fn(lm, *image_args(image), seed=image_seed(seed, name), **kwargs).text
                    for image, name in zip(images, names)]
        return decode

    if decoder.needs_image:
        def decode(images: list, names: list[str]) -> list[str]:
            out = fn(lm, clip, list(images), **kwargs)
            return [g.text for g in (out if isinstance(out, (list, tuple)) else [out])]
        return decode

    cache: list[str] = []

    def decode(images: list, names: list[str]) -> list[str]:
        if not cache:
            cache.append(fn(lm, **kwargs).text)
        return cache * len(names)
    return decode


def image_seed(seed: int, name: str) -> int:
    """A per-image seed that does not depend on batching or on what ran before."""
    return (seed + zlib.crc32(name.encode("utf-8"))) % 2**32


# -- toy -----------------------------------------------------------------------------------
def add_toy_command(subparsers: Any) -> None:
    """``magic-edu toy``: train the toy world's models, or print their results table."""
    from ..toyworld.train import add_toy_command as add

    add(subparsers)


# -- export --------------------------------------------------------------------------------
def add_export_command(subparsers: Any) -> None:
    """``magic-edu export``: a saved trace as one self-contained HTML page."""
    p = subparsers.add_parser(
        "export", help="write a saved trace as one self-contained HTML page",
        description="Write a trace file (Trace.save) as one HTML page that steps through the decode in any "
                    "browser: no kernel, no network (script, styles, data and image inline).")
    p.add_argument("trace", metavar="TRACE.json", help="the trace file")
    p.add_argument("-o", "--out", required=True, metavar="decode.html", help="the HTML file to write")
    p.add_argument("--image", help="the decode's image, embedded (downscaled to at most 256 pixels a side)")
    p.add_argument("--title", help="the page's heading (default: the decoder's name)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..inputs import load_image
    from ..trace import Trace
    from ..views.export import export_html

    trace = Trace.load(args.trace)
    image = load_image(args.image, name=f"--image {args.image}") if args.image else None
    out = Path(args.out)
    try:
        export_html(trace, out, image=image, title=args.title)
    except OSError as err:
        raise MagicEduError(f"--out {out}: cannot write it ({err})") from None
    print(f"wrote {out}: {len(trace.steps)} steps, {out.stat().st_size:,} bytes")
    return 0


# -- indexes and stories -----------------------------------------------------------------------
def add_index_text_command(subparsers: Any) -> None:
    """``magic-edu index-text``: the CLIP text embeddings of a caption pool (CLIPRe's index)."""
    p = subparsers.add_parser(
        "index-text", help="build an index of captions for CLIP retrieval (--decoder clip_retrieval)",
        description="Embed a caption pool with the preset's CLIP into one safetensors file (float16 embeddings "
                    "plus the captions): the index `magic-edu caption --decoder clip_retrieval --index` retrieves "
                    "from (the paper's CLIPRe baseline).")
    p.add_argument("captions", help="the captions: a .txt file (one a line) or a .json file in the paper's format")
    _add_index_options(p, "INDEX.safetensors", "captions", 256)
    p.set_defaults(func=run_index_text)


def _add_index_options(p: argparse.ArgumentParser, metavar: str, items: str, batch_size: int) -> None:
    """The options both index commands take: the file to write, whose CLIP, how many per forward."""
    p.add_argument("-o", "--out", required=True, metavar=metavar, help="the index file to write")
    p.add_argument("--preset", default="toy", help="whose CLIP embeds them (default: toy); a folder works too")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"{items} per CLIP forward (default {batch_size})")


def run_index_text(args: argparse.Namespace) -> int:
    from ..inputs import read_texts
    from ..presets import load_clip
    from ..retrieval import build_text_index

    texts = read_texts(args.captions, "captions")  # a bad file fails before CLIP loads
    index = build_text_index(load_clip(args.preset), texts, args.out, batch_size=args.batch_size)
    print(f"wrote {args.out}: {len(index):,} captions, {index.dim}-dimensional CLIP embeddings ({index.clip_name})")
    return 0


def add_index_images_command(subparsers: Any) -> None:
    """``magic-edu index-images``: the CLIP image embeddings of a folder of images (for stories)."""
    p = subparsers.add_parser(
        "index-images", help="build an index of images (a story's title retrieves its image from it)",
        description="Embed every image under FOLDER with the preset's CLIP into one safetensors file (float16 "
                    "embeddings plus the images' paths): the index `magic-edu story TITLE --index` retrieves "
                    "the story's image from (the paper's story setup). Unreadable images are skipped.")
    p.add_argument("folder", help="the folder of images (searched recursively)")
    _add_index_options(p, "IMAGES.safetensors", "images", 64)
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="only FOLDER's own files")
    p.set_defaults(func=run_index_images)


def run_index_images(args: argparse.Namespace) -> int:
    from ..presets import load_clip
    from ..retrieval import build_image_index, image_files

    if not image_files(args.folder, args.recursive):  # a bad folder fails before CLIP loads
        raise MagicEduError(f"{args.folder}: no image files in it (image files end in "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    index = build_image_index(load_clip(args.preset), args.folder, args.out, batch_size=args.batch_size,
                              recursive=args.recursive)
    for path, reason in index.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {args.out}: {len(index):,} images, {index.dim}-dimensional CLIP embeddings ({index.clip_name})"
          + (f"; {len(index.skipped)} unreadable skipped" if index.skipped else ""))
    return 0


def add_story_command(subparsers: Any) -> None:
    """``magic-edu story``: a story from a title, steered by an image the title retrieves (or one given)."""
    p = subparsers.add_parser(
        "story", help="write a story from a title, steered by the image the title retrieves from an index",
        description="MAGIC's visually grounded story: the story LM writes from TITLE; the image that steers it is "
                    "the one of --index (magic-edu index-images) CLIP finds closest to the title, as in the paper, "
                    "or --image.")
    p.add_argument("title", help="the story's title")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", metavar="IMAGES.safetensors", help="an image index to retrieve the image from")
    source.add_argument("--image", help="steer with this image instead")
    p.add_argument("--preset", default="toy-story", help="a story preset (default: toy-story; the paper's: story)")
    for name in ("k", "alpha", "beta"):
        param = DECODERS["magic"].param(name)
        p.add_argument(option(name), dest=name, type=param.kind, default=None, metavar=name.upper(),
                       help=f"{param.help} (default: the preset's)")
    p.add_argument(option(MAX_NEW_TOKENS.name), dest=MAX_NEW_TOKENS.name, type=int, default=None, metavar="N",
                   help="tokens to generate at most (default: the preset's)")
    p.set_defaults(func=run_story)


def run_story(args: argparse.Namespace) -> int:
    import magic_edu

    from ..stories import tell_story

    models = magic_edu.load_models(args.preset)
    story = tell_story(models, args.title, args.image, index=args.index, k=args.k, alpha=args.alpha, beta=args.beta,
                       max_new_tokens=args.max_new_tokens, record=False)
    if story.retrieved is not None:
        print(f"image: {story.image_path} (cosine {story.retrieved.scores[0]:.3f} with the title)")
    print(f"{args.title}: {story.text}")
    return 0


# -- the parser ----------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[Any], None]] = [add_evaluate_command, add_caption_command, add_bench_command,
                                            add_toy_command, add_export_command, add_sweep_command,
                                            add_adapt_lm_command, add_index_text_command, add_index_images_command,
                                            add_story_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magic-edu", description="MAGIC teaching toolkit (Su et al. 2022)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``magic-edu`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MagicEduError as err:
        print(f"magic-edu {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
