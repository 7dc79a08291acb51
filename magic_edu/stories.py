"""Visually grounded stories from a title alone: the paper's story setup (Su et al. 2022, Sec. 4.2).

    >>> models = load_models("story")                            # or "toy-story"
    >>> story = tell_story(models, "a day at the beach", index="images.safetensors")
    >>> story.text, story.image_path                             # the story, and the image that steered it

The title is the story LM's prompt; the image that steers MAGIC is the one of an image index
(:func:`magic_edu.retrieval.build_image_index`, ``magic-edu index-images``) whose CLIP embedding is
closest to the title's (:func:`magic_edu.retrieval.retrieve_image`), as the authors retrieve it
(``story_generation/image_index/``). Give ``image=`` instead to steer with an image of your own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .decoding import magic_search
from .errors import MagicEduError
from .inputs import ImageLike, load_image
from .presets import ModelSet
from .retrieval import ClipIndex, Retrieved, retrieve_image
from .trace import Generation


@dataclass
class Story:
    """A story MAGIC wrote: its title and text, the Generation (trace included), the image that
    steered it, the path of that image when it came from an index, and what the index returned."""

    title: str
    text: str
    generation: Generation
    image: Any  # a PIL image
    image_path: str | None = None
    retrieved: Retrieved | None = None


def tell_story(models: ModelSet, title: str, image: ImageLike | None = None, *,
               index: ClipIndex | str | os.PathLike | None = None, k: int | None = None,
               alpha: float | None = None, beta: float | None = None, max_new_tokens: int | None = None,
               record: bool = True) -> Story:
    """MAGIC's story for ``title``, steered by ``image``, or, without one, by the image of ``index``
    that CLIP finds closest to the title. Settings left out are the preset's (the paper's story
    preset: k 5, alpha 0.6, beta 0.15, 100 tokens counting the title)."""
    if not isinstance(title, str) or not title.strip():
        raise MagicEduError(f"title must be a non-empty string; got {title!r}")
    if (image is None) == (index is None):
        raise MagicEduError("give image= (the image that steers the story) or index= (an image index the title "
                            "retrieves it from), not both and not neither")
    retrieved, path = None, None
    if image is None:
        retrieved = retrieve_image(models.clip, title, index, top_n=5)
        path = retrieved.best
        image = load_image(path, name=f"the retrieved image {path}")
    else:
        image = load_image(image)
    gen = magic_search(models.lm, models.clip, image, prompt=title, k=k, alpha=alpha, beta=beta,
                       max_new_tokens=max_new_tokens, record=record)
    return Story(title, gen.text, gen, image, path, retrieved)
