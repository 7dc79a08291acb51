"""Train ShapesWorld's two models the paper's way, from scratch, on a CPU: ``magic-edu toy``.

    magic-edu toy --out data/toy           # everything, about 8 min on 2 cores, the same models every time
    magic-edu toy --out /tmp/toy --quick   # a miniature, under a minute
    magic-edu toy --report                 # the README's results table for the models in data/toy

(``python -m magic_edu.toyworld.train`` takes the same arguments.)

It writes
* ``lm/``       a GPT-2 trained on captions and stories only (never an image) with the SimCTG
                objective (:mod:`~magic_edu.toyworld.lm_training`);
* ``lm-mle/``   its twin trained with plain MLE;
* ``clip/``     an open_clip CLIP as a ``local-dir:`` folder (:mod:`~magic_edu.toyworld.clip_training`,
                its data from :mod:`~magic_edu.toyworld.clip_data`);
* ``defaults.json`` the decoding settings tuned on validation scenes (:mod:`~magic_edu.toyworld.tuning`);
* ``training_summary.json`` the settings, timings and CLIP's zero-shot accuracies.

The two LMs train in a second process while CLIP trains (one core each). Then k, alpha and
beta are tuned with the library's own ``magic_search``. ``--report`` prints the results table
of :mod:`~magic_edu.toyworld.report`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..errors import MagicEduError
from ..presets import data_dir
from ..trace import write_json_atomic
from . import shapes
from .clip_training import train_clip
from .config import QUICK, TrainConfig
from .lm_training import lm_corpus, train_lms
from .report import load_toy, magic_milliseconds, results_table, story_examples
from .tuning import tune_defaults, untuned_defaults


def _lm_process(out: str, cfg: TrainConfig, queue) -> None:
    torch.set_num_threads(1)
    queue.put(train_lms(Path(out), cfg))


def write_defaults(out: Path, defaults: dict) -> dict | None:
    """Write ``defaults.json`` (the settings without their ``tuning`` scores); return those scores."""
    tuning = defaults.pop("tuning", None)
    write_json_atomic(out / "defaults.json", defaults, indent=2, newline=True)  # the committed format
    return tuning


def train_toy_world(out: Path, cfg: TrainConfig) -> dict:
    """Train everything into ``out``; returns a summary (sizes, timings, accuracies).
    With two or more threads the LMs train in a second process while CLIP trains (small
    models use one core each better than two cores in turn)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"config": asdict(cfg)}
    captions, stories = lm_corpus(cfg)
    vocab = sorted({w for t in captions + [t + " " + s for t, s in stories] for w in shapes.words_of(t)})

    if cfg.threads >= 2:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        lm_proc = ctx.Process(target=_lm_process, args=(str(out), cfg, queue))
        lm_proc.start()
        torch.set_num_threads(cfg.threads - 1)
    else:
        torch.set_num_threads(cfg.threads)
        summary["lm_seconds"] = round(train_lms(out, cfg), 1)

    t1 = time.time()
    _, acc = train_clip(cfg, out / "clip", vocab)
    summary["clip_seconds"] = round(time.time() - t1, 1)
    summary["clip_zero_shot"] = acc
    if cfg.threads >= 2:
        lm_proc.join()
        if lm_proc.exitcode != 0:
            raise RuntimeError(f"training the language models failed (exit code {lm_proc.exitcode})")
        summary["lm_seconds"] = round(queue.get(timeout=60), 1)
        torch.set_num_threads(cfg.threads)

    if cfg.tune_scenes:
        t2 = time.time()
        defaults = tune_defaults(out, cfg)
        summary["tune_seconds"] = round(time.time() - t2, 1)
    else:
        defaults = untuned_defaults()
    tuning = write_defaults(out, defaults)
    summary["defaults"] = defaults
    summary["total_seconds"] = round(time.time() - t0, 1)
    summary["megabytes"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6, 2)
    write_json_atomic(out / "training_summary.json", {**summary, "tuning": tuning}, indent=2, newline=True)
    return summary


# -----------------------------------------------------------------------------
# the command line: magic-edu toy, python -m magic_edu.toyworld.train


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="the toy folder to train into (required: retraining replaces its models); "
                        "--report reads the bundled one unless given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a miniature run (tests): under a minute, poor models")
    p.add_argument("--report", action="store_true",
                   help="do not train: print the results table of the models in --out (markdown)")
    p.add_argument("--scenes", type=int, default=200, help="--report: held-out scenes of each kind (default 200)")
    p.add_argument("--stories-dir", type=Path, default=None,
                   help="--report: also save the story scenes' images in this folder and link them")
    p.add_argument("--tune-only", action="store_true",
                   help="do not train: redo the tuning of defaults.json for the models in --out")


def run(args: argparse.Namespace) -> int:
    """Train (default), ``--report`` or ``--tune-only``, as parsed by :func:`_add_arguments`."""
    if args.out is None and not args.report:
        raise MagicEduError("--out: give the folder to train into (e.g. --out my_toy); it is required because "
                            "training replaces the models there, and the bundled ones live in data/toy")
    out = Path(args.out) if args.out is not None else data_dir() / "toy"
    if args.report:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the report is markdown meant for pasting: no loading bars in it
        torch.set_num_threads(args.threads)
        table, _ = results_table(out, args.scenes)
        print(table)
        lm, _, clip, defaults = load_toy(out)
        print(f"A toy MAGIC caption takes {magic_milliseconds(lm, clip, defaults):.1f} ms on this machine "
              f"({args.threads} thread{'s' if args.threads > 1 else ''}, one image at a time).\n")
        print(story_examples(out, image_dir=args.stories_dir))
        return 0
    if args.tune_only:
        torch.set_num_threads(args.threads)
        defaults = tune_defaults(out, replace(TrainConfig(), seed=args.seed, threads=args.threads))
        write_defaults(out, defaults)
        print(json.dumps(defaults, indent=2))
        return 0
    cfg = replace(QUICK if args.quick else TrainConfig(), seed=args.seed, threads=args.threads)
    summary = train_toy_world(out, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


def add_toy_command(subparsers) -> None:
    """``magic-edu toy --out DIR [--quick | --tune-only]`` or ``magic-edu toy --report [--out DIR]``."""
    p = subparsers.add_parser(
        "toy", help="train the offline toy world's models, or print its results table (--report)",
        description="Train ShapesWorld's LM (SimCTG + MLE twin) and CLIP from scratch into --out, "
                    "or with --report print the results table of the models there.")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train ShapesWorld's LM (SimCTG + MLE twin) and CLIP from scratch.")
    _add_arguments(p)
    try:
        raise SystemExit(run(p.parse_args(argv)))
    except MagicEduError as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
