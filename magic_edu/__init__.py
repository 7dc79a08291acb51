"""magic_edu: learn MAGIC (Su et al. 2022, "Language Models Can See") by stepping through it.

A language model proposes its top-k next tokens; CLIP re-ranks them by how well the text
so far plus each token matches an image. Everything below is importable from here.
"""

from .costs import Cost
from .decoding import (
    Stepper,
    beam_search,
    clip_retrieval_search,
    contrastive_search,
    greedy_search,
    magic_search,
    nucleus_sampling,
    top_k_sampling,
    typical_sampling,
    zerocap_search,
)
from .errors import MagicEduError
from .filters import filtered_probs, nucleus_filter, temperature, top_k_filter, typical_filter
from .inputs import load_image
from .models import ImageTextMatcher, LanguageModel
from .photos import list_sample_photos, load_sample_photo, load_user_image
from .presets import ModelNotDownloadedError, ModelSet, list_presets, load_models
from .retrieval import (
    ClipIndex,
    Retrieved,
    build_image_index,
    build_text_index,
    clip_retrieval,
    load_index,
    retrieve_image,
)
from .scoring import degeneration_penalty, magic_score
from .stories import Story, tell_story
from .trace import Generation, StepRecord, Trace

__version__ = "0.1.0"

__all__ = [
    "ClipIndex",
    "Cost",
    "Generation",
    "ImageTextMatcher",
    "LanguageModel",
    "MagicEduError",
    "ModelNotDownloadedError",
    "ModelSet",
    "Retrieved",
    "StepRecord",
    "Stepper",
    "Story",
    "Trace",
    "beam_search",
    "build_image_index",
    "build_text_index",
    "clip_retrieval",
    "clip_retrieval_search",
    "contrastive_search",
    "degeneration_penalty",
    "filtered_probs",
    "greedy_search",
    "list_presets",
    "list_sample_photos",
    "load_image",
    "load_index",
    "load_models",
    "load_sample_photo",
    "load_user_image",
    "magic_score",
    "magic_search",
    "nucleus_filter",
    "nucleus_sampling",
    "retrieve_image",
    "tell_story",
    "temperature",
    "top_k_filter",
    "top_k_sampling",
    "typical_filter",
    "typical_sampling",
    "zerocap_search",
]
