"""The toy CLIP's training data: rendered images, the texts paired with them, and the
multi-positive targets saying which text could be about which image.

Images come in twin pairs (a scene and the same scene with one attribute changed: hard
negatives). Texts are whole captions, caption prefixes and story prefixes, their
*counterfactuals* (another shape or colour word) and *junk continuations* (a prefix plus a
word no template puts there, positive for no image: the kind of candidate MAGIC meets among
the LM's top k). Text j is a positive for image i whenever the caption (or story) grammar
could have written it, or a text starting with it, about scene i
(:func:`magic_edu.toyworld.shapes.text_consistent`, vectorised here over many scenes).
"""

from __future__ import annotations

import itertools
import multiprocessing
import random

import numpy as np
import torch
from tqdm.auto import tqdm

from . import shapes
from .config import TUNE_SEED, TrainConfig

# -----------------------------------------------------------------------------
# images


def _clip_resize(image_size: int) -> list:
    """open_clip's Resize and CenterCrop at ``image_size``, as at inference (no ToTensor, Normalize)."""
    from open_clip.transform import image_transform

    return image_transform(image_size, is_train=False).transforms[:2]


def _render_chunk(args: tuple[list[int], int]) -> tuple[np.ndarray, list]:
    """Render scenes of seeds (and each one's perturbed twin) already resized for CLIP."""
    seeds, image_size = args
    resize = _clip_resize(image_size)
    images, objects = [], []
    for seed in seeds:
        rng = random.Random(seed)
        objs = shapes.sample_objects(rng)
        twin = shapes.perturb(objs, rng)
        for o in (objs, twin):
            placed = shapes.place(o, rng)
            background = rng.choices(list(shapes.BACKGROUNDS), weights=(3, 1, 1))[0]
            texture = rng.choices(("none", "grid", "dots", "noise"), weights=(7, 1, 1, 1))[0]
            img = shapes.render(placed, background, rng, texture=texture)
            for t in resize:
                img = t(img)
            images.append(np.asarray(img, dtype=np.uint8))
            objects.append(o)
    return np.stack(images), objects


def render_pool(cfg: TrainConfig) -> tuple[torch.Tensor, list[list[shapes.ShapeObject]]]:
    """``clip_pool`` training images (uint8, N x H x W x 3) and their objects, in twin pairs."""
    seeds = list(range(100_000, 100_000 + cfg.clip_pool // 2))
    chunks = [(seeds[i : i + 250], cfg.clip_image_size) for i in range(0, len(seeds), 250)]
    images, objects = [], []
    workers = max(1, min(cfg.threads, len(chunks)))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for ims, objs in tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc="render CLIP images"):
            images.append(ims)
            objects += objs
    return torch.from_numpy(np.concatenate(images)), objects


def val_single_objects(cfg: TrainConfig, count: int = 200):
    """Rendered single-object validation scenes (tuning seeds) for the zero-shot check."""
    resize = _clip_resize(cfg.clip_image_size)
    images, objects = [], []
    for i in range(count):
        scene = shapes.make_scene(TUNE_SEED + 100_000 + i, n_objects=1, n_captions=1)
        img = scene.image
        for t in resize:
            img = t(img)
        images.append(np.asarray(img, dtype=np.uint8))
        objects.append(scene.objects)
    return torch.from_numpy(np.stack(images)), objects


def normalise_images(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W, as open_clip's ToTensor + Normalize."""
    x = images_u8.permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# -----------------------------------------------------------------------------
# texts


def counterfactuals(text: str, rng: random.Random) -> list[str]:
    """The text with one of its shape words replaced by each other shape (or, if it names no
    shape, one colour word by two other colours): hard negatives that differ in one word.
    They may well fit other scenes of the batch; the consistency matrix says which."""
    words = text.split()
    for vocab, n in ((shapes.SHAPES, 3), (tuple(shapes.COLOURS), 2)):
        spots = [i for i, w in enumerate(words) if w.rstrip(".,") in vocab]
        if spots:
            i = rng.choice(spots)
            word = words[i].rstrip(".,")
            tail = words[i][len(word):]
            others = rng.sample([v for v in vocab if v != word], n)
            return [shapes.to_text([*words[:i], o + tail, *words[i + 1:]]).replace(" ,", ",") for o in others]
    return []


def junk_continuation(text: str, rng: random.Random, vocab: list[str]) -> str | None:
    """``text`` plus a word no caption or story template puts there: the kind of candidate
    MAGIC meets among the LM's top k, which CLIP must score low for every image."""
    for _ in range(20):
        cut = f"{text} {rng.choice(vocab)}".strip()
        if not shapes.parse_caption(cut) and not shapes.parse_story(cut):
            return cut
    return None


def sample_texts(objects: list[list[shapes.ShapeObject]], rng: random.Random, vocab: list[str],
                 per_scene: int = 1) -> list[tuple[str, str]]:
    """For each scene ``per_scene`` texts (a whole caption, a caption prefix or a story
    prefix); for the first one also its :func:`counterfactuals` and a
    :func:`junk_continuation` of its beginning."""
    texts = []
    for objs in objects:
        for j in range(per_scene):
            r = rng.random()
            if r < 0.35:
                text, kind = shapes.sample_caption(objs, rng), "caption"
            elif r < 0.7:
                words = shapes.sample_caption(objs, rng).split()
                text, kind = " ".join(words[: rng.randint(1, len(words) - 1)]), "caption"
            else:
                words = shapes.make_story(objs, rng)[1].split()
                text, kind = " ".join(words[: rng.randint(1, min(len(words), 40))]), "story"
            texts.append((text, kind))
            if j == 0:
                texts += [(c, kind) for c in counterfactuals(text, rng)]
                words = text.split()
                junk = junk_continuation(" ".join(words[: rng.randint(0, len(words) - 1)]), rng, vocab)
                if junk:
                    texts.append((junk, "junk"))
    return texts


# -----------------------------------------------------------------------------
# multi-positive targets: which text could be about which scene


def attribute_array(objects: list[list[shapes.ShapeObject]]) -> tuple[np.ndarray, np.ndarray]:
    """(S, 3, 4) int array of (colour, shape, size, position) indices (-1: no object) and (S,) counts."""
    A = np.full((len(objects), 3, 4), -1, dtype=np.int64)
    for i, objs in enumerate(objects):
        for j, o in enumerate(objs):
            A[i, j] = (list(shapes.COLOURS).index(o.colour), shapes.SHAPES.index(o.shape),
                       shapes.SIZES.index(o.size), shapes.POSITIONS.index(o.position))
    return A, np.array([len(o) for o in objects])


_REL = {r: np.array([[shapes.relation_holds(r, a, b) for b in shapes.POSITIONS] for a in shapes.POSITIONS])
        for r in shapes.RELATIONS}


def query_fits(q: shapes.Query, A: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Vectorised :meth:`shapes.Query.fits` over many scenes: (S,) bool."""
    out = np.zeros(len(n), dtype=bool)
    masks = np.array(q.masks, dtype=np.int64)[None]  # (1, k, 4)
    for nn in range(q.meta.n_min, q.meta.n_max + 1):
        idx = np.nonzero(n == nn)[0]
        if len(idx) == 0 or q.meta.k > nn:
            continue
        sub, ok = A[idx], np.zeros(len(idx), dtype=bool)
        for perm in itertools.permutations(range(nn), q.meta.k):
            a = sub[:, list(perm)]
            good = ((masks >> a) & 1).astype(bool).all(axis=(1, 2))
            if q.meta.relation is not None:
                good &= _REL[q.meta.relation][a[:, 0, 3], a[:, 1, 3]]
            ok |= good
        out[idx] = ok
    return out


def consistency_matrix(texts: list[tuple[str, str]], A: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(S, T) bool: could text t (kind "caption", "story" or "junk") be about scene s?"""
    cache: dict[shapes.Query, np.ndarray] = {}

    def fits(q):
        if q not in cache:
            cache[q] = query_fits(q, A, n)
        return cache[q]

    def any_fits(queries):
        out = np.zeros(len(n), dtype=bool)
        for q in queries:
            out |= fits(q)
        return out

    cols = []
    for text, kind in texts:
        if kind == "caption":
            col = any_fits(shapes.parse_caption(text))
        elif kind == "story":
            readings = shapes.parse_story(text)
            col = np.ones(len(n), dtype=bool) if readings else np.zeros(len(n), dtype=bool)
            for qs in readings:
                col &= any_fits(qs)
        else:
            col = np.zeros(len(n), dtype=bool)
        cols.append(col)
    return np.stack(cols, axis=1)
