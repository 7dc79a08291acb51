"""The decode loop: greedy, top-k, nucleus, contrastive and MAGIC search, one step at a time.

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
:class:`Stepper` runs any decoder one token at a time, can go back, and can be forced
to take another candidate ("what if?"); the decoder functions below just run it to the end.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import MagicEduError
from .inputs import ImageLike, check_float, check_int
from .models import ImageTextMatcher, KeysValues, LanguageModel
from .scoring import ClipScorer, degeneration_penalty, magic_score
from .trace import Generation, StepRecord, Trace

DECODERS = ("greedy", "top_k", "nucleus", "contrastive", "magic")
CANDIDATE_DECODERS = ("contrastive", "magic")
TRACE_TOP = 10  # candidates shown in a greedy / nucleus trace

NAN = float("nan")


@dataclass
class _State:
    """Everything a step needs; steps never modify a state, so Back just pops one."""

    cache: KeysValues  # the LM's keys and values of every position so far, batch B
    logits: torch.Tensor  # (B, V): next-token logits
    hidden: torch.Tensor  # (B, T, d): last-layer hidden states of every position so far, float64
    generated: list[list[int]]  # ids generated so far, per row (rows keep going after EOS)
    lengths: list[int | None]  # per row: number of ids in the output once it has ended
    rng_state: torch.Tensor | None


class Stepper:
    """Advance one decode a token at a time.

    >>> s = Stepper(lm, "magic", clip=clip, image=img, k=45, alpha=0.1, beta=2.0)
    >>> record = s.step()                 # a StepRecord: every candidate and its scores
    >>> s.step(force=record.token_ids[3])  # what if it had taken the 4th candidate?
    >>> s.back()                          # undo the last step
    >>> s.generation().text

    ``image`` may be a list: the rows then decode as one batch (MAGIC only), exactly as
    one by one. Forcing is for a single row.
    """

    def __init__(
        self,
        lm: LanguageModel,
        decoder: str = "magic",
        clip: ImageTextMatcher | None = None,
        image: ImageLike | Sequence[ImageLike] | None = None,
        *,
        prompt: str | None = None,
        k: int = 5,
        alpha: float = 0.6,
        beta: float = 2.0,
        p: float = 0.95,
        seed: int | None = None,
        max_new_tokens: int = 16,
        stop_at_eos: bool = True,
        clip_text_max_len: int = 60,
        record: bool = True,
    ) -> None:
        if decoder not in DECODERS:
            raise MagicEduError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
        self.lm, self.clip, self.decoder = lm, clip, decoder
        self.k = check_int(k, "k", 1, lm.vocab_size)
        self.alpha = check_float(alpha, "alpha", 0.0, 1.0)
        self.beta = check_float(beta, "beta", 0.0)
        self.p = check_float(p, "p", 0.0, 1.0)
        if decoder == "nucleus" and self.p == 0.0:
            raise MagicEduError("p must be a number in (0, 1] for nucleus sampling; got 0")
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
        self.clip_text_max_len = check_int(clip_text_max_len, "clip_text_max_len", 1)
        self.stop_at_eos, self.record = bool(stop_at_eos), bool(record)
        if seed is None:
            seed = secrets.randbits(31)
        self.seed = check_int(seed, "seed", 0)

        self.prefix = lm.prefix_ids(prompt)
        if len(self.prefix) >= lm.context_length:
            raise MagicEduError(
                f"prompt: its {len(self.prefix)} prefix ids leave no room in the model's context of "
                f"{lm.context_length} tokens; shorten the prompt"
            )
        if len(self.prefix) + self.max_new_tokens > lm.context_length:
            raise MagicEduError(
                f"max_new_tokens: the prompt's {len(self.prefix)} prefix ids plus max_new_tokens="
                f"{self.max_new_tokens} exceed the model's context of {lm.context_length} tokens; "
                f"max_new_tokens may be at most {lm.context_length - len(self.prefix)}"
            )

        images: list[Any] = []
        self.scorer: ClipScorer | None = None
        if decoder == "magic":
            if clip is None or image is None:
                raise MagicEduError("magic search needs clip= (an ImageTextMatcher) and image=")
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if not images:
                raise MagicEduError("image: the list of images is empty")
            self.scorer = ClipScorer(lm, clip, clip.embed_image(images).reshape(len(images), -1),
                                     self.clip_text_max_len)
        self.batch_size = max(1, len(images))

        settings = {
            "decoder": decoder, "prompt": prompt, "max_new_tokens": self.max_new_tokens,
            "stop_at_eos": self.stop_at_eos, "lm": lm.name, "prefix_format": lm.prompt_format,
        }
        if decoder in CANDIDATE_DECODERS:
            settings.update(k=self.k, alpha=self.alpha)
        if decoder == "magic":
            settings.update(beta=self.beta, clip=clip.name, logit_scale=clip.logit_scale,
                            clip_text_max_len=self.clip_text_max_len)
        if decoder == "top_k":
            settings.update(k=self.k, seed=self.seed)
        if decoder == "nucleus":
            settings.update(p=self.p, seed=self.seed)
        prefix_tokens = [lm.token_text(i) for i in self.prefix]
        self.traces = [Trace(dict(settings), list(self.prefix), prefix_tokens) for _ in range(self.batch_size)]
        self._history: list[_State] = []
        self._state = self._start()

    # -- state ----------------------------------------------------------------------
    def _start(self) -> _State:
        ids = torch.tensor([self.prefix], device=self.lm.device)
        logits, hidden, cache = self.lm.forward(ids)
        b = self.batch_size
        rng = None
        if self.decoder in ("top_k", "nucleus"):
            rng = torch.Generator().manual_seed(self.seed).get_state()
        return _State(_repeat_rows(cache, b), logits[:, -1].expand(b, -1), hidden.double().expand(b, -1, -1),
                      [[] for _ in range(b)], [None] * b, rng)

    @property
    def step_index(self) -> int:
        """Number of tokens generated so far."""
        return len(self._state.generated[0])

    @property
    def done(self) -> bool:
        s = self._state
        return all(n is not None for n in s.lengths) or self.step_index >= self.max_new_tokens

    def token_ids(self, row: int = 0) -> list[int]:
        """The ids generated so far by one row (up to and including EOS)."""
        s = self._state
        n = s.lengths[row]
        return list(s.generated[row][: n if n is not None else len(s.generated[row])])

    def text(self, row: int = 0) -> str:
        """The output text so far (the reference's parser applied)."""
        return self.lm.output_text(self.token_ids(row))

    def generation(self, row: int = 0) -> Generation:
        return Generation(self.text(row), self.token_ids(row), self.traces[row])

    def generations(self) -> list[Generation]:
        return [self.generation(b) for b in range(self.batch_size)]

    def back(self) -> None:
        """Undo the last step (its record leaves the trace too)."""
        if not self._history:
            raise MagicEduError("back(): nothing to undo, the decode is at its first step")
        self._state = self._history.pop()
        for trace in self.traces:
            while trace.steps and trace.steps[-1].step >= self.step_index:
                trace.steps.pop()

    def reset(self) -> None:
        """Back to the first step."""
        while self._history:
            self.back()

    def run(self) -> list[Generation]:
        """Step until every row has ended; one Generation per row."""
        while not self.done:
            self.step()
        return self.generations()

    # -- one step -------------------------------------------------------------------
    def step(self, force: int | None = None) -> StepRecord | None:
        """Generate one token per row and return row 0's record (None if not recording).

        ``force``: a token id among this step's candidates, taken instead of the decoder's choice.
        """
        if self.done:
            raise MagicEduError("step(): the decode has ended; use back() or reset() to go on")
        if force is not None and self.batch_size > 1:
            raise MagicEduError("force: forcing a token works on one image at a time, not a batch")
        s = self._state
        probs = torch.softmax(s.logits.double(), dim=-1)  # p(v|x) over the whole vocabulary
        if self.decoder in CANDIDATE_DECODERS:
            new, parts = self._candidate_step(s, probs, force)
        else:
            new, parts = self._token_step(s, probs, force)
        self._history.append(s)
        self._state = new
        if self.record:
            self._record(s, new, parts, force is not None)
            return self.traces[0].steps[-1] if self.traces[0].steps else None
        return None

    def _candidate_step(self, s: _State, probs: torch.Tensor, force: int | None) -> tuple[_State, dict]:
        """Contrastive / MAGIC search: score the top-k candidates, take the best."""
        b, k = self.batch_size, self.k
        lm_prob, candidates = probs.topk(k, dim=-1)  # (B, k), most probable first
        # the candidates' ids reach the host before the LM forward is queued, so on a GPU the
        # CLIP texts are built and tokenised on the CPU while the GPU runs the LM
        candidate_ids = candidates.tolist() if self.scorer is not None else None
        hidden_k, cache_k = self.lm.forward_candidates(candidates.to(self.lm.device), s.cache)  # (B, k, d)
        penalty, position, cosines = degeneration_penalty(hidden_k.double(), s.hidden)
        if self.scorer is not None:
            clip_texts, clip_cosine, clip_score = self.scorer(s.generated, candidate_ids)
            clip_cosine, clip_score = clip_cosine.to(lm_prob.device), clip_score.to(lm_prob.device)
        else:
            clip_texts, clip_cosine, clip_score = None, None, torch.zeros_like(lm_prob)
        score = magic_score(lm_prob, penalty, clip_score, self.alpha, self.beta)
        chosen = score.argmax(dim=-1)  # the first maximum: ties go to the more probable
        if force is not None:
            chosen[0] = _index_of(force, candidates[0])
        chosen_lm = chosen.to(hidden_k.device)
        chosen_hidden = hidden_k[torch.arange(b, device=chosen_lm.device), chosen_lm]  # (B, d)
        new = self._advance(
            s, candidates.gather(1, chosen[:, None])[:, 0].tolist(),
            _keep_candidate(cache_k, s.hidden.shape[1], chosen_lm), self.lm.logits(chosen_hidden),
            chosen_hidden[:, None], s.rng_state,
        )
        parts = dict(ids=candidates, lm_prob=lm_prob, penalty=penalty, position=position, clip_texts=clip_texts,
                     clip_cosine=clip_cosine, clip_score=clip_score if self.scorer is not None else None,
                     score=score, chosen=chosen, chosen_similarity=cosines[torch.arange(b), chosen])
        return new, parts

    def _token_step(self, s: _State, probs: torch.Tensor, force: int | None) -> tuple[_State, dict]:
        """Greedy search and sampling: pick one token from p, then one forward of it."""
        shown_k = self.k if self.decoder == "top_k" else min(TRACE_TOP, probs.shape[-1])
        shown_p, shown = probs.topk(shown_k, dim=-1)
        rng_state = s.rng_state
        if force is not None:
            _index_of(force, shown[0])
            chosen_ids = torch.tensor([force])
        elif self.decoder == "greedy":
            chosen_ids = shown[:, 0]
        else:
            gen = torch.Generator().manual_seed(0)
            gen.set_state(s.rng_state)
            chosen_ids = _sample(probs.cpu(), self.decoder, self.k, self.p, gen)
            rng_state = gen.get_state()
        logits, hidden, cache = self.lm.forward(chosen_ids[:, None].to(self.lm.device), cache=s.cache)
        new = self._advance(s, chosen_ids.tolist(), cache, logits[:, -1], hidden, rng_state)
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
        parts = dict(ids=ids, lm_prob=lm_prob, penalty=None, position=None, clip_texts=None, clip_cosine=None,
                     clip_score=None, score=lm_prob, chosen=chosen, chosen_similarity=None)
        return new, parts

    def _advance(self, s: _State, chosen: list[int], cache: KeysValues, logits: torch.Tensor, hidden: torch.Tensor,
                 rng_state: torch.Tensor | None) -> _State:
        generated = [g + [c] for g, c in zip(s.generated, chosen)]
        lengths = list(s.lengths)
        for row, c in enumerate(chosen):
            if lengths[row] is None and self.stop_at_eos and c == self.lm.eos_token_id:
                lengths[row] = len(generated[row])
        return _State(cache, logits, torch.cat([s.hidden, hidden.double()], dim=1), generated, lengths,
                      rng_state)

    def _record(self, s: _State, new: _State, parts: dict, forced: bool) -> None:
        step = len(s.generated[0])
        # one device-to-host copy per field, not per row and field
        parts = {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in parts.items()}
        for row, trace in enumerate(self.traces):
            if s.lengths[row] is not None:  # this row had already ended
                continue
            ids = [int(i) for i in parts["ids"][row]]
            n = len(ids)
            nan, blank = [NAN] * n, [""] * n
            lm_prob = _floats(parts["lm_prob"][row])
            trace.steps.append(StepRecord(
                step=step,
                text=self.lm.output_text(s.generated[row]),
                token_ids=ids,
                tokens=self.lm.token_texts(ids),
                lm_prob=lm_prob,
                degeneration_penalty=_floats(parts["penalty"][row]) if parts["penalty"] is not None else nan,
                penalty_position=[int(j) for j in parts["position"][row]]
                if parts["position"] is not None else [-1] * n,
                clip_text=list(parts["clip_texts"][row]) if parts["clip_texts"] is not None else blank,
                clip_cosine=_floats(parts["clip_cosine"][row]) if parts["clip_cosine"] is not None else nan,
                clip_score=_floats(parts["clip_score"][row]) if parts["clip_score"] is not None else nan,
                score=_floats(parts["score"][row]),
                chosen=int(parts["chosen"][row]),
                forced=forced,
                chosen_similarity=_floats(parts["chosen_similarity"][row])
                if parts["chosen_similarity"] is not None else [],
            ))


# -- the decoders ------------------------------------------------------------------------
def greedy_search(
    lm: LanguageModel, *, prompt: str | None = None, max_new_tokens: int = 16, stop_at_eos: bool = True,
    record: bool = True,
) -> Generation:
    """Take argmax_v p(v|x) at every step."""
    return Stepper(lm, "greedy", prompt=prompt, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
                   record=record).run()[0]


def top_k_sampling(
    lm: LanguageModel, *, k: int = 40, seed: int | None = None, prompt: str | None = None,
    max_new_tokens: int = 16, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Sample from p renormalised over its k most probable tokens (Fan et al. 2018).
    The same ``seed`` gives the same text."""
    return Stepper(lm, "top_k", k=k, seed=seed, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record).run()[0]


def nucleus_sampling(
    lm: LanguageModel, *, p: float = 0.95, seed: int | None = None, prompt: str | None = None,
    max_new_tokens: int = 16, stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """Sample from the smallest set of most probable tokens whose probabilities sum to at
    least ``p``, renormalised (Holtzman et al. 2020); pure nucleus, no top-k cut."""
    return Stepper(lm, "nucleus", p=p, seed=seed, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record).run()[0]


def contrastive_search(
    lm: LanguageModel, *, k: int = 5, alpha: float = 0.6, prompt: str | None = None, max_new_tokens: int = 16,
    stop_at_eos: bool = True, record: bool = True,
) -> Generation:
    """argmax over the top-k of (1 - alpha) p(v|x) - alpha max_j cos(h_v, h_j) (Su et al. 2022, SimCTG)."""
    return Stepper(lm, "contrastive", k=k, alpha=alpha, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record).run()[0]


def magic_search(
    lm: LanguageModel, clip: ImageTextMatcher, image: ImageLike | Sequence[ImageLike], *, k: int = 45,
    alpha: float = 0.1, beta: float = 2.0, clip_text_max_len: int = 60, prompt: str | None = None,
    max_new_tokens: int = 16, stop_at_eos: bool = True, record: bool = True,
) -> Generation | list[Generation]:
    """MAGIC search (see the module docstring for every detail): argmax over the top-k of
    (1 - alpha) p(v|x) - alpha max_j cos(h_v, h_j) + beta softmax_k(logit_scale cos(I, t_v)).

    A list of images decodes as one batch and returns one Generation each.
    """
    gens = Stepper(lm, "magic", clip=clip, image=image, k=k, alpha=alpha, beta=beta,
                   clip_text_max_len=clip_text_max_len, prompt=prompt, max_new_tokens=max_new_tokens,
                   stop_at_eos=stop_at_eos, record=record).run()
    return gens if isinstance(image, (list, tuple)) else gens[0]


# -- helpers ---------------------------------------------------------------------------
def _sample(probs: torch.Tensor, decoder: str, k: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from top-k or nucleus-filtered probabilities."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if decoder == "top_k":
        keep = torch.arange(sorted_p.shape[-1]) < k
    else:  # nucleus: keep a token while the mass before it is still below p
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < p
    filtered = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    picked = torch.multinomial(filtered / filtered.sum(dim=-1, keepdim=True), 1, generator=gen)
    return order.gather(1, picked)[:, 0]


def _index_of(token_id: int, candidates: torch.Tensor) -> int:
    hits = (candidates == int(token_id)).nonzero()
    if len(hits) == 0:
        raise MagicEduError(f"force: token {token_id} is not among this step's candidates {candidates.tolist()}")
    return int(hits[0, 0])


def _repeat_rows(cache: KeysValues, n: int) -> KeysValues:
    """Keys and values with every row repeated n times (row i -> rows i*n .. i*n+n-1)."""
    return [(key.repeat_interleave(n, 0), value.repeat_interleave(n, 0)) for key, value in cache]


def _keep_candidate(cache: KeysValues, past: int, chosen: torch.Tensor) -> KeysValues:
    """From the keys and values of ``LanguageModel.forward_candidates`` (``past`` positions, then
    the k candidates), new tensors of the ``past`` positions plus each row's chosen candidate
    (new, so that a state kept for Back holds no room for k candidates)."""
    if len(chosen) == 1:  # one row: plain indexing, cheaper than gathering
        rows, at = slice(None), past + int(chosen[0])
    else:
        rows, at = torch.arange(len(chosen), device=chosen.device), past + chosen

    def with_chosen(t: torch.Tensor) -> torch.Tensor:  # t[rows, :, at] is (B, heads, d_head) either way
        return torch.cat([t[:, :, :past], t[rows, :, at][:, :, None]], dim=2)

    return [(with_chosen(key), with_chosen(value)) for key, value in cache]


def _floats(xs: Any) -> list[float]:
    return [float(x) for x in (xs if isinstance(xs, list) else [xs])]
