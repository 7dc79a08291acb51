"""ZeroCap (magic_edu.zerocap, run by the Stepper and zerocap_search) against slow, written-out
versions: one step for one beam with plain loops and autograd, beam search over the fused
distribution when nothing is steered, greedy search when nothing is fused; the Stepper's trace
holds the written-out step's distributions, Back and a step again replay it bit for bit; the
weights stay frozen, the cost counts the backward passes, bad settings are refused, and the toy
world gets a caption."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from transformers import DynamicCache

import magic_edu
from magic_edu import MagicEduError, Stepper, greedy_search, zerocap_search
from magic_edu.registry import DECODERS
from magic_edu.zerocap import PARAMS, ZeroCapSettings, select_beams, zerocap_step

from conftest import make_image

PROMPT = "a red circle"


def _special(logits: torch.Tensor, row: list[int], step: int, end: int, s: ZeroCapSettings, forbidden: list[int]
             ) -> torch.Tensor:
    """ZeroCLIP.py's update_special_tokens_logits for one row, as written there."""
    logits = logits.clone()
    for token in set(row[-4:]):
        factor = s.repetition_penalty if logits[token] > 0 else 1 / s.repetition_penalty
        logits[token] = logits[token] / factor
    if step >= 1:
        factor = s.end_factor if logits[end] > 0 else 1 / s.end_factor
        logits[end] = logits[end] * factor
    if step == 0:
        factor = 1.6 if logits[end] > 0 else 1 / 1.6
        logits[end] = logits[end] / factor
    for token in forbidden:
        factor = s.forbidden_factor if logits[token] > 0 else 1 / s.forbidden_factor
        logits[token] = logits[token] / factor
    return logits


def _forward_last(lm, row: list[int], context: list[list[torch.Tensor]]) -> torch.Tensor:
    """Logits (float64) of the last id read on ``context`` (one [keys, values] per layer)."""
    cache = DynamicCache([(k, v) for k, v in context])
    return lm.model(torch.tensor([row[-1:]]), **{lm._cache_kwarg: cache}).logits[0, -1].double()


def reference_step(lm, clip, image_embedding, row: list[int], step: int, s: ZeroCapSettings, end: int,
                   forbidden: list[int]) -> dict[str, torch.Tensor]:
    """One ZeroCap step for one beam: no batching, no cache tricks, a loop per layer. Returns p0,
    p (after the last iteration), the last iteration's CLIP target and q, each (V,)."""
    ids = torch.tensor([row])
    with torch.no_grad():
        p0 = torch.softmax(lm.model(ids).logits[0, -1].double(), dim=-1)  # a forward without cache
        past = lm.model(ids[:, :-1], use_cache=True).past_key_values
    context = [[key, value] for key, value, *_ in past]
    delta = [[torch.zeros_like(key), torch.zeros_like(value)] for key, value in context]
    body = [i for i in row if i != lm.sos_token_id]  # what CLIP reads: no start token
    vocab = p0.shape[0]
    n = min(s.candidates, vocab)
    for _ in range(s.num_iterations):
        leaves = [[d.clone().requires_grad_(True) for d in layer] for layer in delta]
        shifted = [[c + d for c, d in zip(cl, dl)] for cl, dl in zip(context, leaves)]
        p = torch.softmax(_forward_last(lm, row, shifted), dim=-1)
        # CLIP's target: the n most probable tokens, one text at a time
        order = sorted(range(vocab), key=lambda v: -p[v].item())[:n]
        cosines = []
        with torch.no_grad():
            for v in order:
                text = lm.decode(body + [v]).split(lm.eos_token)[0]
                emb = clip.model.encode_text(clip.tokenizer([text]))[0].double()
                cosines.append(float(emb @ image_embedding.double() / emb.norm()))
        weights = [math.exp(c / s.clip_temperature) for c in cosines]
        target = torch.zeros(vocab, dtype=torch.float64)
        for v, w in zip(order, weights):
            target[v] = w / sum(weights)
        last_target = target
        clip_loss = -(target * p.log()).sum()
        kl = (p * p.log() - p * p0.log()).sum()
        loss = s.clip_scale * clip_loss + s.ce_scale * kl
        flat = [d for layer in leaves for d in layer]
        grads = torch.autograd.grad(loss, flat)
        for i, layer in enumerate(leaves):
            for j in range(2):
                g = grads[2 * i + j]
                delta[i][j] = layer[j].detach() - s.stepsize * g / (g.norm() + 1e-15) ** s.grad_norm_factor
    with torch.no_grad():
        shifted = [[c + d for c, d in zip(cl, dl)] for cl, dl in zip(context, delta)]
        steered = _forward_last(lm, row, shifted)
        logits = _special(steered, row, step, end, s, forbidden)
    p_shift = torch.softmax(logits, dim=-1)
    q = p_shift**s.fusion_factor * p0 ** (1 - s.fusion_factor)
    return {"p0": p0, "p": torch.softmax(steered, dim=-1), "target": last_target, "q": q / q.sum()}


@pytest.mark.parametrize("step, candidates", [(0, 10_000), (2, 7)])
def test_a_step_matches_the_written_out_step(tiny_lm64, tiny_clip64, step, candidates):
    lm, clip = tiny_lm64, tiny_clip64
    s = ZeroCapSettings(num_iterations=3, candidates=candidates, end_factor=1.3, repetition_penalty=1.4,
                        fusion_factor=0.8, stepsize=0.5)
    prefix = lm.prefix_ids(PROMPT)
    generated = [[], []] if step == 0 else [[40, 41], [52, 40]]
    rows = [prefix + g for g in generated][: 1 if step == 0 else 2]
    image = clip.embed_image(make_image(3))
    end, forbidden = lm.eos_token_id, [5, 17]
    fast = zerocap_step(lm, clip, image, rows, step, s, end, forbidden)
    assert len(fast.log_p_steered) == 4 and len(fast.targets) == 3
    for b, row in enumerate(rows):
        want = reference_step(lm, clip, image, row, step, s, end, forbidden)["q"]
        torch.testing.assert_close(fast.log_q[b].exp(), want, rtol=1e-9, atol=1e-12)
    # steering moved the distribution away from p0
    assert (fast.log_p_steered[-1] - fast.log_p0).abs().max() > 1e-3


def test_weights_stay_frozen_and_the_cost_counts_backward_passes(tiny_lm, tiny_clip):
    lm, clip = tiny_lm, tiny_clip
    assert all(p.requires_grad for p in lm.model.parameters())  # nothing froze them for us
    s = ZeroCapSettings(num_iterations=2, candidates=6)
    rows = [lm.prefix_ids(PROMPT) + [40], lm.prefix_ids(PROMPT) + [41]]
    before_lm, before_clip = lm.cost.copy(), clip.cost.copy()
    zerocap_step(lm, clip, clip.embed_image(make_image(0)), rows, 1, s, lm.eos_token_id)
    assert all(p.grad is None for p in lm.model.parameters())
    assert all(p.grad is None for p in clip.model.parameters())
    lm_cost, clip_cost = lm.cost - before_lm, clip.cost - before_clip
    # per row: the context, p0, 2 steered iterations, the final steered forward
    assert lm_cost.lm_forwards == 2 * (1 + 1 + 2 + 1) and lm_cost.lm_backwards == 2 * 2
    assert clip_cost.clip_texts == 2 * 2 * 6


def reference_beam_search(lm, prefix: list[int], s: ZeroCapSettings, end: int, max_new_tokens: int) -> list[int]:
    """ZeroCLIP's beam search when nothing is steered: q = softmax(special(l)) ** f * softmax(l) ** (1 - f)
    normalised, l the LM's logits; beams ranked by summed log q / length; a finished beam stays."""

    def log_q(ids: list[int], step: int) -> list[float]:
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
        q = torch.softmax(_special(logits, ids, step, end, s, []), -1) ** s.fusion_factor * \
            torch.softmax(logits, -1) ** (1 - s.fusion_factor)
        return (q / q.sum()).log().tolist()

    first = log_q(prefix, 0)
    order = sorted(range(len(first)), key=lambda v: -first[v])[: s.num_beams]
    beams = [([v], first[v], 1, v == end) for v in order]  # (ids, summed log q, length, finished)
    for step in range(1, max_new_tokens):
        if all(b[3] for b in beams):
            break
        candidates = []
        for ids, score, length, finished in beams:
            if finished:
                candidates.append((ids, score, length, True))
                continue
            for v, lq in enumerate(log_q(prefix + ids, step)):
                candidates.append((ids + [v], score + lq, length + 1, v == end))
        beams = sorted(candidates, key=lambda b: -b[1] / b[2])[: s.num_beams]
    return max(beams, key=lambda b: b[1] / b[2])[0]


@pytest.mark.parametrize("num_beams, fusion_factor, end_factor", [(1, 0.99, 1.5), (3, 0.7, 3.0)])
def test_without_steering_it_is_beam_search_over_the_fused_distribution(tiny_lm64, tiny_clip64, num_beams,
                                                                         fusion_factor, end_factor):
    lm, clip = tiny_lm64, tiny_clip64
    clip_before = clip.cost.copy()
    stepper = Stepper(lm, "zerocap", clip=clip, image=make_image(1), prompt=PROMPT, num_iterations=0,
                      num_beams=num_beams, fusion_factor=fusion_factor, end_factor=end_factor, max_new_tokens=6)
    finished_and_live = False
    while not stepper.done:
        stepper.step()
        finished_and_live |= len({ids[-1] == lm.eos_token_id for ids, _ in stepper.beams()}) == 2
    s = ZeroCapSettings(num_iterations=0, num_beams=num_beams, fusion_factor=fusion_factor, end_factor=end_factor)
    want = reference_beam_search(lm, lm.prefix_ids(PROMPT), s, lm.eos_token_id, 6)
    assert stepper.token_ids() == want
    out = zerocap_search(lm, clip, make_image(1), prompt=PROMPT, num_iterations=0, num_beams=num_beams,
                         fusion_factor=fusion_factor, end_factor=end_factor, max_new_tokens=6)
    assert out.token_ids == want and out.text == lm.output_text(want)
    assert (clip.cost - clip_before).clip_texts == 0  # CLIP only embedded the image
    assert sum(r.cost.lm_backwards for r in out.trace) == 0
    assert finished_and_live == (num_beams > 1)  # a finished beam went on next to live ones


@pytest.mark.parametrize("num_iterations, kept_best_expected", [(0, True), (1, False)])
def test_the_trace_leads_back_to_every_steps_best_beam(tiny_lm64, tiny_clip64, num_iterations, kept_best_expected):
    """analysis.output_path of the trace cut after any step spells the best beam the Stepper holds
    then, also where that beam is a finished one kept from an earlier step (kept_beam), and the
    whole trace spells the output."""
    from magic_edu.tools.analysis import chosen_ids
    from magic_edu.trace import Trace

    lm, clip = tiny_lm64, tiny_clip64
    kept_best = 0
    for image in range(3):
        stepper = Stepper(lm, "zerocap", clip=clip, image=make_image(image), prompt=PROMPT, num_beams=3,
                          num_iterations=num_iterations, candidates=8, end_factor=3.0, max_new_tokens=7)
        while not stepper.done:
            stepper.step()
            trace = stepper.traces[0]
            cut = Trace(trace.settings, trace.prefix_ids, trace.prefix_tokens, trace.steps[:])
            assert chosen_ids(cut) == stepper.beams()[0][0]
            assert len(trace.steps[-1].kept_beam) == len(stepper.beams())
            kept_best += trace.steps[-1].kept_beam[0] >= 0
        out = zerocap_search(lm, clip, make_image(image), prompt=PROMPT, num_beams=3, num_iterations=num_iterations,
                             candidates=8, end_factor=3.0, max_new_tokens=7)
        assert chosen_ids(out.trace) == out.token_ids
        loaded = Trace.from_dict(json.loads(json.dumps(out.trace.to_dict())))
        assert [r.kept_beam for r in loaded] == [r.kept_beam for r in out.trace]
    if kept_best_expected:  # (with these settings, unsteered) some step's best beam was a finished one kept
        assert kept_best


def test_beam_bookkeeping_on_a_hand_made_distribution():
    """Three tokens, the end token 2. Step 0: the two best of log q = (-1, -2, -0.5) are 2 (ends) and 0.
    Step 1: only beam [0] is live; its candidates score (-1 + log q) / 2 with log q = (-3, -0.2, -4):
    [0, 1] scores -0.6; the finished [2] keeps -0.5 / 1 = -0.5 and stays first."""
    first = select_beams([], torch.tensor([[-1.0, -2.0, -0.5]]), 2, end_token=2)
    assert [(b.ids, b.score, b.length, b.finished) for b in first] == [([2], -0.5, 1, True), ([0], -1.0, 1, False)]
    second = select_beams(first, torch.tensor([[-3.0, -0.2, -4.0]]), 2, end_token=2)
    assert [(b.ids, b.length, b.finished) for b in second] == [([2], 1, True), ([0, 1], 2, False)]
    assert second[1].score == pytest.approx(-1.2)


def test_a_prefix_of_one_id_is_not_steered_at_the_first_step(tiny_lm, tiny_clip):
    out = zerocap_search(tiny_lm, tiny_clip, make_image(0), prompt=None, num_iterations=2, candidates=3,
                         max_new_tokens=3, end_factor=0.01)
    assert tiny_lm.prefix_ids(None) == [tiny_lm.sos_token_id]
    steps = out.trace.steps
    assert [r.cost.lm_backwards for r in steps] == [0, 2, 2]
    assert steps[0].iteration_targets == [] and all(math.isnan(x) for x in steps[0].clip_score)
    assert len(steps[1].iteration_targets) == 2 and len(steps[1].iteration_probs) == 2
    assert steps[0].steered_prob == steps[0].lm_prob  # nothing steered: p = p0


def test_without_fusion_it_is_greedy_search(tiny_lm, tiny_clip):
    """fusion_factor 0: q = p0 whatever the steering, and one beam takes argmax q."""
    out = zerocap_search(tiny_lm, tiny_clip, make_image(2), prompt=PROMPT, num_iterations=1, candidates=5,
                         fusion_factor=0.0, max_new_tokens=8)
    assert out.token_ids == greedy_search(tiny_lm, prompt=PROMPT, max_new_tokens=8).token_ids
    assert all(r.cost.lm_backwards == 1 for r in out.trace)
    assert out.trace.steps[0].fused_prob == out.trace.steps[0].lm_prob  # q = p0


@pytest.mark.parametrize("name, bad", [
    ("num_iterations", -1), ("num_iterations", 1.5), ("stepsize", -0.1), ("grad_norm_factor", -1.0),
    ("ce_scale", -1.0), ("clip_scale", float("nan")), ("clip_temperature", 0.0), ("fusion_factor", 1.01),
    ("end_factor", 0.0), ("forbidden_factor", -2.0), ("repetition_penalty", 0.0), ("candidates", 0),
    ("num_beams", 0), ("num_beams", 10**6), ("max_new_tokens", 0),
])
def test_bad_settings_name_the_argument(tiny_lm, tiny_clip, name, bad):
    with pytest.raises(MagicEduError, match=f"^{name} must be "):
        zerocap_search(tiny_lm, tiny_clip, make_image(0), **{name: bad})


def test_bad_tokens_and_images_name_the_argument(tiny_lm, tiny_clip):
    top = tiny_lm.vocab_size - 1
    with pytest.raises(MagicEduError, match=f"^forbidden_tokens must be an integer between 0 and {top}"):
        zerocap_search(tiny_lm, tiny_clip, make_image(0), forbidden_tokens=[3, -1])
    with pytest.raises(MagicEduError, match="^forbidden_tokens must be a list of token ids"):
        zerocap_search(tiny_lm, tiny_clip, make_image(0), forbidden_tokens=3)
    with pytest.raises(MagicEduError, match="^forbidden_tokens: MAGIC search has no forbidden tokens"):
        Stepper(tiny_lm, "magic", clip=tiny_clip, image=make_image(0), forbidden_tokens=[3])
    with pytest.raises(MagicEduError, match="^image: a ZeroCap Stepper captions one image; got a list of 2"):
        Stepper(tiny_lm, "zerocap", clip=tiny_clip, image=[make_image(0), make_image(1)])
    with pytest.raises(MagicEduError, match="^image: the list of images is empty"):
        zerocap_search(tiny_lm, tiny_clip, [])
    with pytest.raises(MagicEduError, match="^ZeroCap needs clip="):
        Stepper(tiny_lm, "zerocap")


def test_every_parameter_has_its_setting():
    assert PARAMS is DECODERS["zerocap"].params
    assert [p.name for p in PARAMS] == list(ZeroCapSettings.__dataclass_fields__)
    assert all(getattr(ZeroCapSettings(), p.name) == p.default for p in PARAMS)
    assert not any(p.from_preset for p in PARAMS)  # the presets' k, alpha, beta are MAGIC's


def test_the_toy_world_gets_a_caption():
    from magic_edu.toyworld import report

    models = magic_edu.load_models("toy")
    image = report.held_out_scenes(1, multi=False)[0].image
    started = time.perf_counter()
    out = zerocap_search(models.lm, models.clip, image)
    seconds = time.perf_counter() - started
    assert isinstance(out.text, str) and out.text and out.token_ids
    assert seconds < 120
    assert all(p.grad is None for p in models.lm.model.parameters())
    record = out.trace.steps[1]
    assert len(record.iteration_probs) == 5 and len(record.iteration_targets) == 5  # 5 iterations
    assert 0 < sum(out.trace.steps[0].fused_prob) <= 1 + 1e-9 and record.cost.lm_backwards == 5
    assert out.trace.settings["decoder"] == "zerocap" and out.trace.settings["prompt"] == "Image of a"


def test_clip_reads_each_candidate_decoded_with_its_text_on_a_word_level_tokenizer():
    """The toy LM's tokenizer joins words with spaces: CLIP must read "a large green", not the
    "a largegreen" that appending each token's own string to the decoded prefix would give (the
    public code's way, exact only for GPT-2's byte-level BPE). Checked against decoding every
    candidate's ids in full, one text at a time, and CLIP's own embeddings."""
    from magic_edu.toyworld import report
    from magic_edu.zerocap import clip_ids, clip_target

    models = magic_edu.load_models("toy")
    lm, clip = models.lm, models.clip
    image_embedding = clip.embed_image(report.held_out_scenes(1, multi=False)[0].image).reshape(-1).double()
    row = lm.prefix_ids(None) + lm.tokenizer("a large")["input_ids"]
    body = clip_ids(lm, row)
    assert lm.decode(body) == "a large"
    p = torch.softmax(torch.randn(1, lm.vocab_size, generator=torch.Generator().manual_seed(0)).double(), dim=-1)
    target = clip_target(p, [body], lm, clip, image_embedding, candidates=12, temperature=0.05)[0]
    top = p[0].topk(12).indices.tolist()
    texts = [lm.decode(body + [v]).split(lm.eos_token)[0] for v in top]
    assert "a large green" in texts or lm.tokenizer.convert_tokens_to_ids("green") not in top
    with torch.no_grad():
        cosines = torch.stack([clip.embed_texts([t])[0].double() @ image_embedding for t in texts])
    want = torch.zeros(lm.vocab_size, dtype=torch.float64)
    want[top] = torch.softmax(cosines / 0.05, dim=0)
    torch.testing.assert_close(target, want, atol=1e-6, rtol=1e-5)


def test_on_the_toy_world_clip_knows_the_colour_but_the_steps_barely_move_the_lm():
    """The README's reading of ZeroCap's toy row, on the first held-out scene (a large green star):
    after "a large", CLIP's target ranks "green" above every other colour, yet the gradient steps
    move no shown candidate's probability by 0.1: the LM finds the colours about equally likely, and
    ZeroCap takes another one."""
    from magic_edu.toyworld import report, shapes

    models = magic_edu.load_models("toy")
    scene = report.held_out_scenes(1, multi=False)[0]
    assert [(o.size, o.colour, o.shape) for o in scene.objects] == [("large", "green", "star")]
    stepper = Stepper(models.lm, "zerocap", clip=models.clip, image=scene.image, prompt=None, max_new_tokens=3)
    records = [stepper.step() for _ in range(3)]
    record = records[2]
    assert record.text == "a large"
    target = {t.strip(): x for t, x in zip(record.tokens, record.clip_score)}
    shown = [c for c in shapes.COLOURS if c in target]
    assert "green" in shown and max(shown, key=target.get) == "green"
    assert max(abs(p - p0) for p, p0 in zip(record.steered_prob, record.lm_prob)) < 0.1
    colours = [p0 for t, p0 in zip(record.tokens, record.lm_prob) if t.strip() in shown]
    assert max(colours) - min(colours) < 0.05  # the LM alone: no colour stands out
    assert record.tokens[record.chosen].strip() != "green"


# -- the Stepper ---------------------------------------------------------------------------------
def test_the_steppers_trace_holds_the_written_out_steps_distributions(tiny_lm64, tiny_clip64):
    """Every shown candidate of every live beam: lm_prob = p0, steered_prob = p after the last
    iteration, clip_score = the last target, fused_prob = q, all from reference_step; score ranks the
    beams ((summed log q + log q(v)) / new length), and the candidate that became beam 0 is chosen."""
    lm, clip = tiny_lm64, tiny_clip64
    image = make_image(4)
    settings = dict(num_iterations=2, candidates=9, num_beams=2, stepsize=0.5, end_factor=0.02)
    stepper = Stepper(lm, "zerocap", clip=clip, image=image, prompt=PROMPT, max_new_tokens=3, **settings)
    s = ZeroCapSettings(**settings)
    embedding = clip.embed_image(image)
    prefix = lm.prefix_ids(PROMPT)
    for step in range(3):
        before = stepper.beams()
        record = stepper.step()
        assert record.step == step and record.cost.lm_backwards == 2 * len({*record.beam})
        assert len(record.iteration_probs) == 2 and len(record.iteration_targets) == 2
        for j in sorted({*record.beam}):
            ids, summed = before[j]
            want = reference_step(lm, clip, embedding, prefix + ids, step, s, lm.eos_token_id, [])
            mine = [i for i, b in enumerate(record.beam) if b == j]
            assert len(mine) == 10
            tokens = [record.token_ids[i] for i in mine]
            assert tokens == want["q"].topk(10).indices.tolist()
            for column, name in (("lm_prob", "p0"), ("steered_prob", "p"), ("clip_score", "target"),
                                 ("fused_prob", "q")):
                got = torch.tensor([getattr(record, column)[i] for i in mine], dtype=torch.float64)
                torch.testing.assert_close(got, want[name][tokens], rtol=1e-9, atol=1e-12)
            score = torch.tensor([record.score[i] for i in mine], dtype=torch.float64)
            torch.testing.assert_close(score, (summed + want["q"][tokens].log()) / (len(ids) + 1), rtol=1e-9,
                                       atol=1e-12)
        after = stepper.beams()
        for i, b in enumerate(record.next_beam):
            if b >= 0:
                assert after[b][0] == before[record.beam[i]][0] + [record.token_ids[i]]
        assert record.next_beam[record.chosen] in (0, -1) and stepper.token_ids() == after[0][0]
    frame = stepper.generation().trace.to_frame()
    assert frame["fused_prob"].notna().all() and frame["sample_prob"].isna().all()


def test_back_and_step_again_replay_the_record_bit_for_bit(tiny_lm, tiny_clip):
    stepper = Stepper(tiny_lm, "zerocap", clip=tiny_clip, image=make_image(5), prompt=PROMPT, num_iterations=2,
                      candidates=6, num_beams=2, max_new_tokens=4, end_factor=0.5)
    for _ in range(3):
        stepper.step()
    first, beams = list(stepper.traces[0].steps), stepper.beams()

    def same(a, b) -> bool:
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        a["cost"].pop("seconds"), b["cost"].pop("seconds")
        return json.dumps(a) == json.dumps(b)  # NaN == NaN, and floats to the last bit

    stepper.back()
    stepper.back()
    assert stepper.step_index == 1 and len(stepper.traces[0].steps) == 1
    assert len(stepper.beams()) == 2 and all(len(ids) == 1 for ids, _ in stepper.beams())
    for _ in range(2):
        stepper.step()
    assert stepper.beams() == beams
    assert all(same(a, b) for a, b in zip(first, stepper.traces[0].steps))
    stepper.reset()
    assert stepper.token_ids() == [] and stepper.beams() == [([], 0.0)]
    with pytest.raises(MagicEduError, match="^force: forcing a token is not meaningful for ZeroCap"):
        stepper.step(force=first[0].token_ids[1])
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_without_stop_at_eos_no_beam_finishes_and_a_list_of_images_is_captioned_one_by_one(tiny_lm, tiny_clip):
    images = [make_image(0), make_image(1)]
    settings = dict(prompt=PROMPT, num_iterations=1, candidates=4, num_beams=2, max_new_tokens=4, end_factor=0.01)
    endless = zerocap_search(tiny_lm, tiny_clip, images[0], stop_at_eos=False, **settings)
    assert len(endless.trace) == 4 and len(endless.token_ids) == 4
    assert all(b == -1 or b < 2 for r in endless.trace for b in r.next_beam)
    gens = zerocap_search(tiny_lm, tiny_clip, images, record=False, **settings)
    assert [g.token_ids for g in gens] == [zerocap_search(tiny_lm, tiny_clip, im, **settings).token_ids
                                           for im in images]
    assert all(len(g.trace) == 0 for g in gens)  # nothing recorded
