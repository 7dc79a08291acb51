"""Beam search against three independent references: transformers' own
``generate(num_beams=..., do_sample=False, early_stopping=False, length_penalty=...)``; a slow beam
search written here from the rules alone (no cache, no tree, a full forward per hypothesis); and an
exhaustive search over every continuation where beam search provably explores them all. Then
cases worked by hand on a bigram model whose probabilities are set by hand, the trace, the
Stepper (Back, forcing), and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers.utils import logging as hf_logging

from magic_edu import MagicEduError, Stepper, Trace, beam_search, greedy_search, load_models
from magic_edu.models import LanguageModel
from magic_edu.tools import analysis
from magic_edu.tools.random_models import EOS, random_language_model, word_tokenizer

hf_logging.set_verbosity_error()  # generate's notes on flags that greedy search (num_beams=1) ignores


# -- the references ---------------------------------------------------------------------------
def transformers_beam_search(lm: LanguageModel, prompt: str | None, num_beams: int, length_penalty: float,
                             max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """The ids transformers' generate returns after the prefix."""
    prefix = lm.prefix_ids(prompt)
    ids = torch.tensor([prefix])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, do_sample=False,
                            early_stopping=False, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                            eos_token_id=lm.eos_token_id if stop_at_eos else None, pad_token_id=lm.eos_token_id)
    return out[0, len(prefix):].tolist()


@torch.no_grad()
def slow_beam_search(lm: LanguageModel, prompt: str | None, num_beams: int, length_penalty: float,
                     max_new_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], list[list[tuple]]]:
    """Beam search from its rules, the plain way: (the result's ids, per step the candidates looked at
    as (token, beam it extends, summed log-probability)). Scores in float32, as transformers keeps them."""
    prefix, n = lm.prefix_ids(prompt), num_beams
    beams = [([], torch.tensor(0.0))]  # (generated ids, summed log-probability)
    finished = []  # (score, ids), best first
    steps = []
    for t in range(max_new_tokens):
        candidates = []
        for b, (ids, log_p) in enumerate(beams):
            logits = lm.model(torch.tensor([prefix + ids])).logits[0, -1]
            for v, lp in enumerate(torch.log_softmax(logits.float(), dim=-1)):
                candidates.append((log_p + lp, b, v))
        candidates.sort(key=lambda c: -c[0].item())  # (sort is stable: ties keep beam, then token order)
        candidates = candidates[: 2 * n]
        steps.append([(v, b, score.item()) for score, b, v in candidates])
        beams_next = []
        for rank, (score, b, v) in enumerate(candidates):
            ids = beams[b][0] + [v]
            if t + 1 == max_new_tokens or (stop_at_eos and v == lm.eos_token_id):
                if rank < n:  # only the n best may end
                    finished.append(((score / (t + 1) ** length_penalty).item(), ids))
            elif len(beams_next) < n:
                beams_next.append((ids, score))
        finished = sorted(finished, key=lambda h: -h[0])[:n]
        beams = beams_next
        if not beams:
            break
        if len(finished) == n and not (beams[0][1] / (t + 1) ** length_penalty).item() > finished[-1][0]:
            break
    return finished[0][1], steps


@torch.no_grad()
def every_hypothesis(lm: LanguageModel, max_new_tokens: int, stop_at_eos: bool) -> dict[tuple[int, ...], float]:
    """Every hypothesis beam search could return, with its summed log-probability (float64): the ones
    ending in EOS before the last step, and every sequence of max_new_tokens tokens."""
    prefix, out = lm.prefix_ids(None), {}

    def grow(ids: list[int], log_p: float) -> None:
        logits = lm.model(torch.tensor([prefix + ids])).logits[0, -1]
        for v, lp in enumerate(torch.log_softmax(logits.double(), dim=-1).tolist()):
            seq = (*ids, v)
            if len(seq) == max_new_tokens or (stop_at_eos and v == lm.eos_token_id):
                out[seq] = log_p + lp
            else:
                grow(list(seq), log_p + lp)

    grow([], 0.0)
    return out


# -- the models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_lm():
    """A float64 tiny LM that ends often (+3 on EOS's logit), so hypotheses finish early and the
    search's stopping rule is exercised."""
    lm = random_language_model(seed=1, n_layer=2, n_embd=48, dtype=torch.float64)
    head = torch.nn.Linear(48, lm.vocab_size, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(lm.model.lm_head.weight)
        head.bias.zero_()
        head.bias[lm.eos_token_id] = 3.0
    lm.model.lm_head = head
    return lm


@pytest.fixture(scope="module")
def toy_lm():
    return load_models("toy").lm


@pytest.fixture(scope="module")
def six_token_lm():
    """A random GPT-2 over six tokens (EOS, four words, the start token), small enough to enumerate."""
    return random_language_model(seed=4, tokenizer=word_tokenizer(5), dtype=torch.float64, initializer_range=0.5)


def bigram_lm(table: dict[str, dict[str, float]]) -> LanguageModel:
    """A GPT-2 whose next-token probabilities depend on the last token only and are ``table``'s:
    attention and MLP weights are zero and there are no position embeddings, so the last hidden
    state is ln_f(embedding of the last token), and the LM head is solved to map it to log p."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = [EOS, "<s>", "a", "b", "c"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    config = GPT2Config(vocab_size=len(words), n_positions=32, n_embd=16, n_layer=1, n_head=1, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double()
    log_p = torch.full((len(words), len(words)), math.log(1e-6), dtype=torch.float64)
    for prev, nexts in table.items():
        for word, p in nexts.items():
            log_p[words.index(prev), words.index(word)] = math.log(p)
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.wpe.weight.zero_()
        hidden = model.transformer.ln_f(model.transformer.wte.weight)  # (V, d): the state after each token
        model.lm_head.weight.copy_(torch.linalg.lstsq(hidden, log_p).solution.T)
    lm = LanguageModel(model, tokenizer, sos_token="<s>", prompt_format="{sos}", name="bigram")
    logits = lm.model(torch.tensor([[words.index("<s>"), words.index("a")]])).logits[0]
    torch.testing.assert_close(logits, log_p[[1, 2]])  # the table, as logits (softmax renormalises the 1e-6s)
    return lm


# the hand-worked model: after <s>, "a" 0.6, EOS 0.3, "b" 0.1; after "a", "b" 0.9, EOS 0.1;
# after "b", EOS 0.95, "a" 0.05; after "c" EOS; after EOS "a" 0.7, "b" 0.3 (every other entry 1e-6)
TABLE = {"<s>": {"a": 0.6, EOS: 0.3, "b": 0.1}, "a": {"b": 0.9, EOS: 0.1}, "b": {EOS: 0.95, "a": 0.05},
         "c": {EOS: 1.0}, EOS: {"a": 0.7, "b": 0.3}}


@pytest.fixture(scope="module")
def hand_lm():
    return bigram_lm(TABLE)


# -- against transformers -----------------------------------------------------------------------
GRID = list(itertools.product([None, "a red"], [1, 2, 3, 5], [1.0, 0.0, 2.0, -1.0], [1, 4, 9]))


@pytest.mark.parametrize("model", ["tiny_lm", "tiny_lm64", "eos_lm", "toy_lm"])
def test_beam_search_is_transformers_beam_search(model, request):
    lm = request.getfixturevalue(model)
    ended = early = 0
    for prompt, n, lp, length in GRID[::2] if model != "eos_lm" else GRID:
        gen = beam_search(lm, num_beams=n, length_penalty=lp, prompt=prompt, max_new_tokens=length)
        assert gen.token_ids == transformers_beam_search(lm, prompt, n, lp, length), (prompt, n, lp, length)
        ended += gen.token_ids[-1] == lm.eos_token_id
        early += len(gen.trace) < length  # stopped before the length: no beam could beat the finished ones
    if model == "eos_lm":
        assert ended >= 10 and early >= 5, (ended, early)  # the test covers hypotheses that end, and early stops


@pytest.mark.parametrize("n, lp, length", [(2, 1.0, 8), (4, 0.5, 6), (3, -0.5, 7)])
def test_beam_search_without_eos_runs_to_the_length_as_transformers_does(eos_lm, n, lp, length):
    gen = beam_search(eos_lm, num_beams=n, length_penalty=lp, max_new_tokens=length, stop_at_eos=False)
    assert len(gen.token_ids) == length and eos_lm.eos_token_id in gen.token_ids  # EOS is just a token here
    assert gen.token_ids == transformers_beam_search(eos_lm, None, n, lp, length, stop_at_eos=False)


def test_beam_search_on_a_bigger_vocabulary_is_transformers_beam_search():
    lm = random_language_model(seed=5, tokenizer=word_tokenizer(3000), n_embd=64)
    for n, lp in ((4, 1.0), (6, 0.7)):
        gen = beam_search(lm, num_beams=n, length_penalty=lp, max_new_tokens=8)
        assert gen.token_ids == transformers_beam_search(lm, None, n, lp, 8)


def test_the_hand_worked_model_is_transformers_too(hand_lm):
    for n, lp, length, stop in itertools.product([1, 2, 3, 5], [1.0, 0.0, -2.0, 3.0], [1, 3, 5], [True, False]):
        assert (beam_search(hand_lm, num_beams=n, length_penalty=lp, max_new_tokens=length, stop_at_eos=stop).token_ids
                == transformers_beam_search(hand_lm, None, n, lp, length, stop)), (n, lp, length, stop)


# -- against the slow implementation and the exhaustive search ---------------------------------------
@pytest.mark.parametrize("model", ["eos_lm", "six_token_lm"])
def test_beam_search_is_the_slow_beam_search_step_by_step(model, request):
    lm = request.getfixturevalue(model)
    for n, lp, length, stop in itertools.product([1, 2, 4, 6], [1.0, -1.5, 2.5], [3, 7], [True, False]):
        gen = beam_search(lm, num_beams=n, length_penalty=lp, max_new_tokens=length, stop_at_eos=stop)
        ids, steps = slow_beam_search(lm, None, n, lp, length, stop)
        assert gen.token_ids == ids, (n, lp, length, stop)
        assert len(gen.trace) == len(steps)
        for record, want in zip(gen.trace, steps):
            assert list(zip(record.token_ids, record.beam)) == [(v, b) for v, b, _ in want]
            assert record.score == pytest.approx([s for _, _, s in want], abs=1e-5)


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("stop_at_eos", [True, False])
@pytest.mark.parametrize("lp", [1.0, 0.0, -1.0, 3.0])
def test_with_as_many_beams_as_tokens_short_searches_are_exhaustive(six_token_lm, length, stop_at_eos, lp):
    """With num_beams = V, every first token is looked at and every one that goes on is kept, and at
    the second (last) step the best num_beams candidates end: for one or two tokens, beam search
    returns the best of all continuations by log p / length ** length_penalty."""
    lm = six_token_lm
    scores = {ids: log_p / len(ids) ** lp for ids, log_p in every_hypothesis(lm, length, stop_at_eos).items()}
    best = max(scores.values())
    gen = beam_search(lm, num_beams=lm.vocab_size, length_penalty=lp, max_new_tokens=length, stop_at_eos=stop_at_eos)
    assert scores[tuple(gen.token_ids)] == pytest.approx(best, abs=1e-6)
    assert len(scores) == (lm.vocab_size if length == 1 else 1 + 5 * 6 if stop_at_eos else 36)


# -- worked by hand -------------------------------------------------------------------------------
def ids(lm: LanguageModel, *words: str) -> list[int]:
    return [lm.tokenizer.convert_tokens_to_ids(w) for w in words]


def test_hand_worked_search_with_length_penalty_1(hand_lm):
    """Two beams. Step 0: "a" (0.6) and EOS (0.3) are the two best; EOS ends: [EOS], score log 0.3.
    Step 1: a b (0.54), b EOS (0.095), a EOS (0.06), b a (0.005): b EOS is among the two best and ends
    (score log 0.095 / 2); a EOS is third, so it is dropped, not finished. Step 2: a b EOS (0.513)
    ends with score log 0.513 / 3 = -0.2225; the best beam left, a b a (0.027), can reach at best
    log 0.027 / 3 = -1.204 <= -1.177, the worse finished score: the search stops after 3 steps."""
    lm = hand_lm
    gen = beam_search(lm, num_beams=2, length_penalty=1.0, max_new_tokens=5)
    assert gen.token_ids == ids(lm, "a", "b", EOS) and gen.text == "a b"
    steps = gen.trace.steps
    assert len(steps) == 3
    step0, step1, step2 = steps
    assert step0.tokens[:2] == ["a", EOS] and step0.next_beam[:2] == [0, -1]
    assert step0.hypothesis_score[1] == pytest.approx(math.log(0.3), abs=1e-5)
    assert step1.tokens == ["b", EOS, EOS, "a"] and step1.beam == [0, 1, 0, 1]
    assert step1.score == pytest.approx([math.log(p) for p in (0.54, 0.095, 0.06, 0.005)], abs=1e-5)
    assert step1.next_beam == [0, -1, -1, 1]  # a EOS is third: dropped
    assert step1.hypothesis_score[1] == pytest.approx(math.log(0.095) / 2, abs=1e-5)
    assert math.isnan(step1.hypothesis_score[2])
    assert step2.hypothesis_score[0] == pytest.approx(math.log(0.513) / 3, abs=1e-5)
    assert step2.score[1] == pytest.approx(math.log(0.027), abs=1e-5) and step2.next_beam[1] == 0


def test_hand_worked_length_penalties(hand_lm):
    """length_penalty -2 (score = log p * length ** 2) favours the shortest: [EOS] (-1.204) beats
    b EOS (-9.42) and a b EOS (-6.01), and the best beam left after step 2 (a b a: -32.5) cannot
    catch up: 3 steps, the empty caption. length_penalty 0: the most probable, a b EOS (log 0.513).
    length_penalty 3 (log p / length ** 3) favours long ones: the beams stay worth following, the
    search runs to the last step, and a b EOS (-0.0247) still wins over a b a b EOS (-0.0301)."""
    lm = hand_lm
    shortest = beam_search(lm, num_beams=2, length_penalty=-2.0, max_new_tokens=5)
    assert shortest.token_ids == ids(lm, EOS) and shortest.text == "" and len(shortest.trace) == 3
    assert beam_search(lm, num_beams=2, length_penalty=0.0, max_new_tokens=5).token_ids == ids(lm, "a", "b", EOS)
    long = beam_search(lm, num_beams=2, length_penalty=3.0, max_new_tokens=5)
    assert long.token_ids == ids(lm, "a", "b", EOS) and len(long.trace) == 5
    last = long.trace.steps[-1]
    assert last.tokens[0] == EOS and last.hypothesis_score[0] == pytest.approx(math.log(0.54 * 0.05 * 0.9 * 0.95) / 125,
                                                                                abs=1e-6)


def test_hand_worked_without_eos_and_at_the_length(hand_lm):
    """Without stop_at_eos, EOS is a token like the others and only the length ends a hypothesis:
    the two best 2-token sequences are a b (0.54) and EOS a (0.21); a b wins. With one beam and
    one token, the result is the most probable first token."""
    lm = hand_lm
    gen = beam_search(lm, num_beams=2, max_new_tokens=2, stop_at_eos=False)
    assert gen.token_ids == ids(lm, "a", "b")
    assert gen.trace.steps[1].tokens[:2] == ["b", "a"] and gen.trace.steps[1].beam[:2] == [0, 1]
    assert gen.trace.steps[1].hypothesis_score[:2] == pytest.approx([math.log(0.54) / 2, math.log(0.21) / 2], abs=1e-5)
    assert beam_search(lm, num_beams=1, max_new_tokens=1).token_ids == ids(lm, "a")


# -- the decoder in the Stepper ------------------------------------------------------------------------
def test_one_beam_is_greedy_search(tiny_lm64, toy_lm):
    """With one beam the best continuation goes on until EOS is the best, which then beats every
    beam of its length: greedy search."""
    for lm in (tiny_lm64, toy_lm):
        for prompt in (None, "a red"):
            assert (beam_search(lm, num_beams=1, prompt=prompt, max_new_tokens=12).token_ids
                    == greedy_search(lm, prompt=prompt, max_new_tokens=12).token_ids)


def test_the_trace_describes_the_search(eos_lm, tmp_path):
    n = 3
    for lp, length in ((1.0, 9), (-1.0, 6), (2.0, 12)):
        gen = beam_search(eos_lm, num_beams=n, length_penalty=lp, max_new_tokens=length)
        trace = gen.trace
        assert trace.settings["decoder"] == "beam" and trace.settings["num_beams"] == n
        beams_before = 1
        for record in trace:
            assert record.k == min(2 * n, beams_before * eos_lm.vocab_size)
            assert record.score == sorted(record.score, reverse=True)
            assert all(0 <= b < beams_before for b in record.beam)
            kept = [b for b in record.next_beam if b >= 0]
            assert kept == list(range(len(kept))) and len(kept) <= n
            ended = [i for i, s in enumerate(record.hypothesis_score) if not math.isnan(s)]
            assert all(i < n and record.next_beam[i] == -1 for i in ended)
            assert record.chosen == (record.next_beam.index(0) if kept else 0)
            assert all(math.isnan(x) for x in record.sample_prob + record.degeneration_penalty)
            beams_before = len(kept)
        # the trace alone gives the result back (the plots and the widgets use this)
        assert analysis.chosen_ids(trace) == gen.token_ids
        path = tmp_path / f"beam{lp}.json"
        loaded = Trace.load(trace.save(path))
        assert loaded.to_frame().equals(trace.to_frame()) and analysis.chosen_ids(loaded) == gen.token_ids


def test_the_stepper_steps_back_and_refuses_to_force(eos_lm):
    s = Stepper(eos_lm, "beam", num_beams=3, length_penalty=0.5, max_new_tokens=10)
    first = s.step()
    assert len(s.beams()) == 3 and s.token_ids() == [first.token_ids[first.chosen]]
    with pytest.raises(MagicEduError, match="^force: forcing a token is not meaningful for beam search"):
        s.step(force=first.token_ids[1])
    assert s.step_index == 1
    second = s.step()
    s.back()
    assert s.step().score == second.score
    gen = s.run()[0]
    assert s.done and gen.token_ids == beam_search(eos_lm, num_beams=3, length_penalty=0.5,
                                                   max_new_tokens=10).token_ids
    assert s.hypotheses()[0][0] == gen.token_ids and gen.text == eos_lm.output_text(gen.token_ids)
    with pytest.raises(MagicEduError, match="ended"):
        s.step()
    s.reset()
    assert s.step_index == 0 and s.token_ids() == [] and s.beams() == [([], 0.0)]
    unrecorded = Stepper(eos_lm, "beam", num_beams=3, length_penalty=0.5, max_new_tokens=10, record=False)
    assert unrecorded.run()[0].token_ids == gen.token_ids and not unrecorded.traces[0].steps


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams must be an integer between 1 and 401; got 0"),
    (dict(num_beams=402), "num_beams must be an integer between 1 and 401; got 402"),
    (dict(num_beams=2.0), "num_beams must be an integer between 1 and 401; got 2.0"),
    (dict(num_beams=True), "num_beams must be an integer between 1 and 401; got True"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite number; got inf"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number; got nan"),
    (dict(length_penalty="1"), "length_penalty must be a finite number; got '1'"),
    (dict(temperature=0.5), "temperature: beam search has no such parameter"),
    (dict(k=3), "k: beam search has no such parameter"),
])
def test_bad_beam_settings_name_the_argument_and_the_range(tiny_lm, kwargs, message):
    assert tiny_lm.vocab_size == 401
    with pytest.raises(MagicEduError) as err:
        Stepper(tiny_lm, "beam", **kwargs)
    assert str(err.value).startswith(message)


def test_huge_length_penalties_do_not_overflow(six_token_lm):
    """length ** 1e6 overflows a float (transformers raises OverflowError there): the divisor is then
    inf, and the search still runs and returns a hypothesis; length ** -1e6 is 0, likewise."""
    for lp in (1e6, -1e6):
        gen = beam_search(six_token_lm, num_beams=2, length_penalty=lp, max_new_tokens=4)
        assert 1 <= len(gen.token_ids) <= 4


def test_as_many_beams_as_tokens(six_token_lm):
    gen = beam_search(six_token_lm, num_beams=six_token_lm.vocab_size, max_new_tokens=5)
    ids, _ = slow_beam_search(six_token_lm, None, six_token_lm.vocab_size, 1.0, 5)
    assert gen.token_ids == ids == transformers_beam_search(six_token_lm, None, six_token_lm.vocab_size, 1.0, 5)
