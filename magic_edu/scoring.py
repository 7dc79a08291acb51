"""The three parts of the magic score, each a small function you can read or swap.

For a candidate token v among the LM's top-k at one step (Su et al. 2022, Eq. 3):

    magic_score(v) = (1 - alpha) * p(v | x)                  model confidence
                     - alpha * max_j cos(h_v, h_j)            degeneration penalty
                     + beta * softmax_k(CLIP(image, x + v))    magic (CLIP) score

Contrastive search (Su et al. 2022, SimCTG) is the same with beta = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .fast.candidate_texts import CandidateTexts
from .models import ImageTextMatcher, LanguageModel


def degeneration_penalty(
    candidate_hidden: torch.Tensor, context_hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_j cos(h_v, h_j) over every previous position j (prefix included).

    candidate_hidden: (B, k, d), the last-layer hidden state of each candidate v;
    context_hidden: (B, T, d), those of the T positions before it.
    Returns (penalty (B, k), the position j that gives it (B, k), all cosines (B, k, T)).
    """
    cosines = F.normalize(candidate_hidden, dim=-1) @ F.normalize(context_hidden, dim=-1).transpose(1, 2)
    penalty, position = cosines.max(dim=-1)
    return penalty, position, cosines


def magic_score(
    lm_prob: torch.Tensor, penalty: torch.Tensor, clip_score: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """(1 - alpha) * lm_prob - alpha * penalty + beta * clip_score, elementwise."""
    return (1.0 - alpha) * lm_prob - alpha * penalty + beta * clip_score


class ClipScorer:
    """The magic score's image term for a batch of rows, k candidates each.

    The text CLIP scores for candidate v of a row is t_v = the last ``clip_text_max_len``
    ids of (generated ids c + [v]), decoded with the LM tokenizer's ``decode`` and cut at
    the EOS string. The prefix (start token, prompt) is never part of it, and the EOS
    candidate is scored as "stop here": its text is c's own.
    clip_score = softmax over the k candidates of logit_scale * cos(image, t_v).
    ``remember=False`` encodes every step's texts afresh (see ``embed_text_groups``): then a
    step taken again after Back gives bit-identical scores.
    """

    def __init__(
        self, lm: LanguageModel, clip: ImageTextMatcher, image_embeddings: torch.Tensor, clip_text_max_len: int = 60,
        remember: bool | None = None,
    ) -> None:
        self.lm, self.clip, self.remember = lm, clip, remember
        self._texts = CandidateTexts(lm)
        self.image_embeddings = image_embeddings  # (B, d), L2-normalised
        self.clip_text_max_len = clip_text_max_len

    def texts(self, generated: Sequence[Sequence[int]], candidate_ids: Sequence[Sequence[int]]) -> list[list[str]]:
        """t_v for every row and candidate."""
        keep = self.clip_text_max_len - 1  # ids of c kept before v
        return self._texts([list(c)[-keep:] if keep else [] for c in generated], candidate_ids)

    def __call__(
        self, generated: Sequence[Sequence[int]], candidate_ids: Sequence[Sequence[int]] | torch.Tensor
    ) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
        """(texts, cosines (B, k), clip scores (B, k)), on CLIP's device.

        ``candidate_ids`` may be a host list: on a GPU, the text work (decoding, CLIP's
        tokenisation) then runs on the CPU while the GPU is still busy with earlier work.
        """
        if isinstance(candidate_ids, torch.Tensor):
            candidate_ids = candidate_ids.tolist()
        texts = self.texts(generated, candidate_ids)
        text_emb = self.clip.embed_text_groups(texts, self.remember)  # (B, k, d); each row's shared prefix encoded once
        image_emb = self.image_embeddings.to(text_emb.device, torch.float64)
        cosines = (text_emb.double() @ image_emb.unsqueeze(-1)).squeeze(-1)
        return texts, cosines, torch.softmax(self.clip.logit_scale * cosines, dim=-1)
