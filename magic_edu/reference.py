"""All of MAGIC in one plain loop: slow, obviously correct, the oracle for the fast code.

No KV cache, no batching, no trimming: every step re-runs the LM on the whole sequence,
runs it once more for every candidate, and encodes every candidate text with CLIP at
open_clip's full context length. With ``clip=None`` (or beta = 0) it is contrastive search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import ImageTextMatcher, LanguageModel


@torch.no_grad()
def magic_reference(
    lm: LanguageModel, clip: ImageTextMatcher | None, image, *, k: int, alpha: float, beta: float,
    prompt: str | None = None, max_new_tokens: int = 16, clip_text_max_len: int = 60, stop_at_eos: bool = True,
) -> list[int]:
    """The generated ids of MAGIC search (Su et al. 2022, Eq. 3); contrastive search if clip is None."""
    prefix = lm.prefix_ids(prompt)
    if clip is not None:
        pixels = clip.preprocess(image)[None].to(clip.device, next(clip.model.parameters()).dtype)
        image_embedding = F.normalize(clip.model.encode_image(pixels), dim=-1)[0]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        out = lm.model(torch.tensor([prefix + generated], device=lm.device), output_hidden_states=True)
        probs = torch.softmax(out.logits[0, -1].double(), dim=-1)  # p(v | x), whole vocabulary
        context = out.hidden_states[-1][0].double()  # h_j for every previous position, prefix included
        top_probs, top_ids = probs.topk(k)  # most probable first

        # the magic (CLIP) score: softmax over the k candidates of logit_scale * cos(image, text)
        clip_scores = torch.zeros(k, dtype=torch.float64)
        if clip is not None:
            texts = [lm.decode((generated + [v])[-clip_text_max_len:]).split(lm.eos_token)[0] for v in top_ids.tolist()]
            text_embedding = F.normalize(clip.model.encode_text(clip.tokenizer(texts).to(clip.device)), dim=-1)
            cosines = (text_embedding.double() @ image_embedding.double()).cpu()
            clip_scores = torch.softmax(clip.logit_scale * cosines, dim=0)

        best, best_score = None, None
        for p, v, clip_score in zip(top_probs.tolist(), top_ids.tolist(), clip_scores.tolist()):
            with_v = lm.model(torch.tensor([prefix + generated + [v]], device=lm.device), output_hidden_states=True)
            h_v = with_v.hidden_states[-1][0, -1].double()
            penalty = max(F.cosine_similarity(h_v, h_j, dim=0).item() for h_j in context)
            score = (1 - alpha) * p - alpha * penalty + beta * clip_score
            if best_score is None or score > best_score:  # a tie keeps the more probable
                best, best_score = v, score
        generated.append(best)
        if stop_at_eos and best == lm.eos_token_id:
            break
    return generated
