"""The toy world's results table (the README's): which decoders name what is in the image?

Every decoder of :data:`magic_edu.registry.DECODERS` captions held-out scenes (seeds from
:data:`~magic_edu.toyworld.shapes.HELD_OUT_SEED`, never seen in training), plus the paper's
CLIP retrieval baseline; captions are scored for grounding and fluency. ZeroCap, a second or
more per toy caption, captions the first :data:`ZEROCAP_SCENES` scenes of each set, one at a
time, and MAGIC the same scenes one at a time beside it: the two times give MAGIC's speed-up.
Also: the time of one toy MAGIC caption, and a few MAGIC stories. ``magic-edu toy --report``
prints all of it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import decoding
from ..presets import PAPER_PAD, PAPER_SOS
from ..registry import DECODERS, Decoder
from ..retrieval import build_text_index
from . import shapes
from .config import STORY_PROMPT
from .tuning import fluent_caption

# The decoders' settings in the table beyond those of defaults.json (which contrastive search and
# MAGIC take their k, alpha and beta from): the paper's baselines' for the samplers. A sampler's
# seed is the scene's index.
BASELINE_SETTINGS = {"top_k": {"k": 40}, "nucleus": {"p": 0.95}}
MAGIC_BATCH = 50  # images MAGIC decodes at once
ZEROCAP_SCENES = 50  # of each set, captioned by ZeroCap (and timed against MAGIC)


def table_decoders() -> list[Decoder]:
    """The registry's decoders, in its order (the table shows them all)."""
    return list(DECODERS.values())


def load_toy(out: Path):
    """(caption LM, story LM, CLIP, defaults) of a trained toy folder, through the library's
    own loaders (the same path as any checkpoint)."""
    from .. import ImageTextMatcher, LanguageModel
    from ..models import STORY_PROMPT_FORMAT

    lm = LanguageModel.from_pretrained(str(out / "lm"), sos_token=PAPER_SOS, pad_token=PAPER_PAD)
    story_dir = out / "lm-story" if (out / "lm-story").is_dir() else out / "lm"
    story_lm = LanguageModel.from_pretrained(str(story_dir), pad_token=PAPER_PAD, prompt_format=STORY_PROMPT_FORMAT,
                                             max_sentences=5)
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{out.resolve() / 'clip'}")
    defaults = json.loads((out / "defaults.json").read_text())
    return lm, story_lm, clip, defaults


def held_out_scenes(n: int, multi: bool) -> list[shapes.Scene]:
    """Scenes from held-out seeds, never used in training: single-object, or 2 and 3 objects alternately."""
    if multi:
        return [shapes.make_scene(shapes.HELD_OUT_SEED + 100_000 + i, n_objects=2 + i % 2, n_captions=1)
                for i in range(n)]
    return [shapes.make_scene(shapes.HELD_OUT_SEED + i, n_objects=1, n_captions=1) for i in range(n)]


def decoder_settings(decoder: Decoder, defaults: dict) -> dict:
    """Every parameter of ``decoder`` as the table uses it: :data:`BASELINE_SETTINGS`, then
    defaults.json where the registry says a preset applies, then the registry's defaults."""
    settings, _ = decoder.settings(BASELINE_SETTINGS.get(decoder.name, {}), preset=defaults)
    return settings


def decode_all(lm, clip, defaults: dict, scenes: list[shapes.Scene], retrieval_pool: int = 20_000,
               seconds: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Every decoder's caption of every scene (ZeroCap: of the first :data:`ZEROCAP_SCENES`), by
    decoder name (CLIP retrieval: the best of the first ``retrieval_pool`` training scenes' captions,
    by :func:`~magic_edu.retrieval.build_text_index`). An image-blind decoder that does not sample writes
    one caption for all scenes. ``seconds`` (if given) gets the total seconds of ZeroCap's captions
    (``"zerocap"``) and of MAGIC's of the same scenes, one at a time (``"magic one at a time"``)."""
    mnt = defaults["max_new_tokens"]
    n = len(scenes)
    images = [s.image for s in scenes]
    out = {}
    for decoder in table_decoders():
        run = getattr(decoding, decoder.function)
        settings = decoder_settings(decoder, defaults)
        if decoder.retrieves:
            pool = sorted(set(shapes.caption_corpus(range(retrieval_pool), per_scene=1)))
            index = build_text_index(clip, pool, batch_size=1000, progress=False)
            out[decoder.name] = [g.text for g in run(lm, clip, images, index=index, record=False)]
        elif decoder.steers:
            out[decoder.name] = []
            magic = decoder_settings(DECODERS["magic"], defaults)
            for image in images[:ZEROCAP_SCENES]:
                gen = _timed(seconds, decoder.name, run, lm, clip, image, **settings, prompt=None, max_new_tokens=mnt,
                             record=False)
                out[decoder.name].append(gen.text)
                _timed(seconds, "magic one at a time", decoding.magic_search, lm, clip, image, **magic,
                       max_new_tokens=mnt, record=False)
        elif decoder.needs_image:
            gens = []
            for i in range(0, n, MAGIC_BATCH):
                gens += run(lm, clip, images[i : i + MAGIC_BATCH], **settings, max_new_tokens=mnt, record=False)
            out[decoder.name] = [g.text for g in gens]
        elif decoder.samples:
            out[decoder.name] = [run(lm, **{**settings, "seed": i}, max_new_tokens=mnt, record=False).text
                                 for i in range(n)]
        else:
            out[decoder.name] = [run(lm, **settings, max_new_tokens=mnt, record=False).text] * n
    return out


def _timed(seconds: dict[str, float] | None, key: str, run, *args, **kwargs):
    """``run(*args, **kwargs)``, its wall time added to ``seconds[key]`` (if ``seconds`` is given)."""
    start = time.perf_counter()
    result = run(*args, **kwargs)
    if seconds is not None:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
    return result


def score_captions(texts: list[str], scenes: list[shapes.Scene]) -> dict[str, float]:
    """Shares of captions naming an object right (any), all objects right (all), and
    fluent (:func:`~magic_edu.toyworld.tuning.fluent_caption`)."""
    scenes = scenes[: len(texts)]  # ZeroCap captions only the first scenes
    g = [shapes.grounding(t, s.objects) for t, s in zip(texts, scenes, strict=True)]
    return {
        "any": float(np.mean([x.any_right for x in g])),
        "all": float(np.mean([x.all_right for x in g])),
        "fluent": float(np.mean([fluent_caption(t, len(s.objects)) for t, s in zip(texts, scenes, strict=True)])),
    }


def magic_milliseconds(lm, clip, defaults: dict, n: int = 20) -> float:
    """Mean wall time of one toy MAGIC caption (one image at a time, trace recorded), in ms."""
    from .. import magic_search

    scenes = held_out_scenes(n, multi=False)
    magic_search(lm, clip, scenes[0].image, **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    t = time.perf_counter()
    for s in scenes:
        magic_search(lm, clip, s.image, **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    return 1000 * (time.perf_counter() - t) / n


def results_table(out: Path = Path("data/toy"), n: int = 200) -> tuple[str, dict]:
    """The ShapesWorld results table (markdown) on ``n`` held-out single-object and ``n``
    held-out multi-object scenes, and the numbers behind it (rows by label)."""
    lm, _, clip, defaults = load_toy(out)
    single, multi = held_out_scenes(n, multi=False), held_out_scenes(n, multi=True)
    seconds: dict[str, float] = {}
    texts_single = decode_all(lm, clip, defaults, single, seconds=seconds)
    texts_multi = decode_all(lm, clip, defaults, multi, seconds=seconds)
    zerocap_n = min(n, ZEROCAP_SCENES)
    rows_shown = [(d.name, d.label + (f" (first {zerocap_n} scenes of each set)" if d.steers and zerocap_n < n else ""),
                   d.needs_image) for d in table_decoders()]
    rows = {}
    lines = [
        (f"Held-out scenes (seeds never used in training): {n} with one shape, {n} with two or three. "
         "A caption is right if it names the colour and the shape of an object in the image."),
        "",
        ("| decoder | sees the image | 1 shape: right | 1 shape: right, nothing else | 2-3 shapes: one right "
         "| 2-3 shapes: all right | fluent |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, label, sees in rows_shown:
        a, b = score_captions(texts_single[name], single), score_captions(texts_multi[name], multi)
        r = rows[label] = {"single": a["any"], "single_exact": a["all"], "multi_any": b["any"], "multi_all": b["all"],
                           "fluent": (a["fluent"] + b["fluent"]) / 2, "fluent_single": a["fluent"]}
        lines.append(f"| {label} | {'yes' if sees else 'no'} | {r['single']:.2f} | {r['single_exact']:.2f} | "
                     f"{r['multi_any']:.2f} | {r['multi_all']:.2f} | {r['fluent']:.2f} |")
    settings = [(d.label, {k: v for k, v in decoder_settings(d, defaults).items() if k != "seed"})
                for d in table_decoders() if not d.steers]
    captions = 2 * zerocap_n
    zerocap_ms, magic_ms = (1000 * seconds[key] / captions for key in ("zerocap", "magic one at a time"))
    chance = 1 / (len(shapes.COLOURS) * len(shapes.SHAPES))
    lines += [
        "",
        f"Chance for one shape: 1/{len(shapes.COLOURS) * len(shapes.SHAPES)} = {chance:.2f}. \"Nothing else\": "
        "no other colour-and-shape named (no invented second shape). \"All right\": every shape named, "
        "nothing invented. Fluent: a sentence the caption templates could produce (for one shape also without "
        "a repeated bigram), over all captions. Settings: "
        + "; ".join(f"{label} " + ", ".join(f"{k}={v}" for k, v in s.items()) for label, s in settings if s)
        + f" (k, alpha and beta as tuned for MAGIC; top-k and nucleus as the paper's baselines); "
        f"{DECODERS['zerocap'].label} with the public implementation's settings (1 beam, as the MAGIC paper's "
        "baseline). "
        f"{DECODERS['clip_retrieval'].label}: the best of the training captions by CLIP score.",
        "",
        f"Speed on these {captions} scenes, one image at a time, each caption ending where the decoder ends it: "
        f"{DECODERS['zerocap'].label} {zerocap_ms:.0f} ms, MAGIC {magic_ms:.0f} ms per caption: MAGIC "
        f"{zerocap_ms / magic_ms:.1f}x faster (the paper: nearly 27x on MSCOCO, GPT-2 + ViT-B/32 on a GPU).",
    ]
    examples = [(s, texts_single["magic"][i]) for i, s in enumerate(single[:3])]
    examples += [(s, texts_multi["magic"][i]) for i, s in enumerate(multi[:3])]
    zerocap = [(s, texts_single["zerocap"][i]) for i, s in enumerate(single[:3])]
    zerocap += [(s, texts_multi["zerocap"][i]) for i, s in enumerate(multi[:3])]
    for label, shown in ((DECODERS["magic"].label, examples), (DECODERS["zerocap"].label, zerocap)):
        lines += ["", f"Examples ({label}):", ""]
        for s, t in shown:
            truth = ", ".join(f"{o.size} {o.colour} {o.shape} ({o.position})" for o in s.objects)
            lines.append(f"- seed {s.seed}: *{t}*  (image: {truth})")
    speed = {"zerocap_ms": zerocap_ms, "magic_ms": magic_ms, "captions": captions}
    return "\n".join(lines) + "\n", {"rows": rows, "defaults": defaults, "n": n, "speed": speed}


def story_examples(out: Path = Path("data/toy"), n: int = 4, image_dir: Path | None = None) -> str:
    """A few MAGIC stories of held-out scenes (title = the tuned prompt), as markdown; with
    ``image_dir`` the scene images are saved there and shown."""
    from .. import magic_search

    _, story_lm, clip, defaults = load_toy(out)
    st = defaults["story"]
    scenes = [shapes.make_scene(shapes.HELD_OUT_SEED + 200_000 + i, n_captions=1) for i in range(n)]
    gens = magic_search(story_lm, clip, [s.image for s in scenes], prompt=st.get("prompt", STORY_PROMPT),
                        **{k: st[k] for k in ("k", "alpha", "beta", "max_new_tokens")}, record=False)
    lines = []
    for s, g in zip(scenes, gens, strict=True):
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            s.image.save(image_dir / f"story_{s.seed}.png")
            lines.append(f"![scene {s.seed}]({image_dir.name}/story_{s.seed}.png)")
        truth = ", ".join(f"{o.size} {o.colour} {o.shape} ({o.position})" for o in s.objects)
        lines.append(f"**{st.get('prompt', STORY_PROMPT)}**: {g.text}  (image: {truth})\n")
    return "\n".join(lines) + "\n"
