"""CLIP tokenisation that remembers words: open_clip's ids, without redoing them every step.

At every MAGIC step the k candidate texts are the caption so far plus one token, so almost
every word CLIP sees was already tokenised at the previous step. open_clip's
``SimpleTokenizer`` (OpenAI CLIP's BPE) runs ftfy, HTML unescaping, whitespace cleaning,
lower-casing, a regex split and BPE on the whole text each time; in pure Python that is a
large share of a step. :class:`ClipTokenizer` gives exactly the same ids, faster:

For a text of printable ASCII without ``&``, ftfy and ``html.unescape`` change nothing,
lower-casing works character by character, and no regex piece can contain whitespace. So
the ids of the text are the ids of its whitespace-separated words, one after the other:
``encode(t) == sum(encode(w) for w in t.split())``. Each word's ids are remembered, and so
are the ids of each text up to its last space (shared by a step's k texts). A word seen
for the first time skips the cleaning too (for such a word it is just lower-casing) and goes
straight to open_clip's regex split and BPE. Any other text (non-ASCII, ``&``, tabs,
newlines) or any other tokenizer goes through the tokenizer unchanged.
``tests/test_clip_tokens.py`` checks this against open_clip on thousands of random texts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MEMO_WORDS = 200_000  # forget the remembered words beyond this many (a few tens of MB at most)
MEMO_HEADS = 20_000  # and the remembered beginnings of texts


def _remembers_words(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is open_clip's SimpleTokenizer with its default cleaning (lower-case,
    no reduction), the case :class:`ClipTokenizer` speeds up."""
    try:
        from open_clip import tokenizer as oc
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return (type(tokenizer) is oc.SimpleTokenizer and tokenizer.clean_fn is getattr(oc, "_clean_lower", None)
            and tokenizer.reduction_fn is None)


class ClipTokenizer:
    """``tokenizer(texts)`` with rows trimmed to the longest text; same ids as open_clip.

    Rows are ``[start] + ids + [end]``, cut to the context length with the end token kept
    last (open_clip's truncation), zero-padded to the longest row.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.remembers_words = _remembers_words(tokenizer)
        # the same tokenizer (vocabulary, BPE cache) with lower-casing as its only cleaning:
        # what ftfy, html.unescape and whitespace_clean amount to on one printable ASCII word without "&"
        self._plain = copy.copy(tokenizer)
        if self.remembers_words:
            self._plain.clean_fn = str.lower
        self._words: dict[str, list[int]] = {}
        self._heads: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without start and end tokens (``SimpleTokenizer.encode``)."""
        if not (text.isascii() and text.isprintable() and "&" not in text):
            return self.tokenizer.encode(text)
        # the only whitespace in printable ASCII is " "; MAGIC's k texts of a step share all but
        # their last word, so the ids before the last space are remembered too
        cut = text.rfind(" ")
        return self._head_ids(text[:max(cut, 0)]) + self._word_ids(text[cut + 1:])

    def _head_ids(self, head: str) -> list[int]:
        ids = self._heads.get(head)
        if ids is None:
            if len(self._heads) >= MEMO_HEADS:
                self._heads.clear()
            ids = self._heads[head] = [i for word in head.split() for i in self._word_ids(word)]
        return ids

    def _word_ids(self, word: str) -> list[int]:
        ids = self._words.get(word)
        if ids is None:
            if len(self._words) >= MEMO_WORDS:
                self._words.clear()
            ids = self._words[word] = self._plain.encode(word) if word else []
        return ids

    def __call__(self, texts: Sequence[str], trim: bool = True) -> torch.Tensor:
        """(n, L) token ids. ``trim``: L = the longest row's length (exact for a causal text
        tower, which pools the end token); otherwise L = the context length, as open_clip gives."""
        if not self.remembers_words:
            ids = self.tokenizer(list(texts))
            return _trim(ids) if trim else ids
        tok = self.tokenizer
        context, start, end = tok.context_length, [tok.sot_token_id], [tok.eot_token_id]
        rows = [start + self.encode(text) + end for text in texts]
        for row in rows:
            if len(row) > context:  # open_clip's truncation: the end token kept last
                del row[context:]
                row[-1] = tok.eot_token_id
        width = max(map(len, rows), default=1) if trim else context
        padded = np.array([row + [0] * (width - len(row)) for row in rows], dtype=np.int64)  # faster than torch.tensor
        return torch.from_numpy(padded.reshape(len(rows), width))


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding columns at the end (id 0 pads)."""
    used = (ids != 0).any(dim=0).nonzero()
    return ids[:, : int(used.max()) + 1] if len(used) else ids[:, :1]
