"""A what-if tree: branch a decode on any candidate of any step, let the decoder finish every
branch, and score each finished caption as a whole.

    >>> tree = WhatIfTree(models, "magic", image=scene)     # the plain decode is tree.root
    >>> node = tree.branch(tree.root, 3, 1)                 # step 3 takes its 2nd candidate instead
    >>> tree.branch(node, 5, 0)                             # and, on that branch, step 5 its 1st
    >>> tree.to_frame()                                     # one row per finished caption

Forcing with :class:`~magic_edu.decoding.Stepper` alone throws the old continuation away; the
tree keeps every one. A node is one whole decode: the decoder run from the start with the
tokens of its path (its :class:`Fork` s) forced at their steps and its own choice everywhere
else, so two nodes share every token before the step where they part. Forcing a token the
decoder would have taken anyway changes nothing: it is taken as the decoder's own choice (a
sampler then keeps its draw, so a branch on the chosen candidate is the parent's decode); a
forced sampling step draws nothing, so the sampler's next step takes the draw the forced step
would have used (the seed is the plain decode's). Each node's caption is a leaf of the token
tree, so ``leaves()`` lists every node.

A caption's scores (:class:`CaptionScores`): total LM log-likelihood of its tokens (EOS
included if generated), CLIP's cosine of the whole caption and the image, its repeated word
bigrams, and, for a ShapesWorld scene (its objects known), whether it names what is in the
image and invents nothing (:func:`~magic_edu.toyworld.shapes.grounding`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from ..decoding import Stepper
from ..errors import MagicEduError
from ..inputs import ImageLike, load_image
from ..models import ImageTextMatcher, LanguageModel
from ..registry import get_decoder
from ..toyworld.shapes import Scene, ShapeObject, grounding
from ..trace import Generation, Trace
from . import analysis

SCORES = ("lm_log_likelihood", "clip_score", "repeated_bigrams", "right")  # what a leaf can be ranked by
HIGHER_IS_BETTER = {"lm_log_likelihood": True, "clip_score": True, "repeated_bigrams": False, "right": True}


@dataclass(frozen=True)
class Fork:
    """One forced token: at ``step``, the candidate of rank ``candidate`` (0 = first), ``token_id``."""

    step: int
    candidate: int
    token_id: int
    token: str

    def label(self) -> str:
        """``'step 3: ␣red'``: the step and the forced token, made visible."""
        return f"step {self.step}: {analysis.token_label(self.token)}"


@dataclass(frozen=True)
class CaptionScores:
    """A finished caption scored as a whole.

    ``lm_log_likelihood``: sum of log p(token | prefix, earlier tokens) under the LM
    (:func:`~magic_edu.tools.analysis.lm_log_likelihood`); ``clip_score``: cos(CLIP image, CLIP
    text) of the whole caption (:func:`~magic_edu.tools.analysis.caption_clip_score`; NaN without
    CLIP or image); ``repeated_bigrams``: word bigrams that repeat an earlier one; ``names_right``
    / ``right``: it names an object of the scene / exactly the scene's objects (None: no scene).
    """

    lm_log_likelihood: float
    clip_score: float
    repeated_bigrams: int
    names_right: bool | None
    right: bool | None


@dataclass(eq=False)
class WhatIfNode:
    """One whole decode of a :class:`WhatIfTree`: the forks of its path, its generation and scores.

    ``parent`` is the node it parts from at ``fork.step`` (the two share every token before it);
    the root has no parent and no fork.
    """

    id: int
    parent: WhatIfNode | None
    fork: Fork | None
    path: tuple[Fork, ...]
    generation: Generation
    scores: CaptionScores
    children: list[WhatIfNode] = field(default_factory=list)
    tree: WhatIfTree | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def token_ids(self) -> list[int]:
        return self.generation.token_ids

    @property
    def trace(self) -> Trace:
        return self.generation.trace

    @property
    def branch_step(self) -> int:
        """The step where it parts from its parent (-1 for the root)."""
        return -1 if self.fork is None else self.fork.step

    def __repr__(self) -> str:
        forks = ", ".join(f.label() for f in self.path) or "plain decode"
        return f"WhatIfNode({self.id}: {forks} -> {self.text!r})"


class WhatIfTree:
    """Branch one decode on any candidate of any step; the decoder finishes every branch.

    ``models``: a :class:`~magic_edu.presets.ModelSet` (its ``lm`` and ``clip``) or a
    LanguageModel (then CLIP, if any, as ``clip=``). ``image``: the image, or a ShapesWorld
    :class:`~magic_edu.toyworld.shapes.Scene` (its objects then judge each caption); ``objects``:
    the scene's objects for an image given as a picture. ``settings``: the decoder's, as for
    :class:`~magic_edu.decoding.Stepper` (k, alpha, beta, seed, max_new_tokens, prompt, ...). A
    sampler's seed, if not given, is drawn once and shared by every branch.

    Beam search and ZeroCap are refused: a step advances every beam, so no token can be forced.
    """

    def __init__(self, models: Any, decoder: str = "magic", image: ImageLike | Scene | None = None, *,
                 clip: ImageTextMatcher | None = None, objects: Sequence[ShapeObject] | None = None,
                 **settings: Any) -> None:
        spec = get_decoder(decoder)
        if spec.beams or spec.steers:
            raise MagicEduError(f"decoder: a what-if tree forces tokens, and {spec.label} cannot be forced (a step "
                                "advances every beam at once); use greedy, a sampler, contrastive or MAGIC search")
        self.lm, self.clip = _models(models, clip)
        if isinstance(image, Scene):
            if objects is not None:
                raise MagicEduError("objects: give either a Scene as image= (its objects are used) or objects=, "
                                    "not both")
            image, objects = image.image, image.objects
        if objects is not None and not (isinstance(objects, (list, tuple))
                                        and all(isinstance(o, ShapeObject) for o in objects)):
            raise MagicEduError(f"objects must be a list of ShapeObject (a toy scene's objects); got {objects!r}")
        self.decoder = spec.name
        self.image = None if image is None else load_image(image)
        self.objects = None if objects is None else list(objects)
        self.settings = dict(settings)
        self.prompt = settings.get("prompt")
        self._nodes: list[WhatIfNode] = []
        root_stepper = self._stepper()
        if spec.samples:  # every branch draws from the same seed as the plain decode
            self.settings["seed"] = root_stepper.params["seed"]
        self.root = self._add(None, None, (), root_stepper.run()[0])

    # -- building ------------------------------------------------------------------------
    def _stepper(self) -> Stepper:
        needs_image = get_decoder(self.decoder).needs_image
        return Stepper(self.lm, self.decoder, clip=self.clip if needs_image else None,
                       image=self.image if needs_image else None, **self.settings)

    def _decode(self, path: tuple[Fork, ...]) -> Generation:
        """The decoder run from the start with ``path``'s tokens at their steps (a token it would
        have taken anyway is its own choice: stepped, not forced)."""
        stepper, forced = self._stepper(), {f.step: f.token_id for f in path}
        while not stepper.done:
            want = forced.get(stepper.step_index)
            record = stepper.step()
            if want is not None and record.chosen_token_id != want:
                stepper.back()
                stepper.step(force=want)
        return stepper.generation()

    def _add(self, parent: WhatIfNode | None, fork: Fork | None, path: tuple[Fork, ...], gen: Generation
             ) -> WhatIfNode:
        node = WhatIfNode(len(self._nodes), parent, fork, path, gen, self.score(gen), tree=self)
        self._nodes.append(node)
        if parent is not None:
            parent.children.append(node)
        return node

    def score(self, generation: Generation) -> CaptionScores:
        """A finished caption's :class:`CaptionScores`."""
        text = generation.text
        clip = (float(analysis.caption_clip_score(self.clip, self.image, text))
                if self.clip is not None and self.image is not None else math.nan)
        repeats = sum(c - 1 for c in analysis.repeated_ngrams(text, 2).values())
        ground = None if self.objects is None else grounding(text, self.objects)
        return CaptionScores(analysis.lm_log_likelihood(self.lm, generation.token_ids, self.prompt), clip, repeats,
                             None if ground is None else ground.any_right, None if ground is None else ground.all_right)

    def branch(self, node: WhatIfNode, step: int, candidate_index: int) -> WhatIfNode:
        """The decode that takes ``node``'s candidate ``candidate_index`` (rank - 1) at ``step``, with
        ``node``'s forced tokens before that step, finished by the decoder.

        The new node hangs where it parts: from the deepest node on ``node``'s path that parted
        before ``step`` (so a branch at an earlier step than ``node``'s own is a sibling higher
        up). Asking for a branch the tree has already returns that node.
        """
        if not isinstance(node, WhatIfNode) or node.tree is not self:
            raise MagicEduError(f"node must be a node of this what-if tree (tree.root or one tree.branch returned); "
                                f"got {node!r}")
        steps = node.trace.steps
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(steps):
            raise MagicEduError(f"step must be an integer from 0 to {len(steps) - 1} (node {node.id}'s decode has "
                                f"{len(steps)} steps); got {step!r}")
        record = steps[step]
        if (isinstance(candidate_index, bool) or not isinstance(candidate_index, int)
                or not 0 <= candidate_index < record.k):
            raise MagicEduError(f"candidate_index must be an integer from 0 to {record.k - 1} (step {step} has "
                                f"{record.k} candidates); got {candidate_index!r}")
        parent = node
        while parent.branch_step >= step:
            parent = parent.parent
        fork = Fork(step, candidate_index, record.token_ids[candidate_index], record.tokens[candidate_index])
        for child in parent.children:
            if child.fork.step == step and child.fork.token_id == fork.token_id:
                return child
        path = parent.path + (fork,)
        return self._add(parent, fork, path, self._decode(path))

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._nodes)

    def leaves(self) -> list[WhatIfNode]:
        """Every finished caption, one per node, root first, then in the order they were made."""
        return list(self._nodes)

    def best(self, by: str = "clip_score") -> WhatIfNode:
        """The leaf with the best score ``by`` (one of :data:`SCORES`; the first made on a tie)."""
        if by not in SCORES:
            raise MagicEduError(f"by must be one of {', '.join(SCORES)}; got {by!r}")
        values = [_value(node.scores, by) for node in self._nodes]
        if all(math.isnan(v) for v in values):
            raise MagicEduError(f"by: no caption has a {by} (clip_score needs CLIP and the image, right a scene's "
                                "objects)")
        sign = 1.0 if HIGHER_IS_BETTER[by] else -1.0
        return max(zip(self._nodes, values), key=lambda nv: -math.inf if math.isnan(nv[1]) else sign * nv[1])[0]

    def to_frame(self) -> pd.DataFrame:
        """One row per leaf: node, parent, its forks (``forced``, e.g. ``"step 2: ␣red; step 5: ␣star"``),
        the caption, its token count, and its scores; ``step_score`` is the forced candidate's score
        at its step (its decoder's score there: MAGIC's, contrastive's, or p for greedy and samplers),
        ``parent_step_score`` the score of the candidate the parent took at that step."""
        rows = []
        for node in self._nodes:
            step_score = parent_score = math.nan
            if node.fork is not None:
                record = node.parent.trace.steps[node.fork.step]
                step_score, parent_score = record.score[node.fork.candidate], record.score[record.chosen]
            rows.append({"node": node.id, "parent": -1 if node.parent is None else node.parent.id,
                         "branch_step": node.branch_step, "forced": "; ".join(f.label() for f in node.path),
                         "caption": node.text, "tokens": len(node.token_ids), "step_score": step_score,
                         "parent_step_score": parent_score, **asdict(node.scores)})
        return pd.DataFrame(rows)


def _value(scores: CaptionScores, by: str) -> float:
    value = getattr(scores, by)
    return math.nan if value is None else float(value)


def _models(models: Any, clip: ImageTextMatcher | None) -> tuple[LanguageModel, ImageTextMatcher | None]:
    """(lm, clip) from a model set or a language model."""
    if isinstance(models, LanguageModel):
        return models, clip
    if hasattr(models, "lm") and hasattr(models, "clip"):
        if clip is not None:
            raise MagicEduError("clip: a model set brings its own CLIP; give clip= only with a LanguageModel")
        return models.lm, models.clip
    raise MagicEduError(f"models must be a ModelSet (load_models) or a LanguageModel; got {type(models).__name__}")
