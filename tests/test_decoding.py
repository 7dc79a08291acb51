"""The fast decoders against the slow reference loop, and the invariants of MAGIC."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magic_edu import (
    ImageTextMatcher,
    MagicEduError,
    Stepper,
    Trace,
    contrastive_search,
    greedy_search,
    magic_search,
    nucleus_sampling,
    top_k_sampling,
    typical_sampling,
)
from magic_edu.reference import magic_reference
from magic_edu.tools.random_models import random_language_model

from conftest import make_image


def assert_same_or_tie(gen, ref_ids):
    """Token for token equal; a divergence is only accepted at a proven tie (|score gap| < 1e-6)."""
    for t, (fast, ref) in enumerate(zip(gen.token_ids, ref_ids)):
        if fast != ref:
            step = gen.trace[t]
            scores = dict(zip(step.token_ids, step.score))
            assert ref in scores, f"step {t}: the reference's token {ref} is not among the fast candidates"
            gap = abs(scores[fast] - scores[ref])
            assert gap < 1e-6, f"step {t}: fast took {fast}, reference {ref}, score gap {gap:.3g} is no tie"
            return
    assert gen.token_ids == ref_ids


CASES = list(itertools.product([None, "a red"], [1, 3, 8], [0.0, 0.4, 0.9], [0.0, 0.7, 3.0]))


@pytest.mark.parametrize("prompt,k,alpha,beta", CASES[::3])
def test_magic_matches_reference_float64(tiny_lm64, tiny_clip64, prompt, k, alpha, beta):
    for seed in (0, 1):
        image = make_image(seed)
        gen = magic_search(tiny_lm64, tiny_clip64, image, k=k, alpha=alpha, beta=beta, prompt=prompt,
                           max_new_tokens=7)
        ref = magic_reference(tiny_lm64, tiny_clip64, image, k=k, alpha=alpha, beta=beta, prompt=prompt,
                              max_new_tokens=7)
        assert gen.token_ids == ref  # float64: no near-tie may flip


@pytest.mark.parametrize("window", [1, 2, 5])
def test_magic_matches_reference_when_the_clip_window_slides(tiny_lm64, tiny_clip64, window):
    """A CLIP window shorter than the caption: CLIP's text changes its start every step, so the
    prefix kept from the step before cannot be reused; the tokens must still be the reference's."""
    kw = dict(k=6, alpha=0.3, beta=3.0, max_new_tokens=9, clip_text_max_len=window, stop_at_eos=False)
    images = [make_image(3), make_image(4)]
    batch = magic_search(tiny_lm64, tiny_clip64, images, **kw)
    for image, gen in zip(images, batch):
        assert gen.token_ids == magic_reference(tiny_lm64, tiny_clip64, image, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magic_matches_reference_float32(tiny_lm, tiny_clip, seed):
    image = make_image(10 + seed)
    gen = magic_search(tiny_lm, tiny_clip, image, k=6, alpha=0.2, beta=1.5, max_new_tokens=8)
    ref = magic_reference(tiny_lm, tiny_clip, image, k=6, alpha=0.2, beta=1.5, max_new_tokens=8)
    assert_same_or_tie(gen, ref)


@pytest.mark.parametrize("prompt,k,alpha", [(None, 4, 0.6), ("the boy", 6, 0.3), (None, 10, 0.9)])
def test_contrastive_matches_reference(tiny_lm64, prompt, k, alpha):
    gen = contrastive_search(tiny_lm64, k=k, alpha=alpha, prompt=prompt, max_new_tokens=8)
    ref = magic_reference(tiny_lm64, None, None, k=k, alpha=alpha, beta=0.0, prompt=prompt, max_new_tokens=8)
    assert gen.token_ids == ref


@pytest.fixture(scope="module")
def eos_lm():
    """A float64 tiny LM whose EOS logit gets a +1 bias, so that EOS is a candidate and is
    sometimes chosen (an untrained LM almost never ends a caption)."""
    lm = random_language_model(seed=1, n_layer=2, n_embd=48, dtype=torch.float64)
    head = torch.nn.Linear(48, lm.vocab_size, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(lm.model.lm_head.weight)
        head.bias.zero_()
        head.bias[lm.eos_token_id] = 1.0
    lm.model.lm_head = head
    return lm


class DistinctImageClip(ImageTextMatcher):
    """A random CLIP maps every image to nearly the same embedding; this stand-in gives each
    image its own random direction, so that batched rows take different paths."""

    def embed_image(self, image):
        images = image if isinstance(image, list) else [image]
        embs = []
        for im in images:
            g = torch.Generator().manual_seed(int(np.asarray(im).sum()))
            embs.append(F.normalize(torch.randn(self.model.text_projection.shape[1], generator=g,
                                                dtype=torch.float64), dim=0))
        return torch.stack(embs) if isinstance(image, list) else embs[0]


def test_reference_and_fast_agree_when_eos_is_chosen(eos_lm, tiny_clip64):
    ended = 0
    for k, beta in ((4, 1.0), (8, 1.0), (8, 5.0)):
        gen = magic_search(eos_lm, tiny_clip64, make_image(0), k=k, alpha=0.2, beta=beta, max_new_tokens=6)
        ref = magic_reference(eos_lm, tiny_clip64, make_image(0), k=k, alpha=0.2, beta=beta, max_new_tokens=6)
        assert gen.token_ids == ref
        if eos_lm.eos_token_id in ref:
            ended += 1
            assert gen.token_ids[-1] == eos_lm.eos_token_id and len(gen.trace) == len(gen.token_ids)
            assert gen.text == eos_lm.decode(gen.token_ids[:-1]).strip()
    assert ended >= 1, "no decode chose EOS: this test no longer tests stopping"


def test_batched_rows_that_stop_early(eos_lm, tiny_clip64):
    clip = DistinctImageClip(tiny_clip64.model, tiny_clip64.preprocess, tiny_clip64.tokenizer)
    imgs = [make_image(s) for s in range(6)]
    kw = dict(k=8, alpha=0.2, beta=5.0, max_new_tokens=6)
    batch = magic_search(eos_lm, clip, imgs, **kw)
    ones = [magic_search(eos_lm, clip, im, **kw) for im in imgs]
    assert [g.token_ids for g in batch] == [g.token_ids for g in ones]
    assert [len(g.trace) for g in batch] == [len(g.trace) for g in ones]
    lengths = {len(g.token_ids) for g in ones}
    assert len(lengths) > 1, "all rows ended at the same step: this test no longer tests early stops"


def test_stop_at_eos_false_runs_to_length(eos_lm, tiny_clip64):
    gen = magic_search(eos_lm, tiny_clip64, make_image(0), k=8, alpha=0.2, beta=1.0, max_new_tokens=6,
                       stop_at_eos=False)
    assert len(gen.token_ids) == 6 and eos_lm.eos_token_id in gen.token_ids
    assert gen.text == " ".join(eos_lm.decode(gen.token_ids[: gen.token_ids.index(eos_lm.eos_token_id)]).split())


def test_k1_makes_every_search_greedy(tiny_lm, tiny_clip):
    greedy = greedy_search(tiny_lm, max_new_tokens=10).token_ids
    assert contrastive_search(tiny_lm, k=1, alpha=0.7, max_new_tokens=10).token_ids == greedy
    assert magic_search(tiny_lm, tiny_clip, make_image(3), k=1, alpha=0.7, beta=5.0,
                        max_new_tokens=10).token_ids == greedy


def test_contrastive_alpha0_is_greedy(tiny_lm):
    assert (contrastive_search(tiny_lm, k=8, alpha=0.0, max_new_tokens=10).token_ids
            == greedy_search(tiny_lm, max_new_tokens=10).token_ids)


def test_greedy_takes_the_argmax(tiny_lm):
    gen = greedy_search(tiny_lm, max_new_tokens=6)
    ids = tiny_lm.prefix_ids(None)
    for token in gen.token_ids:  # an independent loop without cache
        logits = tiny_lm.model(torch.tensor([ids])).logits[0, -1]
        assert token == int(logits.argmax())
        ids.append(token)


def test_magic_beta0_is_contrastive(tiny_lm, tiny_clip):
    for seed in range(3):
        magic = magic_search(tiny_lm, tiny_clip, make_image(seed), k=6, alpha=0.5, beta=0.0, max_new_tokens=10)
        assert magic.token_ids == contrastive_search(tiny_lm, k=6, alpha=0.5, max_new_tokens=10).token_ids


def test_huge_beta_picks_highest_clip_score(tiny_lm, tiny_clip):
    image = make_image(5)
    gen = magic_search(tiny_lm, tiny_clip, image, k=7, alpha=0.5, beta=1e6, max_new_tokens=6)
    emb = tiny_clip.embed_image(image)
    for step, token in zip(gen.trace, gen.token_ids):
        generated = gen.token_ids[: step.step]
        texts = [tiny_lm.decode(generated + [v]).split(tiny_lm.eos_token)[0] for v in step.token_ids]
        # independent CLIP: open_clip's own encode_text at full context length
        text_emb = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)), dim=-1)
        cos = text_emb @ emb
        best = [v for v, c in zip(step.token_ids, cos.tolist()) if c >= cos.max().item() - 1e-6]
        assert token in best


def test_eos_candidate_clip_text_is_the_text_so_far(tiny_lm, tiny_clip):
    lm = tiny_lm
    gen = magic_search(lm, tiny_clip, make_image(1), k=lm.vocab_size, alpha=0.2, beta=1.0, max_new_tokens=4,
                       stop_at_eos=False)
    for step in gen.trace:
        c = gen.token_ids[: step.step]
        i = step.token_ids.index(lm.eos_token_id)
        assert step.clip_text[i] == lm.decode(c)
        other = step.token_ids[(i + 1) % step.k]
        assert step.clip_text[(i + 1) % step.k] == lm.decode(c + [other]).split(lm.eos_token)[0]


def test_clip_text_is_the_last_n_generated_ids_without_prefix(tiny_lm, tiny_clip):
    lm = tiny_lm
    gen = magic_search(lm, tiny_clip, make_image(2), k=3, alpha=0.1, beta=1.0, prompt="a red",
                       max_new_tokens=8, clip_text_max_len=3, stop_at_eos=False)
    for step in gen.trace:
        c = gen.token_ids[: step.step]
        for v, text in zip(step.token_ids, step.clip_text):
            assert text == lm.decode((c + [v])[-3:]).split(lm.eos_token)[0]
            assert "start_of_text" not in text


def test_trace_score_identity_and_columns(tiny_lm, tiny_clip):
    alpha, beta = 0.3, 1.7
    gen = magic_search(tiny_lm, tiny_clip, make_image(0), k=5, alpha=alpha, beta=beta, max_new_tokens=6)
    df = gen.trace.to_frame()
    for col in ["step", "rank", "token", "token_id", "lm_prob", "degeneration_penalty", "clip_text", "clip_cosine",
                "clip_score", "score", "chosen"]:
        assert col in df.columns
    recomputed = (1 - alpha) * df.lm_prob - alpha * df.degeneration_penalty + beta * df.clip_score
    assert (recomputed - df.score).abs().max() < 1e-9
    assert len(df) == 5 * len(gen.token_ids)
    assert df.groupby("step").chosen.sum().eq(1).all()
    assert list(df[df.chosen].token_id) == gen.token_ids
    # clip scores are a softmax over the k candidates, probabilities are not renormalised over the k
    assert (df.groupby("step").clip_score.sum() - 1).abs().max() < 1e-9
    assert (df.groupby("step").lm_prob.sum() < 1).all()
    # lm_prob equals the full-vocabulary softmax at step 0
    logits = tiny_lm.model(torch.tensor([tiny_lm.prefix_ids(None)])).logits[0, -1]
    probs = torch.softmax(logits.double(), -1)
    step0 = df[df.step == 0]
    assert torch.allclose(torch.tensor(step0.lm_prob.to_numpy(copy=True)), probs[step0.token_id.to_numpy(copy=True)],
                          atol=1e-6)
    assert gen.trace.settings["decoder"] == "magic" and gen.trace.settings["beta"] == beta


def test_degeneration_penalty_against_a_direct_computation(tiny_lm):
    lm = tiny_lm
    gen = contrastive_search(lm, k=4, alpha=0.5, prompt="a red", max_new_tokens=5)
    prefix = lm.prefix_ids("a red")
    for step in gen.trace:
        c = gen.token_ids[: step.step]
        context = lm.model.transformer(torch.tensor([prefix + c])).last_hidden_state[0]  # after ln_f
        for v, penalty, pos in zip(step.token_ids, step.degeneration_penalty, step.penalty_position):
            h_v = lm.model.transformer(torch.tensor([prefix + c + [v]])).last_hidden_state[0, -1]
            cos = F.cosine_similarity(h_v[None], context, dim=-1)
            assert abs(cos.max().item() - penalty) < 1e-5
            assert int(cos.argmax()) == pos
        assert len(step.chosen_similarity) == len(prefix) + len(c)


def test_trace_save_and_load(tiny_lm, tiny_clip, tmp_path):
    gen = magic_search(tiny_lm, tiny_clip, make_image(0), k=4, alpha=0.3, beta=1.0, max_new_tokens=5)
    path = gen.trace.save(tmp_path / "t" / "trace.json")
    loaded = Trace.load(path)
    assert loaded.settings == gen.trace.settings
    assert loaded.to_frame().equals(gen.trace.to_frame())
    assert not list(path.parent.glob(".*.tmp"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MagicEduError, match="path"):
        Trace.load(tmp_path / "bad.json")
    with pytest.raises(MagicEduError, match="path"):
        Trace.load(tmp_path / "missing.json")


def test_output_text_parser(tiny_lm):
    lm = tiny_lm
    a, b = lm.tokenizer(" a  red\ncircle", add_special_tokens=False)["input_ids"], lm.prefix_ids(None)
    ids = b + a + [lm.eos_token_id] + a
    assert lm.output_text(ids) == "a red circle"


# -- Stepper -------------------------------------------------------------------------------
def test_stepper_step_back_and_force(tiny_lm, tiny_clip):
    image = make_image(4)
    s = Stepper(tiny_lm, "magic", clip=tiny_clip, image=image, k=5, alpha=0.3, beta=2.0, max_new_tokens=6)
    first = s.step()
    second = s.step()
    assert s.step_index == 2 and len(s.traces[0]) == 2
    s.back()
    assert s.step_index == 1 and len(s.traces[0]) == 1
    again = s.step()
    assert again.token_ids == second.token_ids and again.score == second.score and again.chosen == second.chosen
    s.reset()
    assert s.step_index == 0 and len(s.traces[0]) == 0
    alt = next(i for i in range(first.k) if i != first.chosen)
    forced = s.step(force=first.token_ids[alt])
    assert forced.forced and forced.chosen == alt and s.token_ids() == [first.token_ids[alt]]
    rest = s.run()[0]
    assert rest.token_ids[0] == first.token_ids[alt]
    # the continued decode equals the reference continued from the forced token
    assert rest.trace.to_frame().query("step == 1").clip_text.str.startswith(
        tiny_lm.decode([first.token_ids[alt]])).all()
    with pytest.raises(MagicEduError, match="force"):
        s2 = Stepper(tiny_lm, "contrastive", k=3, alpha=0.5, max_new_tokens=3)
        s2.step(force=10**6)


def test_stepper_generation_equals_decoder(tiny_lm, tiny_clip):
    image = make_image(7)
    s = Stepper(tiny_lm, "magic", clip=tiny_clip, image=image, k=4, alpha=0.2, beta=1.0, max_new_tokens=7)
    while not s.done:
        s.step()
    assert s.generation().token_ids == magic_search(tiny_lm, tiny_clip, image, k=4, alpha=0.2, beta=1.0,
                                                    max_new_tokens=7).token_ids
    with pytest.raises(MagicEduError, match="ended"):
        s.step()
    s0 = Stepper(tiny_lm, "greedy", max_new_tokens=2)
    with pytest.raises(MagicEduError, match="back"):
        s0.back()


def test_stepper_back_restores_sampling_state(tiny_lm):
    s = Stepper(tiny_lm, "top_k", k=20, seed=3, max_new_tokens=6)
    a = s.step().chosen_token_id
    b = s.step().chosen_token_id
    s.back()
    assert s.step().chosen_token_id == b
    s.reset()
    assert s.step().chosen_token_id == a


# -- sampling ------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(tiny_lm):
    for fn, kw in ((top_k_sampling, dict(k=30)), (nucleus_sampling, dict(p=0.9)), (typical_sampling, dict(mass=0.9)),
                   (top_k_sampling, dict(k=30, temperature=1.5)), (typical_sampling, dict(mass=0.5, temperature=0.5))):
        a = fn(tiny_lm, seed=11, max_new_tokens=12, **kw).token_ids
        assert a == fn(tiny_lm, seed=11, max_new_tokens=12, **kw).token_ids
        others = {tuple(fn(tiny_lm, seed=s, max_new_tokens=12, **kw).token_ids) for s in range(5)}
        assert len(others) > 1


def test_top_k_samples_only_from_the_top_k(tiny_lm):
    for seed in range(5):
        gen = top_k_sampling(tiny_lm, k=3, seed=seed, max_new_tokens=10, stop_at_eos=False)
        for step in gen.trace:
            assert step.k == 3 and step.chosen < 3


def test_nucleus_samples_only_from_the_nucleus(tiny_lm):
    p = 0.5
    for seed in range(5):
        gen = nucleus_sampling(tiny_lm, p=p, seed=seed, max_new_tokens=8, stop_at_eos=False)
        ids = tiny_lm.prefix_ids(None)
        for token in gen.token_ids:
            probs = torch.softmax(tiny_lm.model(torch.tensor([ids])).logits[0, -1].double(), -1)
            sorted_p, order = probs.sort(descending=True)
            n = int((sorted_p.cumsum(0) < p).sum()) + 1  # smallest prefix reaching p
            assert token in order[:n].tolist()
            ids.append(token)


SAMPLERS = [("top_k", dict(k=12)), ("top_k", dict(k=12, temperature=0.6)), ("nucleus", dict(p=0.8)),
            ("nucleus", dict(p=0.95, temperature=1.7)), ("typical", dict(mass=0.5)),
            ("typical", dict(mass=0.9, temperature=0.8)), ("typical", dict(mass=0.2, temperature=2.0))]


def transformers_chain(decoder: str, params: dict):
    """transformers' sampling warpers in generate's order: temperature, then the decoder's filter."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    filters = {"top_k": lambda: TopKLogitsWarper(params["k"]), "nucleus": lambda: TopPLogitsWarper(params["p"]),
               "typical": lambda: TypicalLogitsWarper(params["mass"])}
    return LogitsProcessorList([TemperatureLogitsWarper(params.get("temperature", 1.0)), filters[decoder]()])


@pytest.fixture(scope="module")
def toy_lm():
    from magic_edu import load_models

    return load_models("toy").lm


@pytest.mark.parametrize("decoder, params", SAMPLERS)
@pytest.mark.parametrize("model", ["tiny_lm64", "toy_lm"])
def test_what_sampling_draws_from_is_transformers_warper_chain(decoder, params, model, request):
    """At every step of a decode, the probabilities the trace shows (sample_prob) are softmax of
    transformers' TemperatureLogitsWarper then Top-k / Top-p / Typical warper, applied to the step's
    logits; those logits are the LM's own (an independent forward of the whole text, no cache)."""
    lm = request.getfixturevalue(model)
    s = Stepper(lm, decoder, seed=3, max_new_tokens=10, stop_at_eos=False, **params)
    chain = transformers_chain(decoder, params)
    ids = lm.prefix_ids(None)
    while not s.done:
        logits = s._logits.double()  # what this step decides from
        independent = lm.model(torch.tensor([ids])).logits[0, -1].double()
        torch.testing.assert_close(logits[0], independent, atol=1e-4 if model == "toy_lm" else 1e-10, rtol=0)
        want = torch.softmax(chain(None, logits.clone()), dim=-1)[0]
        record = s.step()
        assert record.sample_prob == want[record.token_ids].tolist()  # bit for bit
        assert want[record.chosen_token_id] > 0  # drawn from the filtered distribution's support
        assert record.lm_prob == pytest.approx(torch.softmax(logits[0], -1)[record.token_ids].tolist(), abs=1e-12)
        ids.append(record.chosen_token_id)


def test_sampling_draws_with_the_filtered_probabilities(tiny_lm64):
    """The first token of many seeds: its frequencies are the filtered distribution's (within 5
    standard deviations), and no token outside the filter is ever drawn."""
    n = 600
    first = Stepper(tiny_lm64, "top_k", k=4, temperature=0.8, seed=0, max_new_tokens=1).step()
    p = dict(zip(first.token_ids, first.sample_prob))
    counts = {}
    for seed in range(n):
        token = Stepper(tiny_lm64, "top_k", k=4, temperature=0.8, seed=seed, max_new_tokens=1, record=False,
                        history=False).run()[0].token_ids[0]
        counts[token] = counts.get(token, 0) + 1
    assert set(counts) <= {t for t, q in p.items() if q > 0}
    for token, q in p.items():
        assert abs(counts.get(token, 0) - n * q) <= 5 * math.sqrt(n * q * (1 - q)) + 1, (token, q, counts)


def test_temperature_shapes_the_distribution(tiny_lm64):
    """A tiny temperature leaves one token (sampling becomes greedy search); temperature 1 changes nothing."""
    greedy = greedy_search(tiny_lm64, max_new_tokens=10, stop_at_eos=False).token_ids
    for fn, kw in ((top_k_sampling, dict(k=50)), (nucleus_sampling, dict(p=0.99)), (typical_sampling, dict(mass=0.99))):
        cold = fn(tiny_lm64, temperature=1e-4, seed=1, max_new_tokens=10, stop_at_eos=False, **kw)
        assert cold.token_ids == greedy
        assert all(step.sample_prob[step.chosen] == 1.0 for step in cold.trace)
        assert (fn(tiny_lm64, temperature=1.0, seed=1, max_new_tokens=10, **kw).token_ids
                == fn(tiny_lm64, seed=1, max_new_tokens=10, **kw).token_ids)
    hot = top_k_sampling(tiny_lm64, k=5, temperature=3.0, seed=1, max_new_tokens=1).trace[0]
    cool = top_k_sampling(tiny_lm64, k=5, temperature=0.5, seed=1, max_new_tokens=1).trace[0]
    assert max(hot.sample_prob) < max(cool.sample_prob)  # flatter when hot


def test_typical_sampling_may_leave_out_the_most_probable_tokens(tiny_lm64):
    gen = typical_sampling(tiny_lm64, mass=0.2, seed=0, max_new_tokens=8, stop_at_eos=False)
    assert any(step.sample_prob[0] == 0.0 for step in gen.trace)  # the most probable token was filtered out
    for step in gen.trace:
        assert step.sample_prob[step.chosen] > 0


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(k=0), "k"), (dict(k=10**7), "k"), (dict(k=2.5), "k"), (dict(alpha=-0.1), "alpha"),
    (dict(alpha=1.5), "alpha"), (dict(beta=-1.0), "beta"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10_000), "max_new_tokens"), (dict(prompt=3), "prompt"),
    (dict(prompt="a red " * 200), "prompt"),
    (dict(clip_text_max_len=0), "clip_text_max_len"), (dict(alpha=float("nan")), "alpha"),
])
def test_bad_settings_name_the_argument(tiny_lm, tiny_clip, kwargs, name):
    settings = dict(k=3, alpha=0.1, beta=1.0, max_new_tokens=4) | kwargs
    with pytest.raises(MagicEduError, match=name):
        magic_search(tiny_lm, tiny_clip, make_image(0), **settings)
    assert issubclass(MagicEduError, ValueError)


@pytest.mark.parametrize("decoder, kwargs, message", [
    ("top_k", dict(temperature=0.0), "temperature must be a number > 0.0 (finite); got 0.0"),
    ("nucleus", dict(temperature=-1.0), "temperature must be a number > 0.0 (finite); got -1.0"),
    ("typical", dict(temperature=float("inf")), "temperature must be a number > 0.0 (finite); got inf"),
    ("typical", dict(temperature=float("nan")), "temperature must be a number > 0.0 (finite); got nan"),
    ("typical", dict(mass=0.0), "mass must be a number in (0.0, 1.0]; got 0.0"),
    ("typical", dict(mass=1.5), "mass must be a number between 0.0 and 1.0; got 1.5"),
    ("greedy", dict(temperature=0.5), "temperature: greedy search has no such parameter"),
    ("contrastive", dict(temperature=0.5), "temperature: contrastive search has no such parameter"),
    ("magic", dict(temperature=0.5), "temperature: MAGIC search has no such parameter"),
    ("nucleus", dict(mass=0.5), "mass: nucleus sampling has no such parameter"),
])
def test_bad_sampling_settings_name_the_argument_and_the_range(tiny_lm, decoder, kwargs, message):
    with pytest.raises(MagicEduError) as err:
        Stepper(tiny_lm, decoder, **kwargs)
    assert str(err.value).startswith(message)


def test_bad_settings_for_other_decoders(tiny_lm):
    with pytest.raises(MagicEduError, match="p "):
        nucleus_sampling(tiny_lm, p=1.5)
    with pytest.raises(MagicEduError, match="p "):
        nucleus_sampling(tiny_lm, p=0.0)
    with pytest.raises(MagicEduError, match="seed"):
        top_k_sampling(tiny_lm, seed=-1)
    with pytest.raises(MagicEduError, match="decoder"):
        Stepper(tiny_lm, "diverse_beam")
    with pytest.raises(MagicEduError, match="image"):
        Stepper(tiny_lm, "magic")


@pytest.mark.slow
def test_paper_sized_models_take_the_reference_tokens():
    """GPT-2-small and CLIP ViT-B/32 architectures (random weights, float64) with the paper's
    k = 45: the fast loop (candidates side by side, the CLIP prefix shared, kept across steps
    and followed by packed candidate tokens, texts extended, words remembered) takes the
    reference loop's tokens, alone and in a batch."""
    from magic_edu.tools.random_models import clip_vit_b32, gpt2_small

    lm, clip = gpt2_small(seed=1), clip_vit_b32(seed=1)
    lm.model.double()
    clip.model.double()
    images = [make_image(0, (224, 224)), make_image(1, (200, 240))]
    kw = dict(k=45, alpha=0.1, beta=2.0, max_new_tokens=3, stop_at_eos=False)
    batch = magic_search(lm, clip, images, **kw)
    assert batch[0].token_ids == magic_reference(lm, clip, images[0], **kw)
    assert [g.token_ids for g in batch] == [magic_search(lm, clip, im, **kw).token_ids for im in images]


def test_back_then_step_gives_the_same_record_bit_for_bit(tiny_lm, tiny_clip):
    """Back truncates the shared context buffers (no saved copies); stepping again must give the
    very same record, for every decoder, also after the buffers grew mid-decode."""
    import json
    from dataclasses import asdict

    def record(s):  # as JSON text, so NaN (columns a decoder does not compute) compares equal to itself
        data = asdict(s.step())
        del data["cost"]["seconds"]  # the work counts must repeat too, the wall time cannot
        return json.dumps(data)

    image = make_image(3)
    for decoder, kw in (("magic", dict(clip=tiny_clip, image=image, k=6, alpha=0.3, beta=1.0)),
                        ("contrastive", dict(k=4, alpha=0.5)), ("greedy", {}), ("top_k", dict(k=20, seed=5)),
                        ("nucleus", dict(p=0.9, seed=5)), ("top_k", dict(k=20, temperature=0.6, seed=5)),
                        ("typical", dict(mass=0.8, temperature=1.3, seed=5)), ("beam", dict(num_beams=3)),
                        ("beam", dict(num_beams=5, length_penalty=-0.5))):
        s = Stepper(tiny_lm, decoder, max_new_tokens=90, stop_at_eos=False, **kw)  # room grows past 64
        first = [record(s) for _ in range(80)]
        for back in (1, 5, 70):
            for _ in range(back):
                s.back()
            again = [record(s) for _ in range(back)]
            assert again == first[80 - back:], (decoder, back)
        s.reset()
        assert [record(s) for _ in range(80)] == first


def test_decoders_that_cannot_go_back_keep_nothing_for_it(tiny_lm):
    gen_stepper = Stepper(tiny_lm, "contrastive", k=4, alpha=0.5, max_new_tokens=20, history=False)
    gen_stepper.run()
    assert gen_stepper._undo == []
    with pytest.raises(MagicEduError, match="history"):
        gen_stepper.back()


def test_held_memory_grows_linearly_with_the_length():
    """What a decode holds (the Stepper's tensors, for Back too) after 200 tokens is about twice
    what it holds after 100: linear, not quadratic, in the length."""
    from magic_edu.tools.random_models import random_language_model

    lm = random_language_model(n_layer=4, n_embd=64, n_head=4, n_positions=1024, seed=2)

    def held(n: int, history: bool) -> int:
        s = Stepper(lm, "contrastive", k=5, alpha=0.6, max_new_tokens=n, stop_at_eos=False, record=False,
                    history=history)
        s.run()
        return _tensor_bytes(s)

    for history in (False, True):
        a, b = held(100, history), held(200, history)
        assert 1.5 * a < b < 2.6 * a, (history, a, b)


def _tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj``'s attributes (not the models)."""
    seen, total, todo = set(), 0, [obj.__dict__]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            todo += [v for k, v in x.items() if k not in ("lm", "clip", "scorer")]
        elif isinstance(x, (list, tuple)):
            todo += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            todo.append(x.__dict__)
    return total


@pytest.mark.parametrize("force", [10**30, -1, 65.5, "65", True])
def test_a_forced_token_must_be_a_token_id(tiny_lm, force):
    s = Stepper(tiny_lm, "contrastive", k=3, alpha=0.5, max_new_tokens=3)
    with pytest.raises(MagicEduError, match="force must be a token id"):
        s.step(force=force)
    assert s.step_index == 0  # nothing was taken


@pytest.mark.parametrize("kwargs, name", [(dict(seed=2**64), "seed"), (dict(stop_at_eos="no"), "stop_at_eos"),
                                          (dict(record=1), "record")])
def test_seed_and_switches_are_checked(tiny_lm, kwargs, name):
    with pytest.raises(MagicEduError, match=name):
        Stepper(tiny_lm, "top_k", **kwargs)
