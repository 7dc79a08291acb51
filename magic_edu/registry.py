"""Every decoder, described once: its name, label, parameters with their ranges, and what it needs.

:class:`~magic_edu.decoding.Stepper`, the widgets, the plots, the command line, the analysis and
the toy report all read :data:`DECODERS`. Adding a decoder is one entry here plus its step in
:mod:`magic_edu.decoding` (and a function that runs it, named by ``function``). ZeroCap's
step is in :mod:`magic_edu.zerocap`; its parameters are described here, as every decoder's.
CLIP retrieval (``retrieves``) is the paper's baseline that takes no steps: it picks a whole
caption from an index (:mod:`magic_edu.retrieval`), so what steps through a decode
(:class:`~magic_edu.decoding.Stepper`, the StepThrough and Sweep widgets) leaves it out, and what
runs it gives it an index (``magic-edu caption --index``, ``CompareDecoders(index=...)``).

A parameter's value comes from, in order: the caller's argument; the model's preset settings
(``LanguageModel.defaults``, for parameters with ``from_preset``); the default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import MagicEduError
from .inputs import check_float, check_int


@dataclass(frozen=True)
class Param:
    """One setting of a decoder.

    ``low`` / ``high``: the allowed range (inclusive unless ``low_open``); ``high="vocab"``
    means at most the LM's vocabulary size. ``slider``: (min, max, step) a widget offers.
    ``from_preset``: a preset's value of this name applies (top-k sampling's k is another
    quantity than the candidates' k of contrastive and MAGIC search, so it does not).
    """

    name: str
    kind: type  # int or float
    default: Any
    low: float | int | None  # None: no lower bound
    high: float | int | str | None
    help: str
    slider: tuple[float, float, float] | None = None
    low_open: bool = False
    from_preset: bool = True

    def check(self, value: Any, vocab_size: int | None = None) -> Any:
        """``value`` as this parameter's type, or a :class:`MagicEduError` naming it and its range."""
        high = vocab_size if self.high == "vocab" else self.high
        if self.kind is int:
            return check_int(value, self.name, self.low, high)
        if self.low_open and high is None:  # e.g. a temperature: any finite number above low
            allowed = f"a number > {self.low} (finite)"
            try:
                value = check_float(value, self.name, self.low)
            except MagicEduError:
                raise MagicEduError(f"{self.name} must be {allowed}; got {value!r}") from None
            if value == self.low:
                raise MagicEduError(f"{self.name} must be {allowed}; got {value}")
            return value
        value = check_float(value, self.name, self.low, high)
        if self.low_open and value == self.low:
            raise MagicEduError(f"{self.name} must be a number in ({self.low}, {high}]; got {value}")
        return value


@dataclass(frozen=True)
class Decoder:
    """One decoder: ``name`` (as the library spells it), ``label`` (for people), its parameters,
    and whether it scores candidates (degeneration penalty, CLIP), needs an image, samples, keeps
    several hypotheses at once (beam search: a step advances every beam), steers the LM with
    gradient steps on its keys and values (ZeroCap: :mod:`magic_edu.zerocap`, its own beams;
    slow, so :class:`~magic_edu.views.widgets.CompareDecoders` runs it only when asked), or
    retrieves a whole caption from an index instead of writing one (CLIP retrieval: no LM, no
    steps; its function takes ``index=``)."""

    name: str
    label: str
    function: str  # the function in magic_edu.decoding that runs it to the end
    params: tuple[Param, ...]
    scores_candidates: bool = False
    needs_image: bool = False
    samples: bool = False
    beams: bool = False
    steers: bool = False
    retrieves: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MagicEduError(f"{self.name} has no parameter {name!r}; its parameters: {', '.join(self.param_names)}")

    def settings(self, given: Mapping[str, Any], preset: Mapping[str, Any] | None = None,
                 vocab_size: int | None = None) -> tuple[dict[str, Any], list[str]]:
        """(every parameter's checked value, the names taken from ``preset``). ``given`` holds the
        caller's values (None = not given); a name that is not a parameter is an error."""
        unknown = [n for n, v in given.items() if n not in self.param_names and v is not None]
        if unknown:
            raise MagicEduError(f"{unknown[0]}: {self.label} has no such parameter; "
                                f"its parameters are {', '.join(self.param_names) or 'none'}")
        out, from_preset = {}, []
        for p in self.params:
            value = given.get(p.name)
            if value is None and p.from_preset and preset and preset.get(p.name) is not None:
                value = preset[p.name]
                from_preset.append(p.name)
            value = p.default if value is None else value
            out[p.name] = None if value is None else p.check(value, vocab_size)  # seed None: a fresh one
        return out, from_preset


# -- the parameters -------------------------------------------------------------------------
K = Param("k", int, 5, 1, "vocab", "candidates per step: the k most probable next tokens", (1, 50, 1))
ALPHA = Param("alpha", float, 0.6, 0.0, 1.0, "weight of the degeneration penalty", (0.0, 1.0, 0.05))
BETA = Param("beta", float, 2.0, 0.0, None, "weight of the magic (CLIP) score", (0.0, 5.0, 0.1))
P = Param("p", float, 0.95, 0.0, 1.0, "nucleus: the smallest set of tokens with this much probability",
          (0.05, 1.0, 0.05), low_open=True)
TEMPERATURE = Param("temperature", float, 1.0, 0.0, None,
                    "divide the logits by this before the filter (< 1: sharper, > 1: flatter)", (0.1, 2.0, 0.05),
                    low_open=True, from_preset=False)
MASS = Param("mass", float, 0.95, 0.0, 1.0, "typical: keep the tokens whose surprise is closest to the entropy, "
             "until they hold this much probability", (0.05, 1.0, 0.05), low_open=True, from_preset=False)
NUM_BEAMS = Param("num_beams", int, 4, 1, "vocab", "beam search: hypotheses kept at every step", (1, 10, 1),
                  from_preset=False)
LENGTH_PENALTY = Param("length_penalty", float, 1.0, None, None,
                       "beam search: a finished hypothesis scores log p / length ** length_penalty "
                       "(> 0 favours longer ones)", (-2.0, 3.0, 0.1), from_preset=False)
SEED = Param("seed", int, None, 0, 2**64 - 1, "sampling seed (none: a fresh random one)", from_preset=False)
# ZeroCap's (Tewel et al. 2022; defaults: ZeroCLIP.py's, num_beams the MAGIC paper's baseline
# script's); never a preset's: the presets' values are tuned for MAGIC
ZEROCAP_PARAMS: tuple[Param, ...] = tuple(replace(p, from_preset=False) for p in (
    Param("num_iterations", int, 5, 0, None, "gradient steps on the keys and values per token", (0, 10, 1)),
    Param("stepsize", float, 0.3, 0.0, None, "size of a normalised gradient step", (0.0, 1.0, 0.05)),
    Param("grad_norm_factor", float, 0.9, 0.0, None, "a step is g / ||g|| ** grad_norm_factor", (0.0, 1.0, 0.05)),
    Param("ce_scale", float, 0.2, 0.0, None, "weight of the fluency loss KL(p || p0)", (0.0, 2.0, 0.05)),
    Param("clip_scale", float, 1.0, 0.0, None, "weight of the CLIP loss", (0.0, 5.0, 0.1)),
    Param("clip_temperature", float, 0.01, 0.0, None, "CLIP's target is softmax(cos / clip_temperature)",
          (0.005, 0.1, 0.005), low_open=True),
    Param("fusion_factor", float, 0.99, 0.0, 1.0, "q = p_shift ** fusion_factor * p0 ** (1 - fusion_factor)",
          (0.0, 1.0, 0.01)),
    Param("end_factor", float, 1.01, 0.0, None, "the end token's logit is multiplied by this (> 0 logit)",
          (0.5, 2.0, 0.01), low_open=True),
    Param("forbidden_factor", float, 20.0, 0.0, None, "forbidden tokens' logits are divided by this (> 0 logit)",
          (1.0, 50.0, 1.0), low_open=True),
    Param("repetition_penalty", float, 1.0, 0.0, None, "the last 4 ids' logits are divided by this (1: off)",
          (1.0, 3.0, 0.1), low_open=True),
    Param("candidates", int, 512, 1, None, "tokens CLIP scores per beam and iteration (at most the vocabulary)",
          (1, 512, 1)),
    Param("num_beams", int, 1, 1, "vocab", "ZeroCap: beams (MAGIC's baseline runs 1; ZeroCap's default 5)",
          (1, 10, 1)),
))
CLIP_TEXT_MAX_LEN = Param("clip_text_max_len", int, 60, 1, None,
                          "CLIP sees at most this many of the last generated ids plus the candidate")

DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("greedy", "greedy search", "greedy_search", ()),
    Decoder("top_k", "top-k sampling", "top_k_sampling",
            (replace(K, default=40, help="sample among the k most probable tokens", from_preset=False),
             TEMPERATURE, SEED), samples=True, aliases=("top-k",)),
    Decoder("nucleus", "nucleus sampling", "nucleus_sampling", (P, TEMPERATURE, SEED), samples=True,
            aliases=("top-p",)),
    Decoder("typical", "typical sampling", "typical_sampling", (MASS, TEMPERATURE, SEED), samples=True,
            aliases=("typical-p",)),
    Decoder("beam", "beam search", "beam_search", (NUM_BEAMS, LENGTH_PENALTY), beams=True, aliases=("beam-search",)),
    Decoder("contrastive", "contrastive search", "contrastive_search", (K, ALPHA), scores_candidates=True),
    Decoder("magic", "MAGIC search", "magic_search",
            (replace(K, default=45), replace(ALPHA, default=0.1), BETA, CLIP_TEXT_MAX_LEN),
            scores_candidates=True, needs_image=True),
    Decoder("zerocap", "ZeroCap", "zerocap_search", ZEROCAP_PARAMS, needs_image=True, steers=True),
    # CLIPRe (Su et al. 2022, Sec. 5.1): the caption of an index CLIP scores highest; its index is not a
    # number, so not a Param: the function takes index=, the command line --index
    Decoder("clip_retrieval", "CLIP retrieval", "clip_retrieval_search", (), needs_image=True, retrieves=True,
            aliases=("clip-retrieval",)),
)}

# settings every decoder takes
MAX_NEW_TOKENS = Param("max_new_tokens", int, 16, 1, None, "tokens to generate at most", (4, 64, 1))


def get_decoder(name: str) -> Decoder:
    """The decoder called ``name`` (or one of its aliases, e.g. ``top-k``)."""
    if isinstance(name, str):
        if name in DECODERS:
            return DECODERS[name]
        for d in DECODERS.values():
            if name in d.aliases:
                return d
    raise MagicEduError(f"decoder must be one of {', '.join(DECODERS)}; got {name!r}")


def stepping_decoders() -> tuple[str, ...]:
    """The decoders that write a text token by token (every one but CLIP retrieval): what a
    :class:`~magic_edu.decoding.Stepper` runs."""
    return tuple(d.name for d in DECODERS.values() if not d.retrieves)


def candidate_decoders() -> tuple[str, ...]:
    """The decoders whose trace scores candidates (degeneration penalty, CLIP score)."""
    return tuple(d.name for d in DECODERS.values() if d.scores_candidates)
