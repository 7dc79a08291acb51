"""The what-if tree: every leaf is the decoder run from its forced prefix, scored as a whole caption."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.figure import Figure

from magic_edu import MagicEduError, Stepper
from magic_edu.presets import ModelSet, data_dir, load_models
from magic_edu.tools import analysis
from magic_edu.tools.whatif import WhatIfTree
from magic_edu.toyworld import shapes
from magic_edu.views.whatif import WhatIfExplorer, plot_whatif

from conftest import make_image

SAMPLERS = ("top_k", "nucleus", "typical")
SETTINGS = {"greedy": {}, "contrastive": {"k": 4, "alpha": 0.4}, "magic": {"k": 4, "alpha": 0.2, "beta": 1.0},
            "top_k": {"k": 6, "seed": 11}, "nucleus": {"p": 0.9, "seed": 12}, "typical": {"mass": 0.9, "seed": 14}}
LENGTH = 8


@pytest.fixture(scope="module")
def models(tiny_lm, tiny_clip) -> ModelSet:
    return ModelSet(name="tiny", kind="caption", lm=tiny_lm, clip=tiny_clip,
                    defaults={"k": 4, "alpha": 0.3, "beta": 1.0, "max_new_tokens": LENGTH})


@pytest.fixture(scope="module")
def image():
    return make_image(5)


def tree_of(models, image, decoder: str) -> WhatIfTree:
    return WhatIfTree(models, decoder, image=image, max_new_tokens=LENGTH, **SETTINGS[decoder])


def forced_decode(models, image, decoder: str, forced: dict[int, int]):
    """The slow, obvious way: a fresh Stepper, step(force=...) at the forced steps, its own choice elsewhere."""
    needs_image = decoder == "magic"
    s = Stepper(models.lm, decoder, clip=models.clip if needs_image else None, image=image if needs_image else None,
                max_new_tokens=LENGTH, **SETTINGS[decoder])
    while not s.done:
        s.step(force=forced.get(s.step_index))
    return s.generation()


def other_candidate(record) -> int:
    """The first candidate index that is not the one the decoder took."""
    return next(i for i in range(record.k) if i != record.chosen)


# -- every leaf is the decoder run from its forced prefix ----------------------------------------
@pytest.mark.parametrize("decoder", list(SETTINGS))
def test_every_leaf_is_the_decoder_run_from_its_forced_prefix(models, image, decoder):
    tree = tree_of(models, image, decoder)
    root = tree.root
    assert len(root.trace.steps) >= 4, "the tiny decode is too short to branch twice"
    plain = forced_decode(models, image, decoder, {})
    assert (root.text, root.token_ids) == (plain.text, plain.token_ids)

    i1 = other_candidate(root.trace.steps[1])
    a = tree.branch(root, 1, i1)
    assert a.parent is root and a.branch_step == 1 and a.path[-1].token_id == root.trace.steps[1].token_ids[i1]
    steps_a = a.trace.steps
    if len(steps_a) > 3:
        i3 = other_candidate(steps_a[3])
        b = tree.branch(a, 3, i3)
        assert b.parent is a
    c = tree.branch(a, 0, other_candidate(steps_a[0]))  # earlier than a's own fork: a sibling of a, from the root
    assert c.parent is root and c.path == (c.fork,)
    for leaf in tree.leaves():
        forced = {f.step: f.token_id for f in leaf.path}
        expected = forced_decode(models, image, decoder, forced)
        assert leaf.token_ids == expected.token_ids, leaf
        assert leaf.text == expected.text
        # every forced token is where the path says, and the tokens before the fork are the parent's
        assert all(leaf.token_ids[f.step] == f.token_id for f in leaf.path)
        if leaf.parent is not None:
            assert leaf.token_ids[:leaf.branch_step] == leaf.parent.token_ids[:leaf.branch_step]
            assert leaf.token_ids[leaf.branch_step] != leaf.parent.token_ids[leaf.branch_step]


@pytest.mark.parametrize("decoder", list(SETTINGS))
def test_a_branch_on_the_chosen_candidate_is_the_parents_decode(models, image, decoder):
    tree = tree_of(models, image, decoder)
    a = tree.branch(tree.root, 1, other_candidate(tree.root.trace.steps[1]))
    for node in (tree.root, a):
        step = min(2, len(node.trace.steps) - 1)
        same = tree.branch(node, step, node.trace.steps[step].chosen)
        assert same.parent is node
        assert (same.text, same.token_ids) == (node.text, node.token_ids)
        a, b = same.scores, node.scores
        assert (a.lm_log_likelihood, a.clip_score) == pytest.approx((b.lm_log_likelihood, b.clip_score), abs=1e-6)
        assert (a.repeated_bigrams, a.names_right, a.right) == (b.repeated_bigrams, b.names_right, b.right)


def test_asking_for_the_same_branch_again_returns_it(models, image):
    tree = tree_of(models, image, "magic")
    a = tree.branch(tree.root, 2, other_candidate(tree.root.trace.steps[2]))
    assert tree.branch(tree.root, 2, a.fork.candidate) is a
    assert tree.branch(a, 2, a.fork.candidate) is a  # a's own fork, asked from a: the same node
    assert len(tree) == 2


# -- scores --------------------------------------------------------------------------------------
def test_scores_are_the_whole_captions_measured_independently(models, image):
    objects = shapes.make_scene(shapes.HELD_OUT_SEED).objects  # any objects: the tiny LM writes no shape words
    tree = WhatIfTree(models, "magic", image=image, objects=objects, max_new_tokens=LENGTH, **SETTINGS["magic"])
    tree.branch(tree.root, 0, 1)
    tree.branch(tree.root, 3, other_candidate(tree.root.trace.steps[3]))
    frame = tree.to_frame()
    assert len(frame) == len(tree.leaves()) == 3
    for leaf, (_, row) in zip(tree.leaves(), frame.iterrows()):
        # LM log-likelihood: the log of p(v|x) the decode recorded for every token it took (EOS included)
        recorded = math.fsum(math.log(s.lm_prob[s.chosen]) for s in leaf.trace.steps)
        assert row["lm_log_likelihood"] == pytest.approx(recorded, abs=1e-4)
        assert row["lm_log_likelihood"] == pytest.approx(analysis.lm_log_likelihood(models.lm, leaf.token_ids))
        # CLIP: the cosine of the image's and the caption's embeddings
        img = models.clip.embed_image(image).double().flatten()
        txt = models.clip.embed_texts([leaf.text]).double().flatten()
        assert row["clip_score"] == pytest.approx(float(txt @ img / (txt.norm() * img.norm())), abs=1e-5)
        words = leaf.text.lower().split()
        bigrams = Counter(itertools.pairwise(words))
        assert row["repeated_bigrams"] == sum(n - 1 for n in bigrams.values())
        assert row["right"] == shapes.grounding(leaf.text, objects).all_right
        assert row["caption"] == leaf.text and row["tokens"] == len(leaf.token_ids)
    branch = frame.iloc[1]
    parent_step = tree.root.trace.steps[0]
    assert branch["forced"] == f"step 0: {analysis.token_label(parent_step.tokens[1])}"
    assert branch["step_score"] == parent_step.score[1]
    assert branch["parent_step_score"] == parent_step.score[parent_step.chosen]


def test_without_a_scene_right_is_unknown_and_best_by_it_is_refused(models, image):
    tree = tree_of(models, image, "greedy")
    assert tree.root.scores.right is None and tree.root.scores.names_right is None
    with pytest.raises(MagicEduError, match="by: no caption has a right"):
        tree.best("right")
    with pytest.raises(MagicEduError, match="by must be one of"):
        tree.best("bleu")


def test_a_locally_better_token_can_lead_to_a_worse_caption_on_the_tiny_models(models, image):
    """Greedy search takes the most probable token at every step; some other candidate leads to a
    whole caption the LM finds more likely (higher total log-likelihood)."""
    tree = tree_of(models, image, "greedy")
    root = tree.root
    found = None
    for t, record in enumerate(root.trace.steps):
        for i in range(record.k):
            if i != record.chosen and found is None:
                node = tree.branch(root, t, i)
                if node.scores.lm_log_likelihood > root.scores.lm_log_likelihood:
                    found = node
    assert found is not None, tree.to_frame()[["forced", "lm_log_likelihood"]]
    row = tree.to_frame().iloc[found.id]
    assert row["step_score"] < row["parent_step_score"]  # locally worse: greedy took the most probable
    assert math.log(row["step_score"]) < math.log(row["parent_step_score"])


def test_the_toy_world_shows_a_locally_better_token_inventing_a_shape():
    """Toy scene 9000000 holds a green and a purple triangle. MAGIC's caption ends "... and a large
    purple square": at that step "square" scores higher than "triangle", but the caption it finishes
    names a purple square the image does not hold, and CLIP likes the whole caption less."""
    if not (data_dir() / "toy" / "defaults.json").is_file():
        pytest.skip(f"the toy models are not in {data_dir() / 'toy'}")
    toy = load_models("toy")
    scene = shapes.make_scene(shapes.HELD_OUT_SEED)
    assert Counter((o.colour, o.shape) for o in scene.objects) == {("green", "triangle"): 1, ("purple", "triangle"): 1}
    tree = WhatIfTree(toy, "magic", image=scene)
    root = tree.root
    assert ("purple", "square") in shapes.named_pairs(root.text)  # invented
    step = next(t for t, s in enumerate(root.trace.steps) if s.chosen_token == "square")
    record = root.trace.steps[step]
    triangle = record.tokens.index("triangle")
    assert record.score[triangle] < record.score[record.chosen]  # locally worse
    other = tree.branch(root, step, triangle)
    assert ("purple", "square") not in shapes.named_pairs(other.text)
    assert ("purple", "triangle") in shapes.named_pairs(other.text)
    assert other.scores.clip_score > root.scores.clip_score  # globally better
    assert tree.best("clip_score") is other


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(models, image):
    tree = tree_of(models, image, "magic")
    n = len(tree.root.trace.steps)
    with pytest.raises(MagicEduError, match=rf"step must be an integer from 0 to {n - 1}"):
        tree.branch(tree.root, n, 0)
    with pytest.raises(MagicEduError, match="step must be"):
        tree.branch(tree.root, -1, 0)
    with pytest.raises(MagicEduError, match="step must be"):
        tree.branch(tree.root, True, 0)
    with pytest.raises(MagicEduError, match=r"candidate_index must be an integer from 0 to 3 \(step 0 has 4"):
        tree.branch(tree.root, 0, 4)
    with pytest.raises(MagicEduError, match="candidate_index"):
        tree.branch(tree.root, 0, "1")
    other = tree_of(models, image, "magic")
    with pytest.raises(MagicEduError, match="node must be a node of this what-if tree"):
        tree.branch(other.root, 0, 1)
    with pytest.raises(MagicEduError, match="node must be"):
        tree.branch("root", 0, 1)
    for decoder in ("beam", "zerocap"):
        with pytest.raises(MagicEduError, match="decoder: a what-if tree forces tokens"):
            WhatIfTree(models, decoder, image=image)
    with pytest.raises(MagicEduError, match="decoder must be one of"):
        WhatIfTree(models, "diverse_beam", image=image)
    with pytest.raises(MagicEduError, match="models must be a ModelSet"):
        WhatIfTree("gpt2", "greedy")
    with pytest.raises(MagicEduError, match="objects must be a list of ShapeObject"):
        WhatIfTree(models, "magic", image=image, objects=["red circle"])
    with pytest.raises(MagicEduError, match="MAGIC search needs clip="):
        WhatIfTree(models.lm, "magic", image=image)
    with pytest.raises(MagicEduError, match="alpha"):
        WhatIfTree(models, "magic", image=image, alpha=2.0)


# -- the picture and the widget --------------------------------------------------------------------
def test_plot_whatif_draws_every_leaf_and_marks_the_best(models, image):
    tree = tree_of(models, image, "magic")
    a = tree.branch(tree.root, 1, other_candidate(tree.root.trace.steps[1]))
    tree.branch(a, 3, other_candidate(a.trace.steps[3])) if len(a.trace.steps) > 3 else None
    best = tree.best("lm_log_likelihood")
    fig = plot_whatif(tree, by="lm_log_likelihood")
    assert isinstance(fig, Figure)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    leaf_boxes = [t for t in texts if "LM log-lik." in t]
    assert len(leaf_boxes) == len(tree)
    starred = [t for t in leaf_boxes if t.startswith("★")]
    assert len(starred) == 1 and starred[0].startswith(f"★ {best.id}:")
    branch_labels = {a.get_text() for ax in fig.axes for a in ax.texts if a.get_text().startswith("step ")}
    assert branch_labels == {n.fork.label() for n in tree.leaves()[1:]}
    with pytest.raises(MagicEduError, match="by must be one of"):
        plot_whatif(tree, by="nope")
    with pytest.raises(MagicEduError, match="tree must be a WhatIfTree"):
        plot_whatif(tree.root)


def test_the_explorer_branches_on_a_click_and_shows_problems_as_messages(models, image):
    w = WhatIfExplorer(models, image, decoder="magic", **SETTINGS["magic"], max_new_tokens=LENGTH)
    assert "Problem" not in w.message.value and bytes(w.plot.value).startswith(b"\x89PNG")
    assert w.selected is w.tree.root
    w.step.value = 2
    record = w.tree.root.trace.steps[2]
    assert [b.description.split(" ")[0] for b in w.candidates.children] == [analysis.token_label(t)
                                                                             for t in record.tokens]
    assert "(taken)" in w.candidates.children[record.chosen].description
    i = other_candidate(record)
    w.candidates.children[i].click()
    assert "Problem" not in w.message.value, w.message.value
    assert len(w.tree) == 2 and w.selected is w.tree.leaves()[1]
    assert w.selected.path[-1].token_id == record.token_ids[i] and w.step.value == 2
    assert isinstance(w.snapshot(), Figure)
    w.by.value = "right"  # no scene: a message, not a traceback
    assert "Problem" in w.message.value and "right" in w.message.value

    broken = WhatIfExplorer(models, None, decoder="magic")  # MAGIC without an image
    assert "Problem" in broken.message.value and "image" in broken.message.value
    assert isinstance(broken.snapshot(), Figure)
    assert broken.choose(0) is None and "no tree" in broken.message.value
