"""The ``magic-edu`` command line.

    magic-edu evaluate RESULTS.json [--json] [--spice] [--images DIR [--preset NAME]]
    magic-edu caption IMAGES... --out results.json [--preset toy] [--decoder magic] [--batch-size 8]
    magic-edu bench [--models toy|paper-size|all]
    magic-edu toy [--report | --tune-only | --quick] [--out data/toy]

Each subcommand is one ``add_*_command(subparsers)`` function listed in :data:`SUBCOMMANDS`;
a new one (``bench``, ...) is added by writing such a function and appending it there.
The function sets ``func``: called with the parsed arguments, it returns the exit status.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

from .bench import add_bench_command
from ..errors import MagicEduError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DECODERS = ("magic", "greedy", "contrastive", "top-k", "nucleus")


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
    from .evaluation import evaluate, table_to_dict

    clip = _load_models(args.preset).clip if args.images else None
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
                    "are skipped with the reason, printed and listed in <out stem>.skipped.json.")
    p.add_argument("images", nargs="+", help="image files and/or folders (their image files, not recursive)")
    p.add_argument("--out", required=True, help="the result file to write (and resume from)")
    p.add_argument("--preset", default="toy", help="model preset for magic_edu.load_models (default: toy)")
    p.add_argument("--decoder", choices=DECODERS, default="magic")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--k", type=int, help="candidates per step (default: the preset's; top-k: the decoder's)")
    p.add_argument("--alpha", type=float, help="degeneration penalty weight (default: the preset's)")
    p.add_argument("--beta", type=float, help="magic score weight (default: the preset's)")
    p.add_argument("--max-new-tokens", type=int, help="(default: the preset's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling's p (default: the decoder's)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling decoders: image NAME gets seed + crc32(NAME), so reruns agree")
    p.add_argument("--references", metavar="REFS.json",
                   help='reference captions: {"image_name": ["ref", ...]} or a result-format list')
    p.set_defaults(func=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..trace import write_json_atomic

    if args.batch_size < 1:
        raise MagicEduError(f"--batch-size must be at least 1; got {args.batch_size}")
    out = Path(args.out)
    skipped_path = out.with_name(out.stem + ".skipped.json")
    found, skipped = collect_images(args.images)
    refs = read_references(args.references) if args.references else {}

    entries = read_previous_results(out)
    for entry in entries:
        entry["captions"] = refs.get(entry["image_name"], entry["captions"])
    done = {e["image_name"] for e in entries}
    todo = [(name, path) for name, path in found if name not in done]
    print(f"{len(found) - len(todo)} of {len(found)} images already in {out}; captioning {len(todo)}",
          file=sys.stderr)

    try:
        if todo:
            models = _load_models(args.preset)
            decode = make_decoder(args, models)
            with tqdm(total=len(todo), unit="img", desc=f"caption ({args.decoder})", file=sys.stderr) as bar:
                for start in range(0, len(todo), args.batch_size):
                    batch = todo[start:start + args.batch_size]
                    new, failed = caption_batch(batch, decode, refs)
                    entries += new
                    skipped += failed
                    write_json_atomic(out, entries)
                    if skipped:
                        write_json_atomic(skipped_path, skipped)
                    bar.update(len(batch))
        elif refs and entries:
            write_json_atomic(out, entries)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(entries)} captions are in {out}; run the same command again to continue",
              file=sys.stderr)
        return 130
    if skipped:
        write_json_atomic(skipped_path, skipped)
        print(f"skipped {len(skipped)} images (also listed in {skipped_path}):", file=sys.stderr)
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run; those images are captioned now
    print(f"{len(entries)} captions in {out}", file=sys.stderr)
    return 0


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
    """image_name -> reference captions, from {"name": ["ref", ...] or "ref"} or a result-format list."""
    from .evaluation import load_results

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MagicEduError(f"--references {path}: cannot read it as JSON ({err})") from None
    if isinstance(data, list):
        return {e["image_name"]: e["captions"] for e in load_results(data, require_references=False)}
    if not isinstance(data, dict):
        raise MagicEduError(f"--references {path}: expected an object image_name -> [captions] or a list")
    refs = {}
    for name, value in data.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise MagicEduError(f"--references {path}: {name!r} must map to a list of non-empty strings")
        refs[name] = value
    return refs


def make_decoder(args: argparse.Namespace, models: Any) -> Callable[[list, list[str]], list[str]]:
    """A function (images, image names) -> captions for ``args.decoder``.

    MAGIC decodes the images as one batch. The other decoders do not look at the image:
    greedy and contrastive search give one caption for all (computed once), the samplers
    one per image from the seed ``args.seed + crc32(name)``.
    """
    import magic_edu

    defaults = dict(getattr(models, "defaults", {}) or {})

    def setting(key: str) -> Any:
        value = getattr(args, key)
        return defaults.get(key) if value is None else value

    def kwargs(fn: Callable, **kw: Any) -> dict[str, Any]:
        kw = {k: v for k, v in kw.items() if v is not None}
        if "record" in inspect.signature(fn).parameters:
            kw["record"] = False  # no trace needed here; saves time
        return kw

    lm, length = models.lm, setting("max_new_tokens")
    if args.decoder == "magic":
        fn = magic_edu.magic_search
        kw = kwargs(fn, k=setting("k"), alpha=setting("alpha"), beta=setting("beta"), max_new_tokens=length)

        def decode(images: list, names: list[str]) -> list[str]:
            out = fn(lm, models.clip, list(images), **kw)
            return [g.text for g in (out if isinstance(out, (list, tuple)) else [out])]
        return decode

    if args.decoder in ("greedy", "contrastive"):
        if args.decoder == "greedy":
            fn, kw = magic_edu.greedy_search, {"max_new_tokens": length}
        else:
            fn, kw = magic_edu.contrastive_search, {"k": setting("k"), "alpha": setting("alpha"),
                                                   "max_new_tokens": length}
        cache: list[str] = []

        def decode(images: list, names: list[str]) -> list[str]:
            if not cache:
                cache.append(fn(lm, **kwargs(fn, **kw)).text)
            return cache * len(names)
        return decode

    if args.decoder == "top-k":
        fn, kw = magic_edu.top_k_sampling, {"k": args.k, "max_new_tokens": length}
    else:
        fn, kw = magic_edu.nucleus_sampling, {"p": args.top_p, "max_new_tokens": length}

    def decode(images: list, names: list[str]) -> list[str]:
        return [fn(lm, seed=image_seed(args.seed, n), **kwargs(fn, **kw)).text for n in names]
    return decode


def image_seed(seed: int, name: str) -> int:
    """A per-image seed that does not depend on batching or on what ran before."""
    return (seed + zlib.crc32(name.encode("utf-8"))) % 2**32


def _load_models(preset: str) -> Any:
    import magic_edu

    load = getattr(magic_edu, "load_models", None)
    if load is None:
        raise MagicEduError("magic_edu.load_models is not available in this version")
    return load(preset)


# -- toy -----------------------------------------------------------------------------------
def add_toy_command(subparsers: Any) -> None:
    """``magic-edu toy``: train the toy world's models, or print their results table."""
    from ..toyworld.training import add_toy_command as add

    add(subparsers)


# -- the parser ----------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[Any], None]] = [add_evaluate_command, add_caption_command, add_bench_command,
                                            add_toy_command]


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
