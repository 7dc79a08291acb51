"""What a decode leaves behind: one record per step, saved and loaded without any model.

A :class:`Trace` is a list of :class:`StepRecord` plus the settings it was made with.
``trace.to_frame()`` gives one row per (step, candidate) with the columns

    step, rank, token, token_id, lm_prob, degeneration_penalty, penalty_position,
    clip_text, clip_cosine, clip_score, score, wins_beta_low, wins_beta_high, wins_alpha_low,
    wins_alpha_high, sample_prob, beam, next_beam,
    hypothesis_score, steered_prob, fused_prob, chosen, forced, lm_forwards, lm_tokens, lm_backwards, clip_texts,
    clip_text_tokens, clip_images, seconds

where score = (1 - alpha) * lm_prob - alpha * degeneration_penalty + beta * clip_score
for contrastive and MAGIC search; after score come four columns derived from the stored ones
(:mod:`magic_edu.tools.explain`, not saved in the file): wins_beta_low, wins_beta_high (the beta
interval, alpha fixed at the decode's, in which the candidate would win; low inf where it never
does) and wins_alpha_low, wins_alpha_high (the alpha interval in [0, 1], beta fixed; NaN where
it never wins), NaN for the decoders that do not score candidates and for beta without CLIP;
for greedy and sampling, score = lm_prob, and sampling adds sample_prob, the probability of
being drawn (the filtered distribution); for beam search,
score is the cumulative log-probability of the beam plus the candidate, and beam, next_beam
and hypothesis_score say where each candidate came from and went (see :class:`StepRecord`);
for ZeroCap, lm_prob is p0 (the LM unsteered), steered_prob p after the last gradient step,
clip_score CLIP's target and fused_prob q (see :class:`StepRecord`).
The last seven columns are the step's cost (:mod:`magic_edu.costs`), the same on every row of
a step.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .costs import COUNTS, Cost
from .errors import MagicEduError

# 2: the sampling and beam columns (version 1 files load, without them);
# 3: each step's cost and the trace's setup cost (older files load them as unknown: -1 / NaN)
# 4: ZeroCap's columns (steered_prob, fused_prob; older files load them as NaN) and its per-iteration
#    lists (iteration_probs, iteration_targets; older files: empty)
# 5: ZeroCap's kept_beam (which beams after a step are finished ones kept as they were; older files: empty)
FORMAT_VERSION = 5


@dataclass
class StepRecord:
    """One decoding step: the k candidates, their scores, and which one was taken.

    ``penalty_position[i]`` is the earlier position j (0 = first prefix id) whose hidden
    state gave candidate i its degeneration penalty; ``chosen_similarity`` is the chosen
    token's cosine similarity to every earlier position. Columns that a decoder does not
    compute (CLIP for contrastive search, penalties for greedy) hold NaN / "" / -1.

    Sampling: ``sample_prob[i]``, the probability that candidate i is drawn (the tempered,
    filtered, renormalised distribution; 0 for a token the filter removed).

    Beam search: the candidates are the 2 x num_beams best continuations of all beams, best
    first; ``lm_prob[i]`` is p(token | its beam), ``score[i]`` the cumulative log-probability;
    ``beam[i]`` the beam it extends (an index into the beams before the step, which are the
    previous step's candidates with ``next_beam`` 0, 1, ...); ``next_beam[i]`` the beam it
    becomes (-1: none); ``hypothesis_score[i]`` = score / length ** length_penalty if it ended
    (end-of-text, or the last step) among the num_beams best candidates, as a finished
    hypothesis (NaN otherwise; the search keeps the num_beams best finished ones and returns the
    best). ``chosen`` is the candidate that became beam 0 (the best continuation; at a step
    where no beam goes on, candidate 0).

    The four sampling and beam columns are empty in version 1 files (read as NaN / -1).

    ZeroCap (:mod:`magic_edu.zerocap`): the candidates are every live beam's best tokens by the
    fused q, beam after beam; ``lm_prob`` is p0(v), the LM's probability before steering;
    ``steered_prob`` p(v) after the last of the num_iterations gradient steps on the keys and
    values; ``clip_score`` CLIP's target in that iteration, softmax over the n most probable
    tokens of cos(I, text + v) / clip_temperature (NaN where nothing was steered);
    ``fused_prob`` q(v) = p_shift(v) ** f * p0(v) ** (1 - f) normalised; ``score`` = (the beam's
    summed log q + log q(v)) / its new length, what the beams are ranked by; ``beam`` and
    ``next_beam`` as for beam search (``hypothesis_score`` unused); ``chosen``: the candidate
    that became beam 0. ``iteration_probs[i]`` / ``iteration_targets[i]``: p(v) at the start of
    iteration i and the target it was pulled towards, one value per candidate. NaN for every
    other decoder (empty lists), and in files older than version 4. ``kept_beam[j]``: for every
    beam after the step, the index (before the step) of the finished beam it is, kept as it was,
    or -1 for a beam one of the step's candidates became (empty for other decoders and in files
    older than version 5); with ``beam`` and ``next_beam`` it traces any beam back to step 0.

    ``cost``: the work the step did (:mod:`magic_edu.costs`): LM forwards and tokens, backward
    passes, CLIP texts and their tokens, CLIP images, and the step's wall time. It is the whole
    step's, all rows of a batch together (every row's record holds the same cost); unknown
    (-1 / NaN) in files older than version 3.
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
    sample_prob: list[float] = field(default_factory=list)
    beam: list[int] = field(default_factory=list)
    next_beam: list[int] = field(default_factory=list)
    hypothesis_score: list[float] = field(default_factory=list)
    steered_prob: list[float] = field(default_factory=list)
    fused_prob: list[float] = field(default_factory=list)
    iteration_probs: list[list[float]] = field(default_factory=list)  # [iteration][candidate]
    iteration_targets: list[list[float]] = field(default_factory=list)
    kept_beam: list[int] = field(default_factory=list)  # ZeroCap: one entry per beam after the step
    cost: Cost = field(default_factory=Cost.unknown)

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
    """The settings of a decode and one :class:`StepRecord` per generated token.

    ``setup_cost``: the work done before the first step (the prefix's LM forward, the images'
    CLIP embedding), shared by all rows of a batch; the steps' costs leave it out, so a step
    costs the same whichever step it is. Unknown (-1 / NaN) in files older than version 3.
    """

    settings: dict[str, Any]
    prefix_ids: list[int]
    prefix_tokens: list[str]
    steps: list[StepRecord] = field(default_factory=list)
    setup_cost: Cost = field(default_factory=Cost.unknown)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepRecord:
        return self.steps[i]

    def __iter__(self):
        return iter(self.steps)

    def to_frame(self) -> pd.DataFrame:
        """A long DataFrame: one row per step and candidate."""
        from .tools.explain import flip_columns  # derived columns; explain reads traces, so imported here

        rows = []
        for s in self.steps:
            optional = {name: getattr(s, name) or [fill] * s.k for name, fill in OPTIONAL_COLUMNS.items()}
            cost = s.cost.to_dict()
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
                        **{name: column[i] for name, column in optional.items()},
                        "chosen": i == s.chosen,
                        "forced": s.forced and i == s.chosen,
                        **cost,
                    }
                )
        columns = ["step", "rank", "token", "token_id", "lm_prob", "degeneration_penalty", "penalty_position",
                   "clip_text", "clip_cosine", "clip_score", "score", *OPTIONAL_COLUMNS, "chosen", "forced",
                   *COUNTS, "seconds"]
        frame = pd.DataFrame(rows, columns=columns)
        flips = flip_columns(self)
        for n, name in enumerate(flips):  # after score
            frame.insert(columns.index("score") + 1 + n, name, pd.Series(flips[name], dtype=float))
        return frame

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
            "setup_cost": self.setup_cost.to_dict(),
            "steps": [asdict(s) for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike | None = None) -> Trace:
        """The trace ``data`` (as :meth:`to_dict` gives it) describes, checked: anything that is not
        a trace of a version this magic_edu reads is a :class:`MagicEduError` naming ``source`` (a
        file name, if it came from one) and what is wrong. Float columns read ``null`` (and the
        bare ``NaN`` of older files) as NaN."""
        where = f"trace file {source}" if source is not None else "trace"
        try:
            return cls._from_checked_dict(data)
        except MagicEduError as err:
            raise MagicEduError(f"{where}: {err}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as err:
            raise MagicEduError(f"{where}: not a valid trace ({type(err).__name__}: {err})") from None

    @classmethod
    def _from_checked_dict(cls, data: Any) -> Trace:
        if not isinstance(data, dict) or data.get("format") != "magic_edu.trace":
            raise MagicEduError("not a magic_edu trace (missing 'format': 'magic_edu.trace')")
        version = data.get("version")
        if not _is_int(version) or version < 1:
            raise MagicEduError(f"'version' must be a positive integer; got {version!r}")
        if version > FORMAT_VERSION:
            raise MagicEduError(f"written in trace format version {version} by a newer magic_edu; this one reads "
                                f"versions up to {FORMAT_VERSION}: upgrade magic_edu to load it")
        missing = [key for key in ("settings", "prefix_ids", "prefix_tokens", "steps") if key not in data]
        if missing:
            raise MagicEduError(f"missing {', '.join(repr(m) for m in missing)}")
        settings = data["settings"]
        if not isinstance(settings, dict):
            raise MagicEduError(f"'settings' must be an object; got {type(settings).__name__}")
        prefix_ids = _int_list(data["prefix_ids"], "'prefix_ids'")
        prefix_tokens = _str_list(data["prefix_tokens"], "'prefix_tokens'")
        if len(prefix_ids) != len(prefix_tokens):
            raise MagicEduError(f"'prefix_ids' has {len(prefix_ids)} entries but 'prefix_tokens' {len(prefix_tokens)}")
        steps = data["steps"]
        if not isinstance(steps, list):
            raise MagicEduError(f"'steps' must be a list; got {type(steps).__name__}")
        setup_cost = Cost.from_dict(data["setup_cost"], "'setup_cost'") if "setup_cost" in data else Cost.unknown()
        return cls(settings, prefix_ids, prefix_tokens, [_step_record(s, i) for i, s in enumerate(steps)], setup_cost)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace as JSON, atomically (a temporary file renamed into place); NaN is
        written as ``null``."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace :meth:`save` wrote; any problem is a :class:`MagicEduError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise MagicEduError(f"path: no trace file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MagicEduError(f"path: {path} is not a JSON trace file ({err})") from None
        except RecursionError:
            raise MagicEduError(f"path: {path} is not a trace file (JSON nested too deeply)") from None
        except OSError as err:
            raise MagicEduError(f"path: cannot read {path} ({err})") from None
        return cls.from_dict(data, source=path)

    def to_html(self, path: str | os.PathLike, image: Any = None) -> Path:
        """This decode as one self-contained HTML page (:func:`magic_edu.views.export.export_html`)."""
        from .views.export import export_html

        return export_html(self, path, image=image)


# the per-candidate columns older files lack (version 1: the first four; before 4: the last two), and what
# they hold where a decoder does not compute them
OPTIONAL_COLUMNS = {"sample_prob": math.nan, "beam": -1, "next_beam": -1, "hypothesis_score": math.nan,
                    "steered_prob": math.nan, "fused_prob": math.nan}


# -- checking a loaded trace ---------------------------------------------------------------
_STEP_FIELDS = {f.name: f for f in fields(StepRecord)}
_STEP_REQUIRED = [name for name, f in _STEP_FIELDS.items() if f.default is MISSING and f.default_factory is MISSING]
_INT_COLUMNS = ("token_ids", "penalty_position", "beam", "next_beam")
_STR_COLUMNS = ("tokens", "clip_text")
_FLOAT_COLUMNS = ("lm_prob", "degeneration_penalty", "clip_cosine", "clip_score", "score", "sample_prob",
                  "hypothesis_score", "steered_prob", "fused_prob")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise MagicEduError(f"{what} must be a list of integers")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MagicEduError(f"{what} must be a list of strings")
    return value


def _float_list(value: Any, what: str) -> list[float]:
    """Numbers, with null (how NaN is written) read back as NaN."""
    if not isinstance(value, list):
        raise MagicEduError(f"{what} must be a list of numbers")
    out = []
    for v in value:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise MagicEduError(f"{what} must be a list of numbers (or null for NaN); got {v!r}")
    return out


def _step_record(data: Any, i: int) -> StepRecord:
    where = f"steps[{i}]"
    if not isinstance(data, dict):
        raise MagicEduError(f"{where} must be an object; got {type(data).__name__}")
    missing = [name for name in _STEP_REQUIRED if name not in data]
    if missing:
        raise MagicEduError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
    unknown = sorted(set(data) - set(_STEP_FIELDS))
    if unknown:
        raise MagicEduError(f"{where}: unknown field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name in ("step", "chosen"):
        if not _is_int(data[name]):
            raise MagicEduError(f"{where}: {name!r} must be an integer; got {data[name]!r}")
        values[name] = data[name]
    if not isinstance(data["text"], str):
        raise MagicEduError(f"{where}: 'text' must be a string")
    values["text"] = data["text"]
    k = len(_int_list(data["token_ids"], f"{where}: 'token_ids'"))
    for name in (*_INT_COLUMNS, *_STR_COLUMNS, *_FLOAT_COLUMNS):
        column = data.get(name, [])  # only an optional column may be missing (version 1)
        if name in OPTIONAL_COLUMNS and column == []:
            column = [OPTIONAL_COLUMNS[name]] * k
        read = _int_list if name in _INT_COLUMNS else _str_list if name in _STR_COLUMNS else _float_list
        values[name] = read(column, f"{where}: {name!r}")
    uneven = [name for name in (*_INT_COLUMNS, *_STR_COLUMNS, *_FLOAT_COLUMNS) if len(values[name]) != k]
    if uneven:
        raise MagicEduError(f"{where}: {uneven[0]!r} has {len(values[uneven[0]])} entries, 'token_ids' {k}")
    if not 0 <= values["chosen"] < k:
        raise MagicEduError(f"{where}: 'chosen' is {values['chosen']}, not a candidate index (k = {k})")
    forced = data.get("forced", False)
    if not isinstance(forced, bool):
        raise MagicEduError(f"{where}: 'forced' must be true or false; got {forced!r}")
    values["forced"] = forced
    values["chosen_similarity"] = _float_list(data.get("chosen_similarity", []), f"{where}: 'chosen_similarity'")
    for name in ("iteration_probs", "iteration_targets"):  # [iteration][candidate]; absent before version 4
        lists = data.get(name, [])
        if not isinstance(lists, list):
            raise MagicEduError(f"{where}: {name!r} must be a list of lists of numbers")
        values[name] = [_float_list(row, f"{where}: {name!r}") for row in lists]
        if any(len(row) != k for row in values[name]):
            raise MagicEduError(f"{where}: every list in {name!r} must have one entry per candidate ({k})")
    values["kept_beam"] = _int_list(data.get("kept_beam", []), f"{where}: 'kept_beam'")  # absent before version 5
    if any(j < -1 for j in values["kept_beam"]):
        raise MagicEduError(f"{where}: 'kept_beam' holds beam indices or -1; got {values['kept_beam']}")
    values["cost"] = Cost.from_dict(data["cost"], f"{where}: 'cost'") if "cost" in data else Cost.unknown()
    return StepRecord(**values)


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


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinity (also inside numpy arrays) replaced by None, so it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1, newline: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (:func:`write_text_atomic`); NaN and
    infinities are written as ``null`` (strict JSON)."""
    text = json.dumps(_finite(data), indent=indent, default=_json_default, allow_nan=False)
    return write_text_atomic(path, text + ("\n" if newline else ""))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename, so a crash
    never leaves a truncated file behind.

    A symbolic link stays a link: the file it points to is replaced. An existing file keeps its
    permission bits (a new one gets 0644). A path that exists but is not a regular file (a
    folder, /dev/null, a FIFO) is a :class:`MagicEduError`; the temporary file
    (``.<name>.<random>.tmp`` next to the target) is removed on any failure."""
    given = Path(path)
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    mode = 0o644  # mkstemp makes files owner-only; a result file is for sharing
    try:
        st = os.stat(target)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            shown = f"{given} (-> {target})" if target != given else str(given)
            raise MagicEduError(f"cannot write {shown}: it is {kind}")
        mode = stat.S_IMODE(st.st_mode)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return given
