"""The texts CLIP scores at a MAGIC step, built without decoding k near-identical id lists.

At every step the k candidate texts are the caption so far plus one token each. Decoding the
caption once and appending each candidate's own text is exact for the two decoders the GPT-2
family uses (argued in :meth:`CandidateTexts.__call__`); anything else is decoded in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models import LanguageModel


def decoder_kind(tokenizer: Any) -> str | None:
    """How a tokenizer turns ids into text: ``"bytes"`` (a fast tokenizer with a byte-level
    decoder: the UTF-8 text of the tokens' bytes), ``"pieces"`` (a fast tokenizer whose tokens
    each become their own piece: a WordPiece decoder, or no decoder, which joins tokens with
    spaces), or None (anything else: decode in full)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no promise about how it decodes
        return None
    decoder = backend.decoder
    if decoder is None:
        return "pieces"
    return {"ByteLevel": "bytes", "WordPiece": "pieces"}.get(type(decoder).__name__)


class CandidateTexts:
    """``lm.clip_texts([ids + [v] for v in row])`` for many rows, each ``ids`` decoded once."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.kind = decoder_kind(lm.tokenizer)
        self._pieces: dict[int, str] = {}

    def __call__(self, batch: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[list[str]]:
        """For each ``ids`` in ``batch`` and its ``row`` of candidates, the CLIP texts of
        ``ids + [v]`` for v in row.

        A byte-level BPE (GPT-2's) decodes a sequence as the UTF-8 text of its tokens' bytes, so
        when the bytes of ``ids`` end at a character boundary (no U+FFFD in their text) the text
        of ``ids + [v]`` is that text followed by v's. A WordPiece decoder turns each token into
        its own piece (a space before every token but the first, none before a ``##`` piece,
        then its clean-up), and a fast tokenizer without a decoder joins tokens with spaces, so
        there the text of ``ids + [v]`` is that text followed by v's piece. Other decoders, and
        texts with U+FFFD, are decoded in full (all such rows in one call).
        """
        lm = self.lm
        out: list[list[str] | None] = [None] * len(batch)
        if self.kind is not None:
            eos = lm.eos_token
            for i, (base, row) in enumerate(zip(lm.decode_batch(batch), candidates)):
                if self.kind == "bytes" and "\ufffd" not in base:
                    out[i] = [(base + piece).split(eos, 1)[0] for piece in lm.token_texts(row)]
                elif self.kind == "pieces":
                    pieces = self._following_pieces(row) if batch[i] else lm.token_texts(row)
                    out[i] = [(base + piece).split(eos, 1)[0] for piece in pieces]
        todo = [i for i, texts in enumerate(out) if texts is None]
        if todo:
            whole = lm.clip_texts([list(batch[i]) + [int(v)] for i in todo for v in candidates[i]])
            for i in todo:
                out[i], whole = whole[: len(candidates[i])], whole[len(candidates[i]):]
        return out  # type: ignore[return-value]

    def _following_pieces(self, token_ids: Sequence[int]) -> list[str]:
        """For a WordPiece decoder: the text each token adds after at least one other token."""
        lm = self.lm
        missing = [i for i in dict.fromkeys(int(t) for t in token_ids) if i not in self._pieces]
        if missing:
            lead = lm.decode([lm.eos_token_id])
            texts = lm.decode_batch([[lm.eos_token_id, i] for i in missing])
            self._pieces.update((i, text[len(lead):]) for i, text in zip(missing, texts))
        return [self._pieces[int(t)] for t in token_ids]
