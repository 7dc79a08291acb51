"""The decode loop: greedy search, sampling (top-k, nucleus, typical), beam search, contrastive
and MAGIC search, one step at a time.

MAGIC (Su et al. 2022, "Language Models Can See", Eq. 3). Let the prefix be the ids before
the first generated token (start token and prompt) and c the ids generated so far. At
every step:

1. V(k) = the k tokens of highest p(v|x); p is the softmax over the whole vocabulary
   (not renormalised over the k).
2. One LM forward of the k candidates side by side on top of the KV cache, each seeing the
   cache and itself only (the prefix is never re-encoded, the cache never copied k times),
   gives each candidate's last-layer hidden state h_v (after the final layer norm); the
   chosen one's logits are the next step's.
3. degeneration_penalty(v) = max_j cos(h_v, h_j) over every previous position j,
   prefix included.
4. clip_score(v) = softmax over V(k) of logit_scale * cos(CLIP_image(I), CLIP_text(t_v)),
   t_v = the last ``clip_text_max_len`` ids of c + [v], decoded, cut at the EOS string
   (so the EOS candidate is scored as "stop here": its text is c's). One batched CLIP
   text forward for the k texts.
5. Take argmax over V(k) of (1 - alpha) p(v|x) - alpha penalty(v) + beta clip_score(v);
   a tie goes to the more probable candidate.

Contrastive search is the same with beta = 0 (no CLIP); greedy search takes argmax p.
Sampling draws from the logits divided by a temperature, then filtered (top-k, nucleus or
typical: :mod:`magic_edu.filters`). Beam search keeps the num_beams best hypotheses and
advances them all at every step (its bookkeeping: :mod:`magic_edu.beams`). ZeroCap steers the
LM's keys and values with gradient steps towards CLIP, then runs its own beam search over the
fused distribution (every formula: :mod:`magic_edu.zerocap`; the Stepper keeps its beams per step).
:class:`Stepper` runs any decoder one token at a time, can go back, and can be forced
to take another candidate ("what if?"); the decoder functions below just run it to the end.
Each decoder is described once in :mod:`magic_edu.registry` (name, parameters, ranges).

Every step's record counts the work it did (:mod:`magic_edu.costs`): the LM's and CLIP's
forwards add to the models' running ``cost``, and the Stepper keeps the difference around the
step, with its wall time; the work before the first step (the prefix's forward, the images'
embedding) is the trace's ``setup_cost``.

Memory grows linearly with the length: the keys and values and hidden states of every
position live in one buffer per row that a step appends to and Back truncates (the state
after step t is a prefix of the state after step t + 1), and the decoder functions, which
never go back, keep nothing else. Beam search's rows are its beams: beam j of step t writes
row j at that step's position, and every beam reads its own path through the rows.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from . import beams, zerocap
from .costs import Cost
from .errors import MagicEduError
from .filters import filtered_probs, nucleus_filter, temperature, top_k_filter, typical_filter
from .inputs import ImageLike, check_int
from .models import ImageTextMatcher, KeysValues, LanguageModel
from .registry import MAX_NEW_TOKENS, get_decoder
from .scoring import ClipScorer, degeneration_penalty, magic_score
from .trace import Generation, StepRecord, Trace

TRACE_TOP = 10  # candidates shown in a greedy / nucleus / typical trace
NAN = float("nan")
NO_FORCING_BEAMS = ("force: forcing a token is not meaningful for beam search: a step advances every beam at once, "
                    "and which continuations go on is the search itself")
NO_FORCING_ZEROCAP = ("force: forcing a token is not meaningful for ZeroCap: a step advances every beam at once, "
                      "and which continuations go on is its beam search")
# each sampling decoder's filter, and the parameter it takes
FILTERS = {"top_k": (top_k_filter, "k"), "nucleus": (nucleus_filter, "p"), "typical": (typical_filter, "mass")}


@dataclass
class StepResult:
    """What one step computed for every row: n candidates each, as (B, n) tensors or B lists.

    Every field of :class:`~magic_edu.trace.StepRecord` that a decoder does not compute is
    filled all the same (NaN, -1, "" or an empty list), so recording is one plain copy.
    """

    token_ids: Any
    lm_prob: Any
    degeneration_penalty: Any
    penalty_position: Any
    clip_text: Any
    clip_cosine: Any
    clip_score: Any
    score: Any
    chosen: Any  # (B,): index into each row's candidates
    chosen_similarity: Any  # per row: the chosen token's cosine to every earlier position (or empty)
    sample_prob: Any
    beam: Any
    next_beam: Any
    hypothesis_score: Any
    steered_prob: Any = None  # ZeroCap only (None: NaN for every candidate)
    fused_prob: Any = None
    iteration_probs: Any = None  # per row: [iteration][candidate] (None: empty)
    iteration_targets: Any = None
    kept_beam: Any = None  # per row: ZeroCap's beams after the step kept as they were (None: empty)

    def __post_init__(self) -> None:
        rows = _rows(self.token_ids)
        for name in ("steered_prob", "fused_prob"):
            if getattr(self, name) is None:
                setattr(self, name, _unused(rows, NAN))
        for name in ("iteration_probs", "iteration_targets", "kept_beam"):
            if getattr(self, name) is None:
                setattr(self, name, [[] for _ in rows])


def _unused(ids: list[list[int]], fill: Any) -> list[list]:
    """A column a decoder does not compute: ``fill`` for every candidate of every row."""
    return [[fill] * len(r) for r in ids]


def _neither_sampling_nor_beams(b: int, k: int) -> list[list[list]]:
    """The sampling and beam columns (sample_prob, beam, next_beam, hypothesis_score) of a step
    that does neither: b rows of k candidates."""
    return [[[fill] * k for _ in range(b)] for fill in (NAN, -1, -1, NAN)]


class _Context:
    """The LM's keys and values and the last-layer hidden states (float64) of every position so
    far, for B rows, in buffers with room to spare (doubled when full). A step appends one
    position; going back truncates, which is exact because the context of step t is a prefix
    of the context of step t + 1."""

    def __init__(self, cache: KeysValues, hidden: torch.Tensor, room: int) -> None:
        self.length = cache[0][0].shape[2]
        self.keys = [_with_room(k, room, 2) for k, _ in cache]  # (B, heads, room, d_head) per layer
        self.values = [_with_room(v, room, 2) for _, v in cache]
        self.hidden = _with_room(hidden.double(), room, 1)  # (B, room, d)

    def cache(self) -> KeysValues:
        """The keys and values of the positions so far (views, no copy)."""
        n = self.length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values)]

    def states(self) -> torch.Tensor:
        """(B, T, d) float64 hidden states of the positions so far (a view)."""
        return self.hidden[:, : self.length]

    def paths(self, rows: torch.Tensor) -> KeysValues:
        """The keys and values of the positions so far along paths through the rows: ``rows``
        (m, T) names the row to read at every position, for each of m paths (a copy)."""
        at = torch.arange(self.length, device=rows.device)
        return [(k[rows, :, at].transpose(1, 2), v[rows, :, at].transpose(1, 2))
                for k, v in zip(self.keys, self.values)]

    def append(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor) -> None:
        """Add one position: per layer (keys, values) of shape (b, heads, d_head), hidden (b, d), for
        the first b rows (b = B but for beam search, whose beams may be fewer than its rows)."""
        n, b = self.length, hidden.shape[0]
        if n == self.keys[0].shape[2]:  # full: twice the room (amortised, memory stays linear)
            self.keys = [_with_room(k, 2 * n, 2) for k in self.keys]
            self.values = [_with_room(v, 2 * n, 2) for v in self.values]
            self.hidden = _with_room(self.hidden, 2 * n, 1)
        for buf, (k, _) in zip(self.keys, kv):
            buf[:b, :, n] = k
        for buf, (_, v) in zip(self.values, kv):
            buf[:b, :, n] = v
        self.hidden[:b, n] = hidden
        self.length = n + 1


@dataclass
class _Undo:
    """What Back restores besides truncating the context: its length, the step's next-token
    logits, which rows had ended, the sampler's state, and beam search's finished hypotheses
    and whether it had stopped (its beams: the layer Back removes). ZeroCap keeps no context:
    -1 and None there."""

    context_length: int
    logits: torch.Tensor | None
    lengths: list[int | None]
    rng_state: torch.Tensor | None
    finished: list[beams.Hypothesis]
    stopped: bool


class Stepper:
    """Advance one decode a token at a time.

    >>> s = Stepper(lm, "magic", clip=clip, image=img, k=45, alpha=0.1, beta=2.0)
    >>> record = s.step()                 # a StepRecord: every candidate and its scores
    >>> s.back()                          # undo the last step
    >>> s.step(force=record.token_ids[3])  # what if it had taken the 4th candidate?
    >>> s.generation().text

    A decoder parameter left out (None) takes the model's preset setting (``lm.defaults``,
    set by :func:`~magic_edu.presets.load_models`) where the registry says it applies, else
    the registry's default; the trace's settings say which came from the preset.
    ``image`` may be a list: the rows then decode as one batch (MAGIC only), exactly as
    one by one. Forcing is for a single row. ``history=False`` keeps nothing for Back.

    Beam search (``"beam"``) decodes one prompt: it does not look at the image, and its rows
    are its beams. A step advances every beam; forcing a token is not meaningful for it. Its
    output so far is the best beam's, and once it has stopped, the best finished hypothesis.

    ZeroCap (``"zerocap"``) captions one image (a list of several is refused: call
    :func:`zerocap_search`, which runs one Stepper per image); its output so far is its best
    beam's, forcing is refused as for beam search, and Back restores the beams of the step
    before. ``forbidden_tokens`` (ZeroCap only): ids whose logits forbidden_factor damps.
    """

    def __init__(
        self,
        lm: LanguageModel,
        decoder: str = "magic",
        clip: ImageTextMatcher | None = None,
        image: ImageLike | Sequence[ImageLike] | None = None,
        *,
        prompt: str | None = None,
        k: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        p: float | None = None,
        mass: float | None = None,
        temperature: float | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        seed: int | None = None,
        clip_text_max_len: int | None = None,
        num_iterations: int | None = None,
        stepsize: float | None = None,
        grad_norm_factor: float | None = None,
        ce_scale: float | None = None,
        clip_scale: float | None = None,
        clip_temperature: float | None = None,
        fusion_factor: float | None = None,
        end_factor: float | None = None,
        forbidden_factor: float | None = None,
        repetition_penalty: float | None = None,
        candidates: int | None = None,
        forbidden_tokens: Sequence[int] = (),
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        record: bool = True,
        history: bool = True,
    ) -> None:
        self.spec = spec = get_decoder(decoder)
        if spec.retrieves:
            raise MagicEduError(f"decoder: {spec.label} takes no steps (it picks a whole caption from an index); "
                                f"call {spec.function}(lm, clip, image, index=...) or magic_edu.clip_retrieval")
        self.lm, self.clip, self.decoder = lm, clip, spec.name
        preset = getattr(lm, "defaults", None) or {}
        given = dict(k=k, alpha=alpha, beta=beta, p=p, mass=mass, temperature=temperature, num_beams=num_beams,
                     length_penalty=length_penalty, seed=seed, clip_text_max_len=clip_text_max_len,
                     num_iterations=num_iterations, stepsize=stepsize, grad_norm_factor=grad_norm_factor,
                     ce_scale=ce_scale, clip_scale=clip_scale, clip_temperature=clip_temperature,
                     fusion_factor=fusion_factor, end_factor=end_factor, forbidden_factor=forbidden_factor,
                     repetition_penalty=repetition_penalty, candidates=candidates)
        self.params, from_preset = spec.settings(given, preset, lm.vocab_size)
        if spec.samples and self.params["seed"] is None:
            self.params["seed"] = secrets.randbits(31)
        self.stop_at_eos, self.record = _check_bool(stop_at_eos, "stop_at_eos"), _check_bool(record, "record")
        self.history = _check_bool(history, "history")
        self.forbidden_tokens = _check_forbidden(forbidden_tokens, spec, lm.vocab_size)

        self.prefix = lm.prefix_ids(prompt)
        room = lm.context_length - len(self.prefix)
        if room <= 0:
            raise MagicEduError(
                f"prompt: its {len(self.prefix)} prefix ids leave no room in the model's context of "
                f"{lm.context_length} tokens; shorten the prompt"
            )
        if max_new_tokens is None and preset.get("max_new_tokens") is not None:
            max_new_tokens = preset["max_new_tokens"]
            from_preset.append("max_new_tokens")
        if max_new_tokens is None and getattr(lm, "max_length", None):  # the budget counts the prompt
            max_new_tokens = max(1, lm.max_length - len(self.prefix))
        self.max_new_tokens = MAX_NEW_TOKENS.check(MAX_NEW_TOKENS.default if max_new_tokens is None
                                                   else max_new_tokens)
        if self.max_new_tokens > room:
            raise MagicEduError(
                f"max_new_tokens: the prompt's {len(self.prefix)} prefix ids plus max_new_tokens="
                f"{self.max_new_tokens} exceed the model's context of {lm.context_length} tokens; "
                f"max_new_tokens may be at most {room}"
            )

        images: list[Any] = []
        self.scorer: ClipScorer | None = None
        work_before, started = self._work_done(), time.perf_counter()
        if spec.needs_image:
            if clip is None or image is None:
                raise MagicEduError(f"{spec.label} needs clip= (an ImageTextMatcher) and image=")
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if not images:
                raise MagicEduError("image: the list of images is empty")
            if spec.steers and len(images) > 1:
                raise MagicEduError(f"image: a ZeroCap Stepper captions one image; got a list of {len(images)} "
                                    "(zerocap_search runs one after another)")
            embeddings = clip.embed_image(images).reshape(len(images), -1)
            if spec.steers:
                self._image_embedding = embeddings[0]
            else:
                # a Stepper that can go back encodes each step's CLIP texts afresh: exact either way, but
                # reusing the previous step's prefix rounds differently, and Back must replay bit for bit
                self.scorer = ClipScorer(lm, clip, embeddings, self.params["clip_text_max_len"],
                                         remember=False if self.history else None)
        self.batch_size = max(1, len(images))

        settings = {"decoder": spec.name, "prompt": prompt, "max_new_tokens": self.max_new_tokens,
                    "stop_at_eos": self.stop_at_eos, "lm": lm.name, "prefix_format": lm.prompt_format,
                    **self.params, "from_preset": from_preset}
        if spec.needs_image:
            settings.update(clip=clip.name, logit_scale=clip.logit_scale)
        if spec.steers:
            settings.update(forbidden_tokens=list(self.forbidden_tokens))
        prefix_tokens = [lm.token_text(i) for i in self.prefix]
        self.traces = [Trace(dict(settings), list(self.prefix), prefix_tokens) for _ in range(self.batch_size)]
        self._start()
        setup_cost = self._cost_since(work_before, started)
        for trace in self.traces:
            trace.setup_cost = setup_cost.copy()

    # -- cost ------------------------------------------------------------------------
    def _work_done(self) -> Cost:
        """A reading of the models' running costs (LM and CLIP together, a new object)."""
        return self.lm.cost + (self.clip.cost if self.clip is not None else Cost())

    def _cost_since(self, before: Cost, started: float) -> Cost:
        """The work done since the reading ``before`` and the wall time since ``started`` (queued GPU
        work waited for)."""
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)
        cost = self._work_done() - before
        cost.seconds = time.perf_counter() - started
        return cost

    # -- state ----------------------------------------------------------------------
    def _start(self) -> None:
        b = self.batch_size
        if not self.spec.steers:  # ZeroCap runs every beam's ids afresh at every step: no shared context
            ids = torch.tensor([self.prefix], device=self.lm.device)
            logits, hidden, cache = self.lm.forward(ids)
            rows = self.params["num_beams"] if self.spec.beams else b
            room = len(self.prefix) + min(self.max_new_tokens, 64)  # doubled when a decode needs more
            self._ctx = _Context(_repeat_rows(cache, rows), hidden.expand(rows, -1, -1), room)
            self._logits = logits[:, -1].expand(1 if self.spec.beams else b, -1)  # next-token logits per row / beam
        self._steps = 0
        self._generated: list[list[int]] = [[] for _ in range(b)]  # rows keep going after EOS
        self._lengths: list[int | None] = [None] * b  # per row: its output's length once it has ended
        self._rng_state = torch.Generator().manual_seed(self.params["seed"]).get_state() if self.spec.samples else None
        self._layers: list[beams.Layer] = []  # beam search: the beams after every step
        self._finished: list[beams.Hypothesis] = []  # and its best finished hypotheses
        self._stopped = False
        self._undo: list[_Undo] = []
        self._zerocap_beams: list[list[zerocap.Beam]] = []  # ZeroCap: its beams after every step

    @property
    def step_index(self) -> int:
        """Number of steps taken (tokens generated so far, but for beam search)."""
        return self._steps

    @property
    def done(self) -> bool:
        return (all(n is not None for n in self._lengths) or self._stopped
                or self.step_index >= self.max_new_tokens)

    def token_ids(self, row: int = 0) -> list[int]:
        """The ids generated so far by one row (up to and including EOS); for beam search, the
        best beam's, and once the search has stopped, the best finished hypothesis's."""
        if self.spec.beams:
            if self._stopped:
                return beams.hypothesis_tokens(self._layers, self._finished[0])
            return beams.beam_tokens(self._layers, 0) if self._layers else []
        if self.spec.steers:  # the best beam by score / length
            return list(self._zerocap_beams[-1][0].ids) if self._zerocap_beams else []
        n = self._lengths[row]
        return list(self._generated[row][:n])

    def beams(self) -> list[tuple[list[int], float]]:
        """Beam search: the beams after the last step, best first: (generated ids, summed log-probability).
        ZeroCap: its beams, best first by score / length (finished ones included): (ids, summed log q)."""
        if self.spec.steers:
            return [(list(b.ids), b.score) for b in self._zerocap_beams[-1]] if self._zerocap_beams else [([], 0.0)]
        if not self._layers:
            return [([], 0.0)] if self.spec.beams else []
        layer = self._layers[-1]
        return [(beams.beam_tokens(self._layers, j), layer.log_probs[j]) for j in range(len(layer.tokens))]

    def hypotheses(self) -> list[tuple[list[int], float]]:
        """Beam search: the finished hypotheses kept so far, best first: (generated ids, score)."""
        return [(beams.hypothesis_tokens(self._layers, h), h.score) for h in self._finished]

    def text(self, row: int = 0) -> str:
        """The output text so far (the reference's parser applied)."""
        return self.lm.output_text(self.token_ids(row))

    def generation(self, row: int = 0) -> Generation:
        return Generation(self.text(row), self.token_ids(row), self.traces[row])

    def generations(self) -> list[Generation]:
        return [self.generation(b) for b in range(self.batch_size)]

    def back(self) -> None:
        """Undo the last step (its record leaves the trace too)."""
        if not self.history:
            raise MagicEduError("back(): this Stepper keeps no history (history=False)")
        if not self._undo:
            raise MagicEduError("back(): nothing to undo, the decode is at its first step")
        undo = self._undo.pop()
        self._logits, self._lengths, self._rng_state = undo.logits, undo.lengths, undo.rng_state
        self._finished, self._stopped = undo.finished, undo.stopped
        if not self.spec.steers:
            self._ctx.length = undo.context_length
        self._steps -= 1
        if self.spec.beams:
            self._layers.pop()
        if self.spec.steers:
            self._zerocap_beams.pop()
        for ids in self._generated:
            if ids:
                ids.pop()
        for trace in self.traces:
            while trace.steps and trace.steps[-1].step >= self.step_index:
                trace.steps.pop()

    def reset(self) -> None:
        """Back to the first step."""
        while self._undo:
            self.back()

    def run(self) -> list[Generation]:
        """Step until every row has ended; one Generation per row."""
        while not self.done:
            self.step()
        return self.generations()

    # -- one step -------------------------------------------------------------------
    def step(self, force: int | None = None) -> StepRecord | None:
        """Generate one token per row and return row 0's record (None if not recording or
        row 0 had already ended).

        ``force``: a token id among this step's candidates, taken instead of the decoder's choice.
        """
        if force is not None and self.spec.beams:
            raise MagicEduError(NO_FORCING_BEAMS)
        if force is not None and self.spec.steers:
            raise MagicEduError(NO_FORCING_ZEROCAP)
        if self.done:
            raise MagicEduError("step(): the decode has ended; use back() or reset() to go on")
        if force is not None:
            if self.batch_size > 1:
                raise MagicEduError("force: forcing a token works on one image at a time, not a batch")
            if isinstance(force, bool) or not isinstance(force, int) or not 0 <= force < self.lm.vocab_size:
                raise MagicEduError(f"force must be a token id (an int from 0 to {self.lm.vocab_size - 1}) among "
                                    f"this step's candidates; got {force!r}")
        work_before, started = self._work_done(), time.perf_counter()
        if self.spec.steers:  # ZeroCap's state: its beams per step (Back pops them) and whether all have finished
            before = _Undo(-1, None, list(self._lengths), None, [], self._stopped)
        else:
            before = _Undo(self._ctx.length, self._logits, list(self._lengths), self._rng_state, self._finished,
                           self._stopped)
        text_before = [self.text(row) for row in range(self.batch_size)] if self.record else []
        if self.spec.steers:
            result = self._zerocap_step()
        else:
            probs = torch.softmax(self._logits.double(), dim=-1)  # p(v|x) over the whole vocabulary
            if self.spec.beams:
                result = self._beam_step(probs)
            elif self.spec.scores_candidates:
                result = self._candidate_step(probs, force)
            else:
                result = self._token_step(probs, force)
        if self.history:
            self._undo.append(before)
        self._steps += 1
        if not (self.spec.beams or self.spec.steers):
            chosen = [int(ids[c]) for ids, c in zip(_rows(result.token_ids), _rows(result.chosen))]
            for row, c in enumerate(chosen):
                self._generated[row].append(c)
                if self._lengths[row] is None and self.stop_at_eos and c == self.lm.eos_token_id:
                    self._lengths[row] = len(self._generated[row])
        if not self.record:
            return None
        return self._record(result, before.lengths, text_before, force is not None,
                            self._cost_since(work_before, started))

    def _candidate_step(self, probs: torch.Tensor, force: int | None) -> StepResult:
        """Contrastive / MAGIC search: score the top-k candidates, take the best."""
        b, k, t = self.batch_size, self.params["k"], self._ctx.length
        lm_prob, candidates = probs.topk(k, dim=-1)  # (B, k), most probable first
        # the candidates' ids reach the host before the LM forward is queued, so on a GPU the
        # CLIP texts are built and tokenised on the CPU while the GPU runs the LM
        candidate_ids = candidates.tolist() if self.scorer is not None else None
        hidden_k, cache_k = self.lm.forward_candidates(candidates.to(self.lm.device), self._ctx.cache())  # (B, k, d)
        penalty, position, cosines = degeneration_penalty(hidden_k.double(), self._ctx.states())
        if self.scorer is not None:
            clip_text, clip_cosine, clip_score = self.scorer(self._generated, candidate_ids)
            clip_cosine, clip_score = clip_cosine.to(lm_prob.device), clip_score.to(lm_prob.device)
            score = magic_score(lm_prob, penalty, clip_score, self.params["alpha"], self.params["beta"])
        else:  # contrastive search: beta = 0
            clip_text, clip_cosine = [[""] * k for _ in range(b)], torch.full_like(lm_prob, NAN)
            clip_score = clip_cosine
            score = magic_score(lm_prob, penalty, torch.zeros_like(lm_prob), self.params["alpha"], 0.0)
        chosen = score.argmax(dim=-1)  # the first maximum: ties go to the more probable
        if force is not None:
            chosen[0] = _index_of(force, candidates[0])
        rows, at = torch.arange(b, device=hidden_k.device), chosen.to(hidden_k.device)
        chosen_hidden = hidden_k[rows, at]  # (B, d)
        # the chosen candidate's keys and values sit at position t + its index in the candidates' forward
        self._ctx.append([(key[rows, :, t + at], value[rows, :, t + at]) for key, value in cache_k],
                         chosen_hidden.double())
        self._logits = self.lm.logits(chosen_hidden)
        return StepResult(candidates, lm_prob, penalty, position, clip_text, clip_cosine, clip_score, score, chosen,
                          cosines[torch.arange(b), chosen], *_neither_sampling_nor_beams(b, k))

    def _token_step(self, probs: torch.Tensor, force: int | None) -> StepResult:
        """Greedy search and sampling: pick one token, then one forward of it."""
        shown_k = self.params["k"] if self.decoder == "top_k" else min(TRACE_TOP, probs.shape[-1])
        shown_p, shown = probs.topk(shown_k, dim=-1)
        sample_probs = self._sampling_distribution() if self.spec.samples else None  # (B, V), on the CPU
        if force is not None:
            _index_of(force, shown[0])
            chosen_ids = torch.tensor([force])
        elif sample_probs is None:
            chosen_ids = shown[:, 0]
        else:
            gen = torch.Generator().manual_seed(0)
            gen.set_state(self._rng_state)
            chosen_ids = _sample(sample_probs, gen)
            self._rng_state = gen.get_state()
        t = self._ctx.length
        logits, hidden, cache = self.lm.forward(chosen_ids[:, None].to(self.lm.device), cache=self._ctx.cache())
        self._ctx.append([(key[:, :, t], value[:, :, t]) for key, value in cache], hidden[:, -1].double())
        self._logits = logits[:, -1]
        # the trace shows the most probable tokens, plus the sampled one where it is not among them
        ids, lm_prob, chosen = [], [], []
        for row in range(self.batch_size):
            r_ids, r_p = shown[row].tolist(), shown_p[row].tolist()
            c = int(chosen_ids[row])
            if c not in r_ids:
                r_ids.append(c)
                r_p.append(float(probs[row, c]))
            ids.append(r_ids)
            lm_prob.append(r_p)
            chosen.append(r_ids.index(c))
        sample_prob = (_unused(ids, NAN) if sample_probs is None
                       else [sample_probs[row, r_ids].tolist() for row, r_ids in enumerate(ids)])
        return StepResult(ids, lm_prob, _unused(ids, NAN), _unused(ids, -1), _unused(ids, ""), _unused(ids, NAN),
                          _unused(ids, NAN), lm_prob, chosen, [[] for _ in ids], sample_prob, _unused(ids, -1),
                          _unused(ids, -1), _unused(ids, NAN))

    def _sampling_distribution(self) -> torch.Tensor:
        """What sampling draws from, (B, V) float64 on the CPU: softmax(filter(logits / temperature))."""
        keep, name = FILTERS[self.decoder]
        tempered = temperature(self._logits.double().cpu(), self.params["temperature"])
        return filtered_probs(keep(tempered, self.params[name]))

    def _beam_step(self, probs: torch.Tensor) -> StepResult:
        """Beam search: rank every beam's continuations together (:func:`magic_edu.beams.select`),
        then one forward of the beams that go on, each on its own path through the context."""
        n, t = self.params["num_beams"], self.step_index
        log_p = torch.log_softmax(self._logits.float(), dim=-1).cpu()  # float32, as transformers
        step = beams.select(log_p, self._layers[-1] if self._layers else beams.ROOT, n, t,
                            last=t + 1 == self.max_new_tokens, eos=self.lm.eos_token_id if self.stop_at_eos else None,
                            length_penalty=self.params["length_penalty"], finished=self._finished)
        lm_prob = probs.cpu()[step.parents, step.token_ids].tolist()  # p(v | its beam)
        self._layers.append(step.layer)
        self._finished, self._stopped = step.finished, step.stop
        if not step.stop:  # one forward of the new beams, each reading its parent's path
            at = self._ctx.length
            paths = [[0] * len(self.prefix) + beams.ancestry(self._layers, j)[:-1]  # the row of every position
                     for j in range(len(step.layer.tokens))]
            device = self.lm.device
            tokens = torch.tensor(step.layer.tokens, device=device)[:, None]
            logits, hidden, cache = self.lm.forward(tokens, cache=self._ctx.paths(torch.tensor(paths, device=device)))
            self._ctx.append([(key[:, :, at], value[:, :, at]) for key, value in cache], hidden[:, -1].double())
            self._logits = logits[:, -1]
        k = len(step.token_ids)
        chosen = step.next_beam.index(0) if 0 in step.next_beam else 0
        return StepResult([step.token_ids], [lm_prob], [[NAN] * k], [[-1] * k], [[""] * k], [[NAN] * k], [[NAN] * k],
                          [step.scores], [chosen], [[]], [[NAN] * k], [step.parents], [step.next_beam],
                          [step.hypothesis_score])

    def _zerocap_step(self) -> StepResult:
        """ZeroCap: one step of its search (:func:`magic_edu.zerocap.search_step`) from the beams of
        the step before; the trace shows every live beam's best candidates by the fused q."""
        end = self.lm.eos_token_id if self.stop_at_eos else None
        step = zerocap.search_step(self.lm, self.clip, self._image_embedding, self.prefix,
                                   self._zerocap_beams[-1] if self._zerocap_beams else [], self.step_index,
                                   zerocap.ZeroCapSettings.of(self.params), end, self.forbidden_tokens)
        if not self.history and self._zerocap_beams:
            self._zerocap_beams.pop()  # keep only the last step's beams
        self._zerocap_beams.append(step.beams)
        self._stopped = all(b.finished for b in step.beams)
        nan, ids = [[NAN] * len(step.token_ids)], [step.token_ids]
        return StepResult(token_ids=ids, lm_prob=[step.p0], degeneration_penalty=nan, penalty_position=_unused(ids, -1),
                          clip_text=_unused(ids, ""), clip_cosine=nan, clip_score=[step.target], score=[step.score],
                          chosen=[step.chosen], chosen_similarity=[[]], sample_prob=nan, beam=[step.beam],
                          next_beam=[step.next_beam], hypothesis_score=nan, steered_prob=[step.p], fused_prob=[step.q],
                          iteration_probs=[step.iteration_p], iteration_targets=[step.iteration_target],
                          kept_beam=[step.kept_beam])

    def _record(self, result: StepResult, lengths: list[int | None], texts: list[str], forced: bool, cost: Cost
                ) -> StepRecord | None:
        step = self.step_index - 1
        # one device-to-host copy per field, not per row and field
        columns = {f.name: _rows(getattr(result, f.name)) for f in fields(result)}
        first = None
        for row, trace in enumerate(self.traces):
            if lengths[row] is not None:  # this row had already ended
                continue
            values = {name: column[row] for name, column in columns.items()}
            record = StepRecord(step=step, text=texts[row], tokens=self.lm.token_texts(values["token_ids"]),
                                forced=forced, cost=cost.copy(), **values)
            trace.steps.append(record)
            if row == 0:
                first = record
        return first


# -- the decoders ------------------------------------------------------------------------
# Settings left as None take the model's preset settings, else magic_edu.registry's defaults.
def greedy_search(
    lm: LanguageModel, *, prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True,
    record: bool = True,
) -> Generation:
    """Take argmax_v p(v|x) at every step."""
    return Stepper(lm, "greedy", prompt=prompt, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                   record=record, history=False).run()[0]


def top_k_sampling(
    lm: LanguageModel, *, k: int | None = None, temperature: float | None = None, seed: int | None = None,
    prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Sample from softmax(logits / temperature) renormalised over its k (default 40) most
    probable tokens (Fan et al. 2018); temperature 1 unless given. The same ``seed`` gives the
    same text."""
    return Stepper(lm, "top_k", k=k, temperature=temperature, seed=seed, prompt=prompt,
                   max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, record=record, history=False).run()[0]


def nucleus_sampling(
    lm: LanguageModel, *, p: float | None = None, temperature: float | None = None, seed: int | None = None,
    prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Sample from the smallest set of most probable tokens of softmax(logits / temperature) whose
    probabilities sum to at least ``p`` (default 0.95), renormalised (Holtzman et al. 2020); pure
    nucleus, no top-k cut; temperature 1 unless given."""
    return Stepper(lm, "nucleus", p=p, temperature=temperature, seed=seed, prompt=prompt,
                   max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, record=record, history=False).run()[0]


def typical_sampling(
    lm: LanguageModel, *, mass: float | None = None, temperature: float | None = None, seed: int | None = None,
    prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Locally typical sampling (Meister et al. 2023): of softmax(logits / temperature), keep the
    tokens whose surprise -log p(v) is closest to the entropy until they hold ``mass`` (default
    0.95) of the probability, renormalise, sample; temperature 1 unless given."""
    return Stepper(lm, "typical", mass=mass, temperature=temperature, seed=seed, prompt=prompt,
                   max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, record=record, history=False).run()[0]


def beam_search(
    lm: LanguageModel, *, num_beams: int | None = None, length_penalty: float | None = None,
    prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Keep the ``num_beams`` (default 4) most probable hypotheses and advance them all at every
    step; return the finished one of highest log p / length ** ``length_penalty`` (default 1.0).
    Exact to transformers 5.24's ``generate(num_beams=..., do_sample=False, early_stopping=False,
    length_penalty=...)``, float32 scores included (every rule: :mod:`magic_edu.beams`). The
    trace shows every beam's best continuations at every step."""
    return Stepper(lm, "beam", num_beams=num_beams, length_penalty=length_penalty, prompt=prompt,
                   max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, record=record, history=False).run()[0]


def contrastive_search(
    lm: LanguageModel, *, k: int | None = None, alpha: float | None = None, prompt: str | None = None,
    max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """argmax over the top-k of (1 - alpha) p(v|x) - alpha max_j cos(h_v, h_j) (Su et al. 2022, SimCTG);
    k = 5 and alpha = 0.6 unless the model's preset says otherwise."""
    return Stepper(lm, "contrastive", k=k, alpha=alpha, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record, history=False).run()[0]


def magic_search(
    lm: LanguageModel, clip: ImageTextMatcher, image: ImageLike | Sequence[ImageLike], *, k: int | None = None,
    alpha: float | None = None, beta: float | None = None, clip_text_max_len: int | None = None,
    prompt: str | None = None, max_new_tokens: int | None = None, stop_at_eos: bool = True, record: bool = True,
) -> Generation | list[Generation]:
    """MAGIC search (see the module docstring for every detail): argmax over the top-k of
    (1 - alpha) p(v|x) - alpha max_j cos(h_v, h_j) + beta softmax_k(logit_scale cos(I, t_v)).
    Settings: the model's preset's (``load_models``), else the paper's MSCOCO ones (k = 45,
    alpha = 0.1, beta = 2.0), ``clip_text_max_len`` 60.

    A list of images decodes as one batch and returns one Generation each.
    """
    gens = Stepper(lm, "magic", clip=clip, image=image, k=k, alpha=alpha, beta=beta,
                   clip_text_max_len=clip_text_max_len, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record, history=False).run()
    return gens if isinstance(image, (list, tuple)) else gens[0]


def zerocap_search(
    lm: LanguageModel, clip: ImageTextMatcher, image: ImageLike | Sequence[ImageLike], *,
    num_iterations: int | None = None, stepsize: float | None = None, grad_norm_factor: float | None = None,
    ce_scale: float | None = None, clip_scale: float | None = None, clip_temperature: float | None = None,
    fusion_factor: float | None = None, end_factor: float | None = None, forbidden_factor: float | None = None,
    repetition_penalty: float | None = None, candidates: int | None = None, num_beams: int | None = None,
    forbidden_tokens: Sequence[int] = (), prompt: str | None = zerocap.PROMPT, max_new_tokens: int | None = None,
    stop_at_eos: bool = True, record: bool = True,
) -> Generation | list[Generation]:
    """ZeroCap (Tewel et al. 2022; every formula: :mod:`magic_edu.zerocap`): at every step,
    num_iterations normalised gradient steps on the LM's keys and values (for each beam) lower
    clip_scale * CE(CLIP's target, p) + ce_scale * KL(p || p0); then
    q = p_shift ** fusion_factor * p0 ** (1 - fusion_factor), and the beams, ranked by summed
    log q / length, go on. Settings left out: ZeroCLIP.py's (the registry's), num_beams 1 (the
    MAGIC paper's baseline), the prompt "Image of a". Slow by nature: every token costs
    num_iterations forward and backward passes and num_iterations x candidates CLIP texts per beam.

    A list of images is captioned one image after another (one Generation each): the search
    is not batched.
    """
    settings = dict(num_iterations=num_iterations, stepsize=stepsize, grad_norm_factor=grad_norm_factor,
                    ce_scale=ce_scale, clip_scale=clip_scale, clip_temperature=clip_temperature,
                    fusion_factor=fusion_factor, end_factor=end_factor, forbidden_factor=forbidden_factor,
                    repetition_penalty=repetition_penalty, candidates=candidates, num_beams=num_beams,
                    forbidden_tokens=forbidden_tokens, prompt=prompt, max_new_tokens=max_new_tokens,
                    stop_at_eos=stop_at_eos, record=record, history=False)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise MagicEduError("image: the list of images is empty")
    gens = [Stepper(lm, "zerocap", clip=clip, image=one, **settings).run()[0] for one in images]
    return gens if isinstance(image, (list, tuple)) else gens[0]


def clip_retrieval_search(
    lm: LanguageModel, clip: ImageTextMatcher, image: ImageLike | Sequence[ImageLike], *, index: Any = None,
    record: bool = True,
) -> Generation | list[Generation]:
    """CLIP retrieval (CLIPRe, the paper's baseline) as a decoder: the caption of ``index`` (an index
    of texts: :func:`magic_edu.retrieval.build_text_index`, or the path of one) whose CLIP embedding
    is closest to the image's (:func:`magic_edu.retrieval.clip_retrieval`). Nothing is generated:
    ``text`` is that caption, ``token_ids`` its LM tokens and EOS (for its LM log-likelihood; the
    LM never chose them), and the trace has no steps; with ``record`` its settings hold the five
    best captions and their cosines (``"retrieved"``). A list of images gives one Generation each.
    """
    from .retrieval import as_index, clip_retrieval

    if index is None:
        raise MagicEduError("index: CLIP retrieval needs an index of captions: build_text_index(clip, captions) "
                            "or magic-edu index-text CAPTIONS -o index.safetensors")
    index = as_index(index, "text")
    found = clip_retrieval(clip, image if isinstance(image, (list, tuple)) else [image], index,
                           top_n=5 if _check_bool(record, "record") else 1)
    gens = []
    for hit in found:
        ids = list(lm.tokenizer(hit.text, add_special_tokens=False)["input_ids"]) + [lm.eos_token_id]
        settings = {"decoder": "clip_retrieval", "prompt": None, "lm": lm.name, "prefix_format": lm.prompt_format,
                    "clip": clip.name, "index": str(index.path) if index.path else "(in memory)",
                    "index_size": len(index), "from_preset": []}
        if record:
            settings["retrieved"] = [[text, score] for text, score in hit]
        prefix = lm.prefix_ids(None)
        gens.append(Generation(hit.text, ids, Trace(settings, prefix, [lm.token_text(i) for i in prefix])))
    return gens if isinstance(image, (list, tuple)) else gens[0]


# -- helpers ---------------------------------------------------------------------------
def _sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row drawn from ``probs`` (B, V) with ``gen``. The draw runs over the tokens
    sorted most probable first, as magic_edu always has, so a seed keeps giving the same text."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    return order.gather(1, torch.multinomial(sorted_p, 1, generator=gen))[:, 0]


def _index_of(token_id: int, candidates: torch.Tensor) -> int:
    hits = (candidates == token_id).nonzero()
    if len(hits) == 0:
        raise MagicEduError(f"force: token {token_id} is not among this step's candidates {candidates.tolist()}")
    return int(hits[0, 0])


def _repeat_rows(cache: KeysValues, n: int) -> KeysValues:
    """Keys and values with every row repeated n times (row i -> rows i*n .. i*n+n-1)."""
    return [(key.repeat_interleave(n, 0), value.repeat_interleave(n, 0)) for key, value in cache]


def _with_room(t: torch.Tensor, room: int, dim: int) -> torch.Tensor:
    """A new tensor with t's values first along ``dim`` and room for ``room`` positions there."""
    shape = list(t.shape)
    shape[dim] = max(room, t.shape[dim])
    out = t.new_empty(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _rows(x: Any) -> list:
    """A (B, ...) tensor or a list of B rows as a list of B rows (one device-to-host copy)."""
    return x.tolist() if isinstance(x, torch.Tensor) else x


def _check_forbidden(tokens: Any, spec: Any, vocab_size: int) -> tuple[int, ...]:
    """ZeroCap's forbidden token ids, each an int in [0, vocab_size); refused for other decoders."""
    if not isinstance(tokens, (list, tuple)):
        raise MagicEduError(f"forbidden_tokens must be a list of token ids; got {tokens!r}")
    if tokens and not spec.steers:
        raise MagicEduError(f"forbidden_tokens: {spec.label} has no forbidden tokens (ZeroCap has)")
    return tuple(check_int(t, "forbidden_tokens", 0, vocab_size - 1) for t in tokens)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise MagicEduError(f"{name} must be True or False; got {value!r}")
    return value
