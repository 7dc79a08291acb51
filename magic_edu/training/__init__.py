"""Training code, apart from the model library: the SimCTG objective (:mod:`.simctg`) and the
domain adaptation of a language model to a corpus of texts (:mod:`.adapt`, ``magic-edu adapt-lm``).

    >>> from magic_edu.training import AdaptConfig, adapt_lm
    >>> adapt_lm(AdaptConfig(corpus="captions.txt", out="runs/coco-lm"))   # the authors' MSCOCO recipe
"""

from .adapt import AdaptConfig, AdaptResult, adapt_lm, self_similarity_of
from .simctg import contrastive_loss, mle_loss, self_similarity, simctg_loss

__all__ = ["AdaptConfig", "AdaptResult", "adapt_lm", "contrastive_loss", "mle_loss", "self_similarity",
           "self_similarity_of", "simctg_loss"]
