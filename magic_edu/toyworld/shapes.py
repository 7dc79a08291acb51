"""ShapesWorld: a tiny synthetic image-caption world in which MAGIC visibly works offline.

A scene is 1 to 3 coloured shapes on a plain background, rendered deterministically from a
seed. Each scene comes with its attributes (what is where), reference captions from varied
templates and a short story in the paper's story format (a title, then 2 to 4 sentences).

    scene = make_scene(7)
    scene.image                     # a 96 x 96 PIL image
    scene.objects                   # [ShapeObject(colour='red', shape='circle', ...), ...]
    scene.captions                  # ['a red circle.', 'there is a small red circle on the left.', ...]
    scene.title, scene.story        # 'a new friend', 'there was a red circle. it was very happy.'
    grounding("a red circle.", scene.objects).any_right

The caption grammar below is also a parser: :func:`text_consistent` says whether a caption,
or any prefix of one, could have been written about a given scene. The toy CLIP is trained
with that as its (multi-positive) target, and :func:`is_template_caption` is the fluency check
of the results table. :func:`grounding` is deliberately *not* built on the grammar: it reads
colour and shape words from any text, so it also judges captions no template could produce.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world's vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "grey": (232, 232, 232),
    "cream": (250, 244, 230),
}

# Training uses seeds below 1,000,000; held-out scenes (the results table, the tests, the
# widgets' random scenes) start here.
HELD_OUT_SEED = 9_000_000

IMAGE_SIZE = 96
# centre of each position, as a fraction of the image side; neighbours are 0.33 apart so
# that two large shapes never touch
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.17, 0.5), "right": (0.83, 0.5), "top": (0.5, 0.17), "bottom": (0.5, 0.83), "middle": (0.5, 0.5),
}
RADIUS = {"small": 0.062, "large": 0.105}  # of the image side (a star's points reach 1.3 x this)
POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "middle": "in the middle",
}
PREPOSITIONS = {"on": ("left", "right"), "at": ("top", "bottom"), "in": ("middle",)}
PLURALS = {s + "s": s for s in SHAPES}


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene. ``colour``/``shape``/``size``/``position`` are the attributes
    captions talk about; ``rgb``, ``centre`` (pixels), ``radius`` (pixels) and ``rotation``
    (degrees) are how it was drawn."""

    colour: str
    shape: str
    size: str
    position: str
    rgb: tuple[int, int, int] = (0, 0, 0)
    centre: tuple[float, float] = (0.0, 0.0)
    radius: float = 0.0
    rotation: float = 0.0


@dataclass
class Scene:
    """A rendered scene: the image, its objects, reference captions and a story."""

    seed: int
    image: Image.Image
    objects: list[ShapeObject]
    background: str
    captions: list[str] = field(default_factory=list)
    title: str = ""
    story: str = ""
    texture: str = "none"


# -----------------------------------------------------------------------------
# sampling and rendering


def sample_objects(rng: random.Random, n_objects: int | None = None) -> list[ShapeObject]:
    """1 to 3 objects at distinct positions (abstract attributes only, nothing drawn yet)."""
    n = n_objects if n_objects is not None else rng.choices((1, 2, 3), weights=(4, 3, 3))[0]
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3; got {n}")
    positions = rng.sample(POSITIONS, n)
    return [ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), p) for p in positions]


def place(objects: list[ShapeObject], rng: random.Random, size: int = IMAGE_SIZE) -> list[ShapeObject]:
    """Give each object its drawing details: jittered colour, centre, radius, rotation."""
    placed = []
    for o in objects:
        rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[o.colour])
        fx, fy = POSITION_CENTRES[o.position]
        centre = (fx * size + rng.uniform(-1.5, 1.5), fy * size + rng.uniform(-1.5, 1.5))
        radius = RADIUS[o.size] * size * rng.uniform(0.96, 1.04)
        placed.append(ShapeObject(o.colour, o.shape, o.size, o.position, rgb, centre, radius, rng.uniform(-12, 12)))
    return placed


def shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """The outline of a square, triangle or star of 'radius' r (circles are drawn as ellipses)."""
    if shape == "square":
        radii, n, start = [r * 1.15], 4, 45.0  # half side 0.81 r
    elif shape == "triangle":
        radii, n, start = [r * 1.25], 3, -90.0
    elif shape == "star":
        radii, n, start = [r * 1.3, r * 0.55], 10, -90.0
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    pts = []
    for i in range(n):
        a = math.radians(start + rotation + 360.0 * i / n)
        rad = radii[i % len(radii)]
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render(
    objects: list[ShapeObject], background: str, rng: random.Random, size: int = IMAGE_SIZE, texture: str = "none"
) -> Image.Image:
    """Draw the (placed) objects, 4x supersampled for smooth edges. ``texture``: "none",
    "grid", "dots" or "noise"; all randomness comes from ``rng`` (never a global state)."""
    s = 4
    img = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    shade = tuple(c - 14 for c in BACKGROUNDS[background])
    if texture == "grid":
        step = rng.choice((8, 12, 16)) * s
        for t in range(0, size * s, step):
            draw.line([(t, 0), (t, size * s)], fill=shade, width=s)
            draw.line([(0, t), (size * s, t)], fill=shade, width=s)
    elif texture == "dots":
        for _ in range(60):
            x, y = rng.uniform(0, size * s), rng.uniform(0, size * s)
            draw.ellipse([x - s, y - s, x + s, y + s], fill=shade)
    for o in objects:
        cx, cy, r = o.centre[0] * s, o.centre[1] * s, o.radius * s
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        else:
            draw.polygon(shape_polygon(o.shape, cx, cy, r, o.rotation), fill=o.rgb)
    img = img.reduce(s)  # box filter: each pixel the mean of its 4 x 4 samples
    if texture == "noise":  # light grey grain, from the scene's own random stream
        grain = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 5.0, (size, size, 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    return img


def make_scene(
    seed: int, n_objects: int | None = None, n_captions: int = 5, size: int = IMAGE_SIZE
) -> Scene:
    """The scene of ``seed``: image, objects, ``n_captions`` distinct captions and a story.
    The same seed always gives the same scene (``n_objects`` forces the number of shapes)."""
    rng = random.Random(seed)
    objects = place(sample_objects(rng, n_objects), rng, size)
    background = rng.choices(list(BACKGROUNDS), weights=(3, 1, 1))[0]
    texture = rng.choices(("none", "grid", "dots", "noise"), weights=(7, 1, 1, 1))[0]
    image = render(objects, background, rng, size, texture)
    captions = sample_captions(objects, rng, n_captions)
    title, story = make_story(objects, rng)
    return Scene(seed, image, objects, background, captions, title, story, texture)


def perturb(objects: list[ShapeObject], rng: random.Random) -> list[ShapeObject]:
    """The same layout with one attribute of one object changed (a hard negative for CLIP):
    its colour, shape, size or, for several objects, a swap of two objects' colours."""
    objs = list(objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    others = [j for j in range(len(objs)) if objs[j].colour != o.colour]
    kind = rng.choice(("colour", "shape", "size", "swap") if others else ("colour", "shape", "size"))
    if kind == "colour":
        objs[i] = ShapeObject(rng.choice([c for c in COLOURS if c != o.colour]), o.shape, o.size, o.position)
    elif kind == "shape":
        objs[i] = ShapeObject(o.colour, rng.choice([s for s in SHAPES if s != o.shape]), o.size, o.position)
    elif kind == "size":
        objs[i] = ShapeObject(o.colour, o.shape, "small" if o.size == "large" else "large", o.position)
    else:
        j = rng.choice(others)
        p = objs[j]
        objs[i] = ShapeObject(p.colour, o.shape, o.size, o.position)
        objs[j] = ShapeObject(o.colour, p.shape, p.size, p.position)
    return objs


# -----------------------------------------------------------------------------
# the caption grammar
#
# A template is a string of words and slots. {1} is "object 1 described" and expands to one
# of DESCRIPTIONS; [c1] [s1] [z1] are object 1's colour, shape and size words, and [p1] its
# position phrase ("on the left"). Relation templates hold only if the relation is true.

DESCRIPTIONS = ("[c] [s]", "[z] [c] [s]", "[c] [s] [p]", "[z] [c] [s] [p]")
CAPTION_TEMPLATES: dict[int, list[str]] = {
    1: [
        "a {1} .", "there is a {1} .", "a picture of a {1} .", "an image of a {1} .", "one {1} .",
        "a single {1} .", "just a {1} .", "the [s1] is [c1] .", "the only shape is a {1} .",
    ],
    2: [
        "a {1} and a {2} .", "a {1} next to a {2} .", "there is a {1} next to a {2} .",
        "there are two shapes , a {1} and a {2} .", "a {1} above a {2} .", "a {1} below a {2} .",
        "a {1} to the left of a {2} .", "a {1} to the right of a {2} .",
    ],
    3: [
        "a {1} , a {2} and a {3} .", "there are three shapes , a {1} , a {2} and a {3} .",
        "there is a {1} , a {2} and a {3} .",
    ],
}
RELATIONS = ("above", "below", "to the left of", "to the right of")


def template_relation(template: str) -> str | None:
    """The relation a two-object template asserts, if any."""
    return next((r for r in RELATIONS if f" {r} a" in template), None)


def template_descriptions(template: str, n: int) -> int:
    """How many of DESCRIPTIONS a template may use: no position phrase in relation
    templates ("a red circle on the left to the left of ..."), no size and position together
    for three objects (keeps captions short)."""
    return 2 if template_relation(template) else 3 if n == 3 else 4

# Story sentences; {1} here is "some object of the scene", <n>= says how many objects the
# scene must have (e.g. "they" needs two). A story: an intro, one "meet" per other object,
# then closing sentences, 2 to 4 sentences in all.
STORY_INTROS = [
    "once upon a time there was a {1} .", "there was a {1} .", "this is a story about a {1} .",
    "there once was a {1} .",
]
STORY_MEETS = ["one day it met a {1} .", "next to it was a {1} .", "it had a friend , a {1} ."]
STORY_CLOSINGS: dict[str, list[str]] = {
    "one": ["it wanted to find a friend .", "it was all alone .", "it liked being alone ."],
    "many": ["they played together all day .", "they became good friends .", "they were happy together ."],
    "any": ["it was very happy .", "the [s1] was [z1] .", "everyone liked the [c1] [s1] .", "the end ."],
}
STORY_TITLES = [
    "the [c1] [s1]", "a [z1] [s1]", "the [s1]", "a new friend", "the little shape", "a sunny day",
    "shapes at play", "the picture",
]


def article_fix(words: list[str]) -> list[str]:
    """'a' before a vowel becomes 'an'."""
    return ["an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w
            for i, w in enumerate(words)]


def to_text(words: list[str]) -> str:
    """Join words, no space before punctuation."""
    return re.sub(r" ([.,])", r"\1", " ".join(article_fix(words)))


def words_of(text: str) -> list[str]:
    """Lower-case words and punctuation of a text."""
    return re.findall(r"[a-z]+|[.,]", text.lower())


def relation_holds(rel: str, a: str, b: str) -> bool:
    """Is an object at position a <rel> one at position b? (from the position centres)"""
    (ax, ay), (bx, by) = POSITION_CENTRES[a], POSITION_CENTRES[b]
    return {"above": ay < by - 0.1, "below": ay > by + 0.1,
            "to the left of": ax < bx - 0.1, "to the right of": ax > bx + 0.1}[rel]


def fill(template: str, objects: list[ShapeObject], rng: random.Random, max_desc: int = 4) -> list[str]:
    """The words of a template with objects[0] as object 1, objects[1] as object 2, ..."""
    def expand_desc(m: re.Match) -> str:
        i = m.group(1)
        desc = rng.choice(DESCRIPTIONS[:max_desc])
        return re.sub(r"\[(\w)\]", lambda mm: f"[{mm.group(1)}{i}]", desc)

    t = re.sub(r"\{(\d)\}", expand_desc, template)
    words: list[str] = []
    for w in t.split():
        m = re.fullmatch(r"\[(\w)(\d)\]", w)
        if not m:
            words.append(w)
            continue
        o = objects[int(m.group(2)) - 1]
        words += {"c": [o.colour], "s": [o.shape], "z": [o.size], "p": POSITION_PHRASES[o.position].split()}[m.group(1)]
    return words


def sample_caption(objects: list[ShapeObject], rng: random.Random) -> str:
    """One caption of the scene from a random template, objects in a random order."""
    n = len(objects)
    while True:
        template = rng.choice(CAPTION_TEMPLATES[n])
        order = rng.sample(objects, n)
        rel = template_relation(template)
        if rel and not relation_holds(rel, order[0].position, order[1].position):
            order = order[::-1]
            if not relation_holds(rel, order[0].position, order[1].position):
                continue
        return to_text(fill(template, order, rng, template_descriptions(template, n)))


def sample_captions(objects: list[ShapeObject], rng: random.Random, n: int = 5) -> list[str]:
    """Up to n distinct captions (fewer only if the scene has fewer)."""
    out: list[str] = []
    for _ in range(20 * n):
        c = sample_caption(objects, rng)
        if c not in out:
            out.append(c)
        if len(out) == n:
            break
    return out


def make_story(objects: list[ShapeObject], rng: random.Random) -> tuple[str, str]:
    """(title, story): an intro, a sentence per further object, closings; 2 to 4 sentences."""
    order = rng.sample(objects, len(objects))
    sentences = [fill(rng.choice(STORY_INTROS), order, rng)]
    sentences += [fill(rng.choice(STORY_MEETS), [o], rng) for o in order[1:]]
    pool = STORY_CLOSINGS["one" if len(objects) == 1 else "many"] + STORY_CLOSINGS["any"]
    n_sentences = rng.randint(max(2, len(sentences)), 4)
    for t in rng.sample(pool, n_sentences - len(sentences)):
        sentences.append(fill(t, [rng.choice(objects)], rng))
    title = fill(rng.choice(STORY_TITLES), order, rng)
    return to_text(title), to_text([w for s in sentences for w in s])


# -----------------------------------------------------------------------------
# the grammar as a parser: which scenes could a text (or a prefix of one) be about?
#
# Every template is expanded into patterns: lists of literal words and slots ("c", i),
# ("s", i), ("z", i), ("prep", i), ("pos", i). The patterns go into a trie that a text walks
# word by word, binding each object index to the set of values its words allow.

SLOT_VALUES = {"c": tuple(COLOURS), "s": SHAPES, "z": SIZES, "pos": POSITIONS}
ATTR_INDEX = {"c": 0, "s": 1, "z": 2, "pos": 3}
WORD_SLOTS: dict[str, list[tuple[str, int]]] = {}  # word -> [(slot kind, value index)]
for _kind, _values in SLOT_VALUES.items():
    for _j, _v in enumerate(_values):
        WORD_SLOTS.setdefault(_v, []).append((_kind, _j))
for _prep, _poss in PREPOSITIONS.items():
    WORD_SLOTS.setdefault(_prep, []).append(("prep", sum(1 << POSITIONS.index(p) for p in _poss)))

ALL = (63, 15, 3, 31)  # every colour, shape, size, position allowed (bit masks)


@dataclass(frozen=True)
class Meta:
    """What a pattern says beyond its slots: how many objects it speaks of (k), how many the
    scene must have (n_min..n_max) and an optional relation between objects 1 and 2."""

    k: int
    n_min: int
    n_max: int
    relation: str | None = None


@dataclass(frozen=True)
class Query:
    """A reading of a text: per object index, bit masks of allowed (colour, shape, size,
    position), plus the pattern's Meta. The text fits a scene if some assignment of distinct
    objects to the indices satisfies the masks and the meta."""

    masks: tuple[tuple[int, int, int, int], ...]
    meta: Meta

    def fits(self, objects: list[ShapeObject]) -> bool:
        n = len(objects)
        if not self.meta.n_min <= n <= self.meta.n_max:
            return False
        for perm in itertools.permutations(objects, self.meta.k):
            if all(_matches(m, o) for m, o in zip(self.masks, perm)) and (
                self.meta.relation is None or relation_holds(self.meta.relation, perm[0].position, perm[1].position)
            ):
                return True
        return False


def _matches(mask: tuple[int, int, int, int], o: ShapeObject) -> bool:
    vals = (list(COLOURS).index(o.colour), SHAPES.index(o.shape), SIZES.index(o.size), POSITIONS.index(o.position))
    return all(m >> v & 1 for m, v in zip(mask, vals))


class _Node:
    __slots__ = ("below", "edges", "ends")

    def __init__(self) -> None:
        self.edges: dict = {}
        self.ends: set[Meta] = set()  # metas of patterns ending here
        self.below: set[Meta] = set()  # metas of patterns passing through here


def _patterns(template: str, meta: Meta, max_desc: int) -> list[list]:
    """Every expansion of a template into literal words and slots."""
    slots = re.findall(r"\{(\d)\}", template)
    out = []
    for descs in itertools.product(DESCRIPTIONS[:max_desc], repeat=len(slots)):
        t = template
        for i, d in zip(slots, descs):
            t = t.replace("{" + i + "}", re.sub(r"\[(\w)\]", lambda m, i=i: f"[{m.group(1)}{i}]", d))
        pat: list = []
        for w in t.split():
            m = re.fullmatch(r"\[(\w)(\d)\]", w)
            if not m:
                pat.append("a" if w == "an" else w)
            elif m.group(1) == "p":
                pat += [("prep", int(m.group(2))), "the", ("pos", int(m.group(2)))]
            else:
                pat.append(({"c": "c", "s": "s", "z": "z"}[m.group(1)], int(m.group(2))))
        out.append(pat)
    return out


def _build_trie(entries: list[tuple[str, Meta, int]]) -> _Node:
    root = _Node()
    for template, meta, max_desc in entries:
        for pat in _patterns(template, meta, max_desc):
            node = root
            node.below.add(meta)
            for tok in pat:
                node = node.edges.setdefault(tok, _Node())
                node.below.add(meta)
            node.ends.add(meta)
    return root


@cache
def _caption_trie() -> _Node:
    entries = []
    for n, templates in CAPTION_TEMPLATES.items():
        for t in templates:
            entries.append((t, Meta(n, n, n, template_relation(t)), template_descriptions(t, n)))
    return _build_trie(entries)


@cache
def _story_trie() -> _Node:
    entries = [(t, Meta(1, 1, 3), 4) for t in STORY_INTROS + STORY_CLOSINGS["any"]]
    entries += [(t, Meta(1, 2, 3), 4) for t in STORY_MEETS + STORY_CLOSINGS["many"]]
    entries += [(t, Meta(1, 1, 1), 4) for t in STORY_CLOSINGS["one"]]
    return _build_trie(entries)


def _walk(root: _Node, words: list[str], complete: bool) -> list[Query]:
    """Read one sentence (or its beginning) through the trie; the readings it allows."""
    states = [(root, ())]  # (node, bindings: tuple of (index, attr, mask))
    for w in words:
        w = "a" if w == "an" else w
        nxt = []
        for node, binds in states:
            if w in node.edges:
                nxt.append((node.edges[w], binds))
            for kind, val in WORD_SLOTS.get(w, ()):
                for tok, child in node.edges.items():
                    if isinstance(tok, tuple) and tok[0] == kind:
                        attr = "pos" if kind == "prep" else kind
                        mask = val if kind == "prep" else 1 << val
                        nxt.append((child, binds + ((tok[1], ATTR_INDEX[attr], mask),)))
        states = nxt
        if not states:
            return []
    queries = set()
    for node, binds in states:
        masks = {}
        for i, a, m in binds:
            cur = list(masks.get(i, ALL))
            cur[a] &= m
            masks[i] = tuple(cur)
        for meta in node.ends if complete else node.below:
            queries.add(Query(tuple(masks.get(i, ALL) for i in range(1, meta.k + 1)), meta))
    return sorted(queries, key=repr)


@lru_cache(maxsize=200_000)
def parse_caption(text: str) -> tuple[Query, ...]:
    """The readings of a caption, or of the beginning of one. A text ending in '.' is read as
    a whole caption, any other as a prefix. () if no template can produce it."""
    words = words_of(text)
    complete = bool(words) and words[-1] == "."
    if "." in words[:-1]:
        return ()
    return tuple(_walk(_caption_trie(), words, complete))


@lru_cache(maxsize=200_000)
def parse_story(text: str) -> tuple[tuple[Query, ...], ...]:
    """Per sentence of a story (or its beginning), that sentence's readings; () if some
    sentence fits no story template."""
    words = words_of(text)
    sentences, cur = [], []
    for w in words:
        cur.append(w)
        if w == ".":
            sentences.append((cur, True))
            cur = []
    if cur:
        sentences.append((cur, False))
    out = []
    for ws, complete in sentences:
        q = tuple(_walk(_story_trie(), ws, complete))
        if not q:
            return ()
        out.append(q)
    return tuple(out)


def text_consistent(text: str, objects: list[ShapeObject], kind: str = "caption") -> bool:
    """Could the caption grammar (kind="caption") or the story grammar (kind="story") have
    written ``text``, or a text starting with it, about a scene with these objects?"""
    if kind == "caption":
        return any(q.fits(objects) for q in parse_caption(text))
    if kind == "story":
        readings = parse_story(text)
        return bool(readings) and all(any(q.fits(objects) for q in qs) for qs in readings)
    raise ValueError(f"kind must be 'caption' or 'story'; got {kind!r}")


def is_template_caption(text: str) -> bool:
    """Could some template have produced this whole caption (with 'a'/'an' right)?"""
    words = words_of(text)
    if not words or words[-1] != ".":
        return False
    if any(w in ("a", "an") and i + 1 < len(words) and (w == "an") != (words[i + 1][0] in "aeiou")
           for i, w in enumerate(words)):
        return False
    return bool(parse_caption(text))


def has_repeated_bigram(text: str) -> bool:
    """Does some pair of consecutive words occur twice?"""
    words = words_of(text)
    bigrams = list(itertools.pairwise(words))
    return len(bigrams) != len(set(bigrams))


# -----------------------------------------------------------------------------
# grounding: does a caption name what is in the image?


@dataclass(frozen=True)
class Grounding:
    """What a caption names, against what a scene holds.

    * ``named``: the (colour, shape) pairs the caption names, in order;
    * ``any_right``: at least one named pair is the colour and shape of an object in the scene;
    * ``all_right``: the named pairs are exactly the scene's objects (each object named once,
      nothing named that is not there).
    """

    named: tuple[tuple[str, str], ...]
    any_right: bool
    all_right: bool


def named_pairs(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a text names: a colour word followed by a shape word in the
    same phrase ("a small red circle", "two blue stars"), or "the <shape> is/was <colour>".
    Plurals count twice after "two", three times after "three"."""
    words = words_of(text)
    pairs: list[tuple[str, str]] = []
    for i, w in enumerate(words):
        shape = w if w in SHAPES else PLURALS.get(w)
        if shape is None:
            continue
        colour, count = None, 1
        j = i - 1
        while j >= 0 and (words[j] in SIZES or words[j] in COLOURS) and colour is None:
            colour = words[j] if words[j] in COLOURS else None
            j -= 1
        if colour is not None:
            while j >= 0 and words[j] in SIZES:
                j -= 1
            if w in PLURALS and j >= 0 and words[j] in ("two", "three"):
                count = 2 if words[j] == "two" else 3
        elif i + 2 < len(words) and words[i + 1] in ("is", "was") and words[i + 2] in COLOURS:
            colour = words[i + 2]
        if colour is not None:
            pairs += [(colour, shape)] * count
    return pairs


def grounding(text: str, objects: list[ShapeObject]) -> Grounding:
    """Does ``text`` name the colour and shape of an object of the scene (``any_right``), and
    of every object and nothing else (``all_right``)? Built from colour/shape words alone,
    so it judges any text, fluent or not."""
    named = named_pairs(text)
    truth = Counter((o.colour, o.shape) for o in objects)
    return Grounding(tuple(named), any(p in truth for p in named), Counter(named) == truth)


# -----------------------------------------------------------------------------
# corpora for training (text only for the LM; text + attributes for CLIP)


def caption_corpus(seeds: range | list[int], per_scene: int = 3) -> list[str]:
    """Captions of the abstract scenes of ``seeds`` (nothing rendered: fast)."""
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        objects = sample_objects(rng)
        out += [sample_caption(objects, rng) for _ in range(per_scene)]
    return out


def story_corpus(seeds: range | list[int]) -> list[tuple[str, str]]:
    """(title, story) pairs of the abstract scenes of ``seeds``."""
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        out.append(make_story(sample_objects(rng), rng))
    return out
