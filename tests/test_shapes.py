"""ShapesWorld's scene generator, caption grammar and grounding check (no models needed).

Captions are checked against the image independently of the generator: colour, shape,
size and position are read back from the pixels."""

import math
import random
import re

import numpy as np
import pytest

from magic_edu.toyworld import shapes
from magic_edu.toyworld.shapes import ShapeObject, grounding, is_template_caption, make_scene, text_consistent


# -- reading a scene back from its pixels --------------------------------------------------
def object_masks(scene):
    """Boolean masks of the pixels that differ clearly from the background, one connected
    blob per object (flood fill)."""
    img = np.asarray(scene.image).astype(int)
    bg = np.array(shapes.BACKGROUNDS[scene.background])
    fg = np.abs(img - bg).sum(-1) > 90
    seen = np.zeros_like(fg)
    blobs = []
    for y, x in zip(*np.nonzero(fg), strict=True):
        if seen[y, x]:
            continue
        stack, blob = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            blob.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(blob) > 10:
            blobs.append(np.array(blob))
    return img, blobs


def hull_area(points):
    """Area of the convex hull of integer points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points)))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))


def read_object(img, blob, size, background):
    """(colour, shape, area, position, rgb) of one blob, from its pixels alone."""
    bg = np.array(shapes.BACKGROUNDS[background], dtype=float)
    pixels = img[blob[:, 0], blob[:, 1]].astype(float)
    rgb = np.median(pixels[np.abs(pixels - bg).sum(1) > np.abs(pixels - bg).sum(1).max() * 0.8], axis=0)
    colour = min(shapes.COLOURS, key=lambda c: np.abs(rgb - shapes.COLOURS[c]).sum())
    # coverage of each pixel by the shape (edges are anti-aliased): its share of the way
    # from the background colour to the shape's colour
    d = rgb - bg
    alpha = np.clip((pixels - bg) @ d / (d @ d), 0, 1)
    area = alpha.sum()
    core = blob[alpha > 0.5]
    cy, cx = (blob * alpha[:, None]).sum(0) / area
    r_max = np.sqrt(((core + 0.5 - [cy + 0.5, cx + 0.5]) ** 2).sum(1)).max() + 0.5
    circularity = area / (math.pi * r_max**2)  # circle 1, square .64, triangle .41, star .38
    solidity = len(core) / max(hull_area(np.concatenate([core + o for o in ((0, 0), (0, 1), (1, 0), (1, 1))])), 1)
    if solidity < 0.75:
        shape = "star"
    elif circularity > 0.79:
        shape = "circle"
    elif circularity > 0.55:
        shape = "square"
    else:
        shape = "triangle"
    fx, fy = cx / size, cy / size
    position = min(shapes.POSITION_CENTRES,
                   key=lambda p: (shapes.POSITION_CENTRES[p][0] - fx) ** 2 + (shapes.POSITION_CENTRES[p][1] - fy) ** 2)
    return colour, shape, area, position, rgb


# -- the generator ----------------------------------------------------------------------------
def test_scene_is_deterministic_from_its_seed():
    a, b = make_scene(123), make_scene(123)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.captions == b.captions and (a.title, a.story) == (b.title, b.story)
    assert make_scene(124).image.tobytes() != a.image.tobytes()


def test_every_texture_is_deterministic():
    """No global random state: a scene renders the same whatever was rendered before it."""
    by_texture = {}
    for seed in range(200):
        by_texture.setdefault(make_scene(seed, n_captions=1).texture, seed)
    assert set(by_texture) == {"none", "grid", "dots", "noise"}
    first = {t: make_scene(s, n_captions=1).image.tobytes() for t, s in by_texture.items()}
    for seed in range(200, 220):
        make_scene(seed, n_captions=1)
    assert first == {t: make_scene(s, n_captions=1).image.tobytes() for t, s in by_texture.items()}


def test_palette_is_the_specified_one():
    assert shapes.COLOURS["red"] == (220, 30, 30)
    assert shapes.COLOURS["green"] == (40, 160, 60)
    assert shapes.COLOURS["blue"] == (40, 80, 220)
    assert shapes.COLOURS["yellow"] == (240, 210, 40)
    assert shapes.COLOURS["purple"] == (140, 60, 180)
    assert shapes.COLOURS["orange"] == (245, 140, 30)
    assert set(shapes.SHAPES) >= {"circle", "square", "triangle", "star"}
    assert "white" in shapes.BACKGROUNDS


def test_scene_structure():
    counts = set()
    for seed in range(60):
        s = make_scene(seed)
        assert s.image.mode == "RGB" and 64 <= s.image.size[0] == s.image.size[1] <= 128
        assert 1 <= len(s.objects) <= 3
        counts.add(len(s.objects))
        assert len({o.position for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert o.colour in shapes.COLOURS and o.shape in shapes.SHAPES
            assert o.size in shapes.SIZES and o.position in shapes.POSITIONS
        assert len(s.captions) >= 3 and len(set(s.captions)) == len(s.captions)
    assert counts == {1, 2, 3}
    assert len(make_scene(5, n_objects=2).objects) == 2


@pytest.mark.parametrize("seed", range(40))
def test_pixels_show_what_the_attributes_say(seed):
    scene = make_scene(1000 + seed)
    img, blobs = object_masks(scene)
    assert len(blobs) == len(scene.objects)
    read = [read_object(img, b, scene.image.size[0], scene.background) for b in blobs]
    for o in scene.objects:
        match = [r for r in read if r[3] == o.position]
        assert len(match) == 1, (o, [r[3] for r in read])
        colour, shape, _, _, rgb = match[0]
        assert colour == o.colour
        assert np.abs(rgb - shapes.COLOURS[o.colour]).max() < 40  # small jitter only
        assert shape == o.shape, (o, shape)


def test_large_shapes_are_larger_than_small_ones():
    areas = {"small": [], "large": []}
    for seed in range(120):
        scene = make_scene(2000 + seed, n_objects=1)
        _, blobs = object_masks(scene)
        areas[scene.objects[0].size].append((scene.objects[0].shape, len(blobs[0])))
    for shape in shapes.SHAPES:
        small = [a for s, a in areas["small"] if s == shape]
        large = [a for s, a in areas["large"] if s == shape]
        if small and large:
            assert max(small) < min(large)


def caption_mentions(caption):
    """(size, colour, shape, position) of every object a caption describes, read with a
    regular expression of its own (not the generator's grammar)."""
    c, s = "|".join(shapes.COLOURS), "|".join(shapes.SHAPES)
    pos = r"(?: (on the left|on the right|at the top|at the bottom|in the middle))?"
    found = re.findall(rf"(?:(small|large) )?({c}) ({s}){pos}", caption)
    found += [(None, col, shp, "") for shp, col in re.findall(rf"the ({s}) is ({c})", caption)]
    return found


@pytest.mark.parametrize("seed", range(30))
def test_captions_agree_with_the_pixels(seed):
    scene = make_scene(3000 + seed)
    img, blobs = object_masks(scene)
    read = [read_object(img, b, scene.image.size[0], scene.background) for b in blobs]
    seen = {(colour, shape) for colour, shape, *_ in read}
    positions = {(colour, shape, p) for colour, shape, _, p, _ in read}
    for caption in scene.captions:
        mentions = caption_mentions(caption)
        assert len(mentions) == len(scene.objects), caption
        for size, colour, shape, where in mentions:
            assert (colour, shape) in seen, (caption, seen)
            if where:
                assert (colour, shape, where.split()[-1]) in positions, (caption, positions)
            if size:
                assert any(o.size == size for o in scene.objects if (o.colour, o.shape) == (colour, shape))


def test_captions_use_varied_templates():
    patterns = set()
    for seed in range(300):
        for c in make_scene(seed).captions:
            patterns.add(re.sub(r"\b(" + "|".join(list(shapes.COLOURS) + list(shapes.SHAPES)) + r")\b", "X", c))
    assert len(patterns) > 100
    starts = {p.split()[0] for p in patterns}
    assert {"a", "there", "the"} <= starts


def test_relation_captions_are_true():
    for seed in range(300):
        s = make_scene(seed, n_objects=2)
        for c in s.captions:
            for rel in shapes.RELATIONS:
                if f" {rel} " in c:
                    a, b = caption_mentions(c)
                    pairs = [(oa, ob) for oa in s.objects for ob in s.objects if oa is not ob
                             and (oa.colour, oa.shape) == a[1:3] and (ob.colour, ob.shape) == b[1:3]]
                    assert any(shapes.relation_holds(rel, oa.position, ob.position) for oa, ob in pairs), c


def test_story_format():
    for seed in range(100):
        s = make_scene(seed)
        assert s.title and "." not in s.title
        sentences = [x for x in s.story.split(".") if x.strip()]
        assert 2 <= len(sentences) <= 4 and s.story.endswith(".")
        named = shapes.named_pairs(s.story)
        truth = {(o.colour, o.shape) for o in s.objects}
        assert named and set(named) <= truth
        assert text_consistent(s.story, s.objects, "story")


# -- the grammar as a parser ----------------------------------------------------------------
RED_CIRCLE = ShapeObject("red", "circle", "small", "left")
BLUE_SQUARE = ShapeObject("blue", "square", "large", "right")


def test_every_caption_and_prefix_fits_its_own_scene():
    rng = random.Random(0)
    for _ in range(400):
        objs = shapes.sample_objects(rng)
        cap = shapes.sample_caption(objs, rng)
        assert is_template_caption(cap) and text_consistent(cap, objs)
        words = cap.split()
        for i in range(1, len(words)):
            assert text_consistent(" ".join(words[:i]), objs)


def test_consistency_hand_written():
    one, two = [RED_CIRCLE], [RED_CIRCLE, BLUE_SQUARE]
    assert text_consistent("a red", one) and text_consistent("a red circle", two)
    assert not text_consistent("a blue", one)
    assert text_consistent("a red circle.", one) and not text_consistent("a red circle.", two)  # must name both
    assert not text_consistent("a red circle next to", one) and text_consistent("a red circle next to", two)
    assert text_consistent("a small red circle on the", one) and not text_consistent("a small red circle at", one)
    assert text_consistent("a red circle to the left of a blue square.", two)
    assert not text_consistent("a red circle to the right of a blue square.", two)
    assert text_consistent("there are two shapes, a blue square", two)
    assert not text_consistent("there are three shapes", two)
    assert text_consistent("an image of a red circle.", one)
    assert text_consistent("the circle is red.", one) and not text_consistent("the circle is blue.", one)


def test_template_caption_check():
    assert is_template_caption("a small red circle on the left.")
    assert is_template_caption("an orange star.")
    assert not is_template_caption("a orange star.")
    assert not is_template_caption("a red red circle.")
    assert not is_template_caption("a red circle")  # unfinished
    assert not is_template_caption("circle red a.")
    assert shapes.has_repeated_bigram("a red circle and a red circle.")
    assert not shapes.has_repeated_bigram("a red circle and a blue square.")


def test_perturb_changes_one_thing():
    rng = random.Random(3)
    for _ in range(200):
        objs = shapes.sample_objects(rng)
        twin = shapes.perturb(objs, rng)
        assert [o.position for o in twin] == [o.position for o in objs]
        changed = [a != b for a, b in zip(twin, objs, strict=True)]
        assert 1 <= sum(changed) <= 2


# -- grounding ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, objects, any_right, all_right", [
    ("a red circle.", [RED_CIRCLE], True, True),
    ("a small red circle on the left.", [RED_CIRCLE], True, True),
    ("the circle is red.", [RED_CIRCLE], True, True),
    ("a blue circle.", [RED_CIRCLE], False, False),
    ("a red square.", [RED_CIRCLE], False, False),
    ("a red shape and a circle.", [RED_CIRCLE], False, False),
    ("red circle red circle", [RED_CIRCLE], True, False),  # named twice, there is one
    ("a red circle next to a green star.", [RED_CIRCLE], True, False),
    ("a red circle next to a blue square.", [RED_CIRCLE, BLUE_SQUARE], True, True),
    ("a blue square and a small red circle.", [RED_CIRCLE, BLUE_SQUARE], True, True),
    ("a red circle.", [RED_CIRCLE, BLUE_SQUARE], True, False),
    ("a red circle and a green star.", [RED_CIRCLE, BLUE_SQUARE], True, False),
    ("a blue circle and a red square.", [RED_CIRCLE, BLUE_SQUARE], False, False),  # colours swapped
    ("two red circles.", [RED_CIRCLE, ShapeObject("red", "circle", "large", "top")], True, True),
    ("", [RED_CIRCLE], False, False),
])
def test_grounding_hand_written(text, objects, any_right, all_right):
    g = grounding(text, objects)
    assert (g.any_right, g.all_right) == (any_right, all_right), g
