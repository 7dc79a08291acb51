"""Small, model-light measurements of decodes, shared by the plots, the widgets and the notebooks.

* :func:`token_label`: a token's text made visible (spaces, newlines, special tokens).
* :func:`score_parts`: the three parts of one step's magic score, per candidate.
* :func:`degeneration_matrix`: the cosine similarities between generated tokens' hidden states,
  rebuilt from a trace (no model needed), and the pairs that gave each step its penalty.
* :func:`output_path`, :func:`chosen_ids`: the candidate behind every output token (for beam
  search, the returned hypothesis traced back through the beams).
* :func:`divergence_step`: where several decodes stop agreeing.
* :func:`repeated_ngrams`: word n-grams that occur more than once in a text.
* :func:`lm_log_likelihood`, :func:`caption_clip_score`: how likely a text is under the LM,
  and how well a whole text matches an image according to CLIP.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import MagicEduError
from ..inputs import ImageLike, load_image
from ..registry import Decoder, get_decoder
from ..trace import Generation, Trace

TraceLike = Trace | Generation | str | os.PathLike

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}  # (DejaVu Sans, matplotlib's font, has these glyphs)
_SPECIAL = re.compile(r"^<[|\-](.+?)[|\-]>$")  # <|endoftext|>, <-start_of_text->


def as_trace(source: TraceLike) -> Trace:
    """A Trace from a Trace, a Generation or the path of a saved trace."""
    if isinstance(source, Trace):
        return source
    if isinstance(source, Generation):
        return source.trace
    if isinstance(source, (str, os.PathLike)):
        return Trace.load(source)
    raise MagicEduError(f"trace must be a Trace, a Generation or the path of a saved trace; "
                        f"got {type(source).__name__}")


def token_label(text: str) -> str:
    """A token's text with its invisible parts shown: ' ' -> '␣', newline -> '↵', tab -> '⇥',
    other control characters as ``\\xNN`` (carriage return: ``\\x0d``), '' -> '∅', and special tokens such as
    ``<|endoftext|>`` as ``⟨endoftext⟩``."""
    special = _SPECIAL.match(text.strip())
    if special:
        return f"⟨{special.group(1)}⟩"
    if text == "":
        return "∅"
    return "".join(_VISIBLE.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch) for ch in text)


def trace_decoder(trace: Trace) -> Decoder | None:
    """The registry's description of the decoder that wrote ``trace`` (None for a name it does
    not know, e.g. a trace saved by another version)."""
    try:
        return get_decoder(trace.settings.get("decoder"))
    except MagicEduError:
        return None


def is_beam_trace(trace: Trace) -> bool:
    """Whether ``trace`` was written by a decoder that keeps several beams (beam search)."""
    decoder = trace_decoder(trace)
    return decoder is not None and decoder.beams


def scores_candidates(trace: Trace) -> bool:
    """Whether ``trace``'s decoder scores its candidates (degeneration penalty, CLIP score),
    as contrastive and MAGIC search do; False for a decoder the registry does not know."""
    decoder = trace_decoder(trace)
    return decoder is not None and decoder.scores_candidates


def score_parts(trace: Trace, step: int) -> dict[str, np.ndarray]:
    """The parts of one step's score, one value per candidate (in rank order).

    For a decoder that scores candidates (:func:`scores_candidates`: contrastive and MAGIC
    search): ``lm`` = (1 - alpha) p(v|x), ``penalty`` = - alpha penalty(v), ``clip`` = beta
    clip_score(v) (0 without CLIP), and ``score`` = their sum, as recorded. For the others
    (greedy, sampling, a decoder the registry does not know) the score is p(v|x) alone:
    ``lm`` = p, the rest 0.
    """
    record = trace.steps[step]
    lm_prob = np.asarray(record.lm_prob, dtype=float)
    zeros = np.zeros_like(lm_prob)
    if not scores_candidates(trace):
        return {"lm": lm_prob, "penalty": zeros, "clip": zeros.copy(), "score": np.asarray(record.score, float)}
    alpha = float(trace.settings.get("alpha", 0.0))
    beta = float(trace.settings.get("beta", 0.0))
    clip = np.nan_to_num(np.asarray(record.clip_score, dtype=float)) * beta
    return {
        "lm": (1.0 - alpha) * lm_prob,
        "penalty": -alpha * np.asarray(record.degeneration_penalty, dtype=float),
        "clip": clip,
        "score": np.asarray(record.score, dtype=float),
    }


def degeneration_matrix(trace: Trace) -> tuple[np.ndarray, list[int]]:
    """(M, penalty_positions): M[t, j] = cos(h of the token generated at step t, h at position j)
    for every earlier position j (prefix first, then generated tokens), 1 at j = P + t (the token
    itself) and NaN after it; P = len(prefix). ``penalty_positions[t]`` is the position whose
    similarity gave step t's chosen token its degeneration penalty.

    Built from each step's ``chosen_similarity``, so it needs a contrastive or MAGIC trace.
    """
    if not trace.steps or not all(s.chosen_similarity for s in trace.steps):
        raise MagicEduError("degeneration matrix: needs a contrastive or MAGIC trace with at least one step "
                            f"(decoder {trace.settings.get('decoder')!r} records no hidden-state similarities)")
    p, n = len(trace.prefix_ids), len(trace.steps)
    matrix = np.full((n, p + n), np.nan)
    for t, record in enumerate(trace.steps):
        sims = record.chosen_similarity[: p + t]
        matrix[t, : len(sims)] = sims
        matrix[t, p + t] = 1.0
    positions = [int(s.penalty_position[s.chosen]) for s in trace.steps]
    return matrix, positions


def output_path(trace: Trace) -> list[tuple[int, int]]:
    """(step, candidate index) of every output token, in order: each step's chosen candidate; for
    beam search, the returned hypothesis (the best ``hypothesis_score``, the earlier on a tie; while
    none has finished, the best beam of the last step) traced back through the beams; for ZeroCap,
    its best beam after the last step (beam 0), traced back through the beams and the finished
    beams it kept (``kept_beam``)."""
    decoder = trace_decoder(trace)
    if decoder is not None and decoder.steers and trace.steps:
        return _traced_back(trace, len(trace.steps) - 1, 0)
    if not is_beam_trace(trace):
        return [(t, s.chosen) for t, s in enumerate(trace.steps)]
    end, best = None, -math.inf
    for t, record in enumerate(trace.steps):
        for i, score in enumerate(record.hypothesis_score):
            if score > best:
                end, best = (t, i), score
    if end is None and trace.steps and 0 in trace.steps[-1].next_beam:
        end = (len(trace.steps) - 1, trace.steps[-1].next_beam.index(0))
    return [] if end is None else _traced_back(trace, end[0], trace.steps[end[0]].next_beam[end[1]], end[1])


def _traced_back(trace: Trace, step: int, beam: int, candidate: int | None = None) -> list[tuple[int, int]]:
    """The (step, candidate) path of the hypothesis that is beam ``beam`` after ``step`` (reached
    by ``candidate`` when given: a finished beam search hypothesis is no beam afterwards): at every
    step the candidate that became that beam, or, where a finished beam was kept as it was
    (ZeroCap's ``kept_beam``), no token and the beam it was before."""
    path = []
    while step >= 0:
        record = trace.steps[step]
        if candidate is None and record.kept_beam and record.kept_beam[beam] >= 0:
            beam = record.kept_beam[beam]  # a finished beam, unchanged by this step
        else:
            i = record.next_beam.index(beam) if candidate is None else candidate
            path.append((step, i))
            beam = record.beam[i]
        step, candidate = step - 1, None
    return path[::-1]


def chosen_ids(trace: Trace) -> list[int]:
    """The output's tokens, one per :func:`output_path` entry (for all decoders but beam search:
    the token taken at every step)."""
    return [trace.steps[t].token_ids[i] for t, i in output_path(trace)]


def divergence_step(sequences: Sequence[Sequence[Any]]) -> int | None:
    """The first step at which the sequences are not all equal (a sequence that has ended
    differs from one that goes on); None if they are identical."""
    seqs = [list(s) for s in sequences]
    if len(seqs) < 2:
        return None
    for i in range(max(len(s) for s in seqs)):
        if len({s[i] if i < len(s) else None for s in seqs}) > 1:
            return i
    return None


def repeated_ngrams(text: str, n: int = 2) -> dict[str, int]:
    """Word n-grams (lower-cased, whitespace-separated) that occur more than once -> count."""
    if not isinstance(text, str):
        raise MagicEduError(f"text must be a string; got {type(text).__name__}")
    if not isinstance(n, int) or n < 1:
        raise MagicEduError(f"n must be an integer >= 1; got {n!r}")
    words = text.lower().split()
    counts = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return {gram: c for gram, c in counts.items() if c > 1}


def token_log_probs(lm: Any, token_ids: Sequence[int] | str, prompt: str | None = None) -> list[float]:
    """log p(token | prefix, earlier tokens) for every token, under ``lm`` (a LanguageModel).

    ``token_ids`` are the generated ids (a Generation's, EOS included if generated) or a text,
    which is tokenised. The prefix is the one decoding used: start token and ``prompt``.
    """
    if isinstance(token_ids, str):
        token_ids = lm.tokenizer(token_ids, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in token_ids]
    if not ids:
        return []
    prefix = lm.prefix_ids(prompt)
    if len(prefix) + len(ids) > lm.context_length:
        raise MagicEduError(f"text: {len(prefix)} prefix ids plus {len(ids)} tokens exceed the model's "
                            f"context of {lm.context_length} tokens")
    logits, _, _ = lm.forward(torch.tensor([prefix + ids], device=lm.device))
    logp = torch.log_softmax(logits[0, len(prefix) - 1:-1].double(), dim=-1)
    return logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()


def lm_log_likelihood(lm: Any, token_ids: Sequence[int] | str, prompt: str | None = None) -> float:
    """Sum of :func:`token_log_probs` (0 for an empty text); divide by the length for a per-token value."""
    return float(math.fsum(token_log_probs(lm, token_ids, prompt)))


def caption_clip_score(clip: Any, image: ImageLike, texts: str | Sequence[str]) -> float | np.ndarray:
    """cos(CLIP_image(image), CLIP_text(text)) of whole texts: a float for one text, an array for
    a list. The raw cosine MAGIC's CLIP term starts from (no "A photo depicts" prefix, no x 2.5)."""
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    if not items:
        return np.zeros(0)
    image_emb = clip.embed_image(load_image(image))
    cos = (clip.embed_texts(items).double() @ image_emb.double().to(clip.device)).cpu().numpy()
    return float(cos[0]) if single else cos
