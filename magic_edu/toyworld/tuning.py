"""Tuning MAGIC's k, alpha and beta for the toy models, with the library's own ``magic_search``
on validation scenes (tuning seeds, never those of the results table), for captions and for
stories. The result is ``defaults.json``, the ``toy`` preset's settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..presets import PAPER_PAD, PAPER_SOS
from . import shapes
from .config import STORY_PROMPT, TUNE_SEED, TrainConfig


def untuned_defaults() -> dict:
    """The settings written when nothing is tuned (the miniature run)."""
    return {"k": 8, "alpha": 0.1, "beta": 1.0, "max_new_tokens": 32,
            "story": {"k": 8, "alpha": 0.1, "beta": 1.0, "max_new_tokens": 64, "prompt": STORY_PROMPT}}


def fluent_caption(text: str, n_objects: int) -> bool:
    """A sentence the caption templates could produce; for one object also no repeated
    bigram (with several, the templates themselves repeat "a small" or "and a")."""
    return shapes.is_template_caption(text) and (n_objects > 1 or not shapes.has_repeated_bigram(text))


def story_grounded(text: str, objects: list[shapes.ShapeObject]) -> bool:
    """A story names some object of the scene right and names nothing that is not there."""
    named = shapes.named_pairs(text)
    truth = {(o.colour, o.shape) for o in objects}
    return bool(named) and set(named) <= truth


def tune_defaults(out: Path, cfg: TrainConfig) -> dict:
    """Grid-search k, alpha, beta of MAGIC on validation scenes (tuning seeds, not those of
    the results table). Captions: maximise single-object grounding + half the multi-object
    all-right share among settings with at least 90% fluent captions (:func:`fluent_caption`).
    Stories (prompt :data:`~magic_edu.toyworld.config.STORY_PROMPT`): maximise the share naming
    only shapes that are there (:func:`story_grounded`) + the share the story grammar could have
    written about the scene. Returns the settings, with every grid point's scores under ``tuning``."""
    from .. import ImageTextMatcher, LanguageModel, magic_search
    from ..models import STORY_PROMPT_FORMAT

    lm = LanguageModel.from_pretrained(str(out / "lm"), sos_token=PAPER_SOS, pad_token=PAPER_PAD)
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{(out / 'clip').resolve()}")
    n = cfg.tune_scenes
    singles = [shapes.make_scene(TUNE_SEED + i, n_objects=1, n_captions=1) for i in range(n)]
    multis = [shapes.make_scene(TUNE_SEED + 50_000 + i, n_objects=2 + i % 2, n_captions=1) for i in range(n)]
    results = []
    grid = [(k, a, b) for k in (8, 10, 12) for a in (0.1, 0.2) for b in (0.25, 0.5, 1.0)]
    for k, a, b in tqdm(grid, desc="tune MAGIC (captions)"):
        gens = magic_search(lm, clip, [s.image for s in singles + multis], k=k, alpha=a, beta=b,
                            max_new_tokens=32, record=False)
        texts = [g.text for g in gens]
        single = np.mean([shapes.grounding(t, s.objects).any_right for t, s in zip(texts[:n], singles, strict=True)])
        multi = np.mean([shapes.grounding(t, s.objects).all_right for t, s in zip(texts[n:], multis, strict=True)])
        fluent = np.mean([fluent_caption(t, 1) for t in texts[:n]] + [fluent_caption(t, 2) for t in texts[n:]])
        results.append({"k": k, "alpha": a, "beta": b, "single": float(single), "multi_all": float(multi),
                        "fluent": float(fluent)})
    ok = [r for r in results if r["fluent"] >= 0.9] or results
    best = max(ok, key=lambda r: (r["single"] + 0.5 * r["multi_all"], -r["k"]))
    tqdm.write(f"  best caption settings: {best}")

    story_lm = LanguageModel.from_pretrained(str(out / "lm"), pad_token=PAPER_PAD, prompt_format=STORY_PROMPT_FORMAT,
                                             max_sentences=5)
    story_scenes = [shapes.make_scene(TUNE_SEED + 80_000 + i, n_captions=1) for i in range(20)]
    story_results = []
    story_grid = [(k, a, b) for k in (5, 8, 12) for a in (0.1, 0.3) for b in (0.5, 1.0, 2.0)]
    for k, a, b in tqdm(story_grid, desc="tune MAGIC (stories)"):
        gens = magic_search(story_lm, clip, [s.image for s in story_scenes], k=k, alpha=a, beta=b,
                            prompt=STORY_PROMPT, max_new_tokens=64, record=False)
        pairs = list(zip(gens, story_scenes, strict=True))
        grounded = np.mean([story_grounded(g.text, s.objects) for g, s in pairs])
        consistent = np.mean([shapes.text_consistent(g.text, s.objects, "story") for g, s in pairs])
        story_results.append({"k": k, "alpha": a, "beta": b, "grounded": float(grounded),
                              "consistent": float(consistent)})
    best_story = max(story_results, key=lambda r: (r["grounded"] + r["consistent"], -r["k"]))
    tqdm.write(f"  best story settings: {best_story}")
    return {
        "k": best["k"], "alpha": best["alpha"], "beta": best["beta"], "max_new_tokens": 32,
        "story": {"k": best_story["k"], "alpha": best_story["alpha"], "beta": best_story["beta"],
                  "max_new_tokens": 64, "prompt": STORY_PROMPT},
        "tuning": {"captions": results, "stories": story_results},
    }
