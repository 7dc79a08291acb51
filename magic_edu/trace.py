"""What a decode leaves behind: one record per step, saved and loaded without any model.

A :class:`Trace` is a list of :class:`StepRecord` plus the settings it was made with.
``trace.to_frame()`` gives one row per (step, candidate) with the columns

    step, rank, token, token_id, lm_prob, degeneration_penalty, penalty_position,
    clip_text, clip_cosine, clip_score, score, chosen

where score = (1 - alpha) * lm_prob - alpha * degeneration_penalty + beta * clip_score
for contrastive and MAGIC search (for greedy and sampling, score = lm_prob).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import MagicEduError

FORMAT_VERSION = 1


@dataclass
class StepRecord:
    """One decoding step: the k candidates, their scores, and which one was taken.

    ``penalty_position[i]`` is the earlier position j (0 = first prefix id) whose hidden
    state gave candidate i its degeneration penalty; ``chosen_similarity`` is the chosen
    token's cosine similarity to every earlier position. Columns that a decoder does not
    compute (CLIP for contrastive search, penalties for greedy) hold NaN / "" / -1.
    """

    step: int
    text: str  # the text generated before this step
    token_ids: list[int]
    tokens: list[str]
    lm_prob: list[float]
    degeneration_penalty: list[float]
    penalty_position: list[int]
    clip_text: list[str]
    clip_cosine: list[float]
    clip_score: list[float]
    score: list[float]
    chosen: int  # index into the candidate lists
    forced: bool = False
    chosen_similarity: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.token_ids)

    @property
    def chosen_token_id(self) -> int:
        return self.token_ids[self.chosen]

    @property
    def chosen_token(self) -> str:
        return self.tokens[self.chosen]


@dataclass
class Trace:
    """The settings of a decode and one :class:`StepRecord` per generated token."""

    settings: dict[str, Any]
    prefix_ids: list[int]
    prefix_tokens: list[str]
    steps: list[StepRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepRecord:
        return self.steps[i]

    def __iter__(self):
        return iter(self.steps)

    def to_frame(self) -> pd.DataFrame:
        """A long DataFrame: one row per step and candidate."""
        rows = []
        for s in self.steps:
            for i in range(s.k):
                rows.append(
                    {
                        "step": s.step,
                        "rank": i + 1,
                        "token": s.tokens[i],
                        "token_id": s.token_ids[i],
                        "lm_prob": s.lm_prob[i],
                        "degeneration_penalty": s.degeneration_penalty[i],
                        "penalty_position": s.penalty_position[i],
                        "clip_text": s.clip_text[i],
                        "clip_cosine": s.clip_cosine[i],
                        "clip_score": s.clip_score[i],
                        "score": s.score[i],
                        "chosen": i == s.chosen,
                        "forced": s.forced and i == s.chosen,
                    }
                )
        columns = ["step", "rank", "token", "token_id", "lm_prob", "degeneration_penalty", "penalty_position",
                   "clip_text", "clip_cosine", "clip_score", "score", "chosen", "forced"]
        return pd.DataFrame(rows, columns=columns)

    def chosen_frame(self) -> pd.DataFrame:
        """Only the chosen candidate of every step."""
        df = self.to_frame()
        return df[df["chosen"]].reset_index(drop=True)

    # -- files ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "magic_edu.trace",
            "version": FORMAT_VERSION,
            "settings": self.settings,
            "prefix_ids": self.prefix_ids,
            "prefix_tokens": self.prefix_tokens,
            "steps": [asdict(s) for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        if not isinstance(data, dict) or data.get("format") != "magic_edu.trace":
            raise MagicEduError("trace file: not a magic_edu trace (missing 'format': 'magic_edu.trace')")
        steps = [StepRecord(**s) for s in data["steps"]]
        return cls(data["settings"], data["prefix_ids"], data["prefix_tokens"], steps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace as JSON, atomically (a temporary file renamed into place)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        path = Path(path)
        if not path.is_file():
            raise MagicEduError(f"path: no trace file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MagicEduError(f"path: {path} is not a JSON trace file ({err})") from None
        return cls.from_dict(data)


@dataclass
class Generation:
    """A decoder's output.

    ``text`` is what the reference's output parser yields: the generated ids with start
    tokens dropped, cut at the first EOS, decoded, whitespace collapsed.
    ``token_ids`` holds the generated ids only (no prefix), EOS included if generated.
    """

    text: str
    token_ids: list[int]
    trace: Trace

    def __repr__(self) -> str:
        decoder = self.trace.settings.get("decoder", "?")
        return f"Generation({decoder}: {self.text!r}, {len(self.token_ids)} tokens)"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so a
    crash never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=_json_default, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; a result file is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
