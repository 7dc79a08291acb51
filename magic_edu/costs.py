"""What a decoding step costs: how much work the two models did, counted where they run.

:class:`~magic_edu.models.LanguageModel` and :class:`~magic_edu.models.ImageTextMatcher` each
keep a running :class:`Cost` (their ``cost`` attribute) that their forwards add to; the
:class:`~magic_edu.decoding.Stepper` reads it before and after a step, and the difference is
the step's cost, kept in its :class:`~magic_edu.trace.StepRecord`.

* ``lm_forwards``: sequences (rows) through the LM's transformer; a forward of a (B, S) batch
  counts B. ``lm_tokens``: token positions through it, B x S.
* ``lm_backwards``: backward passes through the LM, counted by rows as ``lm_forwards`` is: ZeroCap
  (:mod:`magic_edu.zerocap`) runs num_iterations per live beam and step; every other decoder 0.
* ``clip_texts``: texts CLIP's text tower embedded; ``clip_text_tokens``: the token positions
  the text tower actually ran (trimmed to the longest text, or the shared prefix once plus the
  packed rest: :mod:`magic_edu.fast.clip_prefix`).
* ``clip_images``: images CLIP's image tower embedded.
* ``seconds``: wall time.

The LM head applied to a chosen candidate's hidden state (``LanguageModel.logits``) is one
matrix product, not a forward, and is not counted. A cost that is not known (a trace file
written before costs were counted) holds -1 in every count and NaN seconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import MagicEduError

COUNTS = ("lm_forwards", "lm_tokens", "lm_backwards", "clip_texts", "clip_text_tokens", "clip_images")


@dataclass
class Cost:
    """Counts of model work (see the module docstring), and wall time."""

    lm_forwards: int = 0
    lm_tokens: int = 0
    lm_backwards: int = 0
    clip_texts: int = 0
    clip_text_tokens: int = 0
    clip_images: int = 0
    seconds: float = 0.0

    @classmethod
    def unknown(cls) -> Cost:
        """The cost of work nobody counted: -1 for every count, NaN seconds."""
        return cls(*[-1] * len(COUNTS), seconds=math.nan)

    @property
    def known(self) -> bool:
        return self.lm_forwards >= 0

    def copy(self) -> Cost:
        return Cost(**asdict(self))

    def __add__(self, other: Cost) -> Cost:
        return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: Cost) -> Cost:
        """The work done between two readings of a running cost: ``after - before``."""
        return Cost(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "cost") -> Cost:
        """A cost as :meth:`to_dict` writes it (null seconds read as NaN), checked."""
        if not isinstance(data, dict):
            raise MagicEduError(f"{what} must be an object; got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise MagicEduError(f"{what}: unknown field {unknown[0]!r}")
        missing = [name for name in (*COUNTS, "seconds") if name not in data]
        if missing:
            raise MagicEduError(f"{what}: missing {', '.join(repr(m) for m in missing)}")
        for name in COUNTS:
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise MagicEduError(f"{what}: {name!r} must be an integer >= 0 (or -1: unknown); got {value!r}")
        seconds = data["seconds"]
        if seconds is None:
            seconds = math.nan
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise MagicEduError(f"{what}: 'seconds' must be a number (or null: unknown); got {seconds!r}")
        return cls(**{name: data[name] for name in COUNTS}, seconds=float(seconds))
