"""Every step's cost against two independent counts: what the decoder's definition says it must
do (greedy: one forward of one token per row; contrastive / MAGIC: one forward of k tokens per
row, k CLIP texts; beam search: one forward per beam that goes on), and what hooks on the torch
modules themselves see (rows and tokens into the LM, token positions into CLIP's text tower,
images into its image tower)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator

import pytest

from magic_edu import MagicEduError, Stepper, Trace, magic_search
from magic_edu.costs import Cost

from conftest import make_image

PROMPT = "a red"  # a prefix of several ids, so the prompt's forward is told apart from a step's


@contextlib.contextmanager
def module_counts(lm, clip=None) -> Iterator[dict[str, int]]:
    """Rows and tokens into the LM's module, token positions into CLIP's text token embedding and
    images into its image tower, as forward hooks on the torch modules see them."""
    seen = {"lm_forwards": 0, "lm_tokens": 0, "clip_text_tokens": 0, "clip_images": 0}

    def lm_hook(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen["lm_forwards"] += ids.shape[0]
        seen["lm_tokens"] += ids.numel()

    def text_hook(module, args):
        seen["clip_text_tokens"] += args[0].numel()

    def image_hook(module, args):
        seen["clip_images"] += args[0].shape[0]

    handles = [lm.model.register_forward_pre_hook(lm_hook, with_kwargs=True)]
    if clip is not None:
        tower = getattr(clip.model, "text", clip.model)
        handles.append(tower.token_embedding.register_forward_pre_hook(text_hook))
        handles.append(clip.model.visual.register_forward_pre_hook(image_hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def counts(cost: Cost) -> dict[str, int]:
    return {name: getattr(cost, name) for name in ("lm_forwards", "lm_tokens", "clip_text_tokens", "clip_images")}


def stepped(stepper: Stepper) -> list[tuple[object, dict[str, int]]]:
    """Run ``stepper`` to the end: (row 0's record, what the hooks saw during that step) per step."""
    out = []
    while not stepper.done:
        with module_counts(stepper.lm, stepper.clip) as seen:
            record = stepper.step()
        out.append((record, dict(seen)))
    return out


def clip_length(clip, text: str) -> int:
    """Tokens of ``text`` as open_clip's tokenizer gives it: start, BPE ids, end, cut to the context."""
    return min(len(clip.tokenizer.encode(text)) + 2, clip.tokenizer.context_length)


@pytest.mark.parametrize("decoder,params", [("greedy", {}), ("top_k", dict(k=5, seed=3)),
                                            ("nucleus", dict(p=0.9, seed=3)), ("typical", dict(mass=0.9, seed=3))])
def test_greedy_and_sampling_run_one_token_per_step(tiny_lm, decoder, params):
    with module_counts(tiny_lm) as seen:
        s = Stepper(tiny_lm, decoder, prompt=PROMPT, max_new_tokens=5, stop_at_eos=False, **params)
    setup = s.traces[0].setup_cost
    assert (setup.lm_forwards, setup.lm_tokens) == (1, len(s.prefix))  # the prompt's forward, once
    assert counts(setup) == seen
    for record, seen in stepped(s):
        cost = record.cost
        assert (cost.lm_forwards, cost.lm_tokens, cost.lm_backwards) == (1, 1, 0)
        assert (cost.clip_texts, cost.clip_text_tokens, cost.clip_images) == (0, 0, 0)
        assert counts(cost) == seen and cost.seconds > 0


@pytest.mark.parametrize("k", [1, 4, 7])
def test_contrastive_runs_k_tokens_per_step(tiny_lm, k):
    s = Stepper(tiny_lm, "contrastive", k=k, alpha=0.5, prompt=PROMPT, max_new_tokens=5, stop_at_eos=False)
    assert (s.traces[0].setup_cost.lm_forwards, s.traces[0].setup_cost.lm_tokens) == (1, len(s.prefix))
    for record, seen in stepped(s):
        assert (record.cost.lm_forwards, record.cost.lm_tokens, record.cost.clip_texts) == (1, k, 0)
        assert counts(record.cost) == seen


@pytest.mark.parametrize("batch,k,share", [(1, 3, True), (3, 4, True), (1, 5, False), (2, 3, False)])
def test_magic_runs_k_tokens_and_k_clip_texts_per_row(tiny_lm, tiny_clip, batch, k, share):
    """Without prefix sharing CLIP runs every text trimmed to the longest: B k max_len positions,
    max_len from open_clip's tokenizer; with sharing, fewer, exactly as many as the tower sees."""
    images = [make_image(20 + i) for i in range(batch)]
    with module_counts(tiny_lm, tiny_clip) as seen:
        s = Stepper(tiny_lm, "magic", clip=tiny_clip, image=images, k=k, alpha=0.2, beta=2.0, prompt=PROMPT,
                    max_new_tokens=5, stop_at_eos=False)
    setup = s.traces[0].setup_cost
    assert (setup.lm_forwards, setup.lm_tokens, setup.clip_images, setup.clip_texts) == (1, len(s.prefix), batch, 0)
    assert counts(setup) == seen
    before = tiny_clip.share_prefix
    tiny_clip.share_prefix = share
    try:
        steps = stepped(s)
    finally:
        tiny_clip.share_prefix = before
    for t, (_, seen) in enumerate(steps):
        cost = s.traces[0][t].cost
        assert all(trace[t].cost == cost for trace in s.traces)  # the whole step's, in every row's record
        assert (cost.lm_forwards, cost.lm_tokens, cost.clip_texts, cost.clip_images) == (batch, batch * k,
                                                                                         batch * k, 0)
        lengths = [clip_length(tiny_clip, text) for trace in s.traces for text in trace[t].clip_text]
        if share:
            assert cost.clip_text_tokens <= batch * k * max(lengths)
        else:
            assert cost.clip_text_tokens == batch * k * max(lengths)
        assert counts(cost) == seen


def test_magic_with_clip_prefixes_remembered_counts_what_runs(tiny_lm, tiny_clip):
    """The decoder functions reuse the previous step's CLIP prefix: fewer positions, still exactly
    those the text tower runs."""
    image = make_image(5)
    tiny_clip.prefix_memo.clear()
    with module_counts(tiny_lm, tiny_clip) as seen:
        gen = magic_search(tiny_lm, tiny_clip, image, k=4, alpha=0.2, beta=2.0, max_new_tokens=6, stop_at_eos=False)
    trace = gen.trace
    total = trace.setup_cost + sum((r.cost for r in trace), Cost())
    assert counts(total) == seen
    assert total.clip_texts == 4 * 6 and total.lm_tokens == len(trace.prefix_ids) + 4 * 6


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_search_runs_one_forward_per_beam_that_goes_on(tiny_lm, num_beams):
    s = Stepper(tiny_lm, "beam", num_beams=num_beams, prompt=PROMPT, max_new_tokens=5, stop_at_eos=False)
    assert (s.traces[0].setup_cost.lm_forwards, s.traces[0].setup_cost.lm_tokens) == (1, len(s.prefix))
    steps = stepped(s)
    for t, (record, seen) in enumerate(steps):
        going_on = 0 if t == len(steps) - 1 else num_beams  # the last step ends the search
        assert going_on == sum(b >= 0 for b in record.next_beam) or t == len(steps) - 1
        assert (record.cost.lm_forwards, record.cost.lm_tokens) == (going_on, going_on)
        assert counts(record.cost) == seen


@pytest.mark.parametrize("decoder,params", [("greedy", {}), ("contrastive", dict(k=4, alpha=0.4)),
                                            ("beam", dict(num_beams=2)), ("top_k", dict(k=5, seed=1)),
                                            ("magic", dict(k=4, alpha=0.2, beta=2.0))])
def test_back_then_step_costs_the_same(tiny_lm, tiny_clip, decoder, params):
    extra = dict(clip=tiny_clip, image=[make_image(1), make_image(2)]) if decoder == "magic" else {}
    s = Stepper(tiny_lm, decoder, max_new_tokens=4, stop_at_eos=False, **extra, **params)
    first = [s.step().cost for _ in range(3)]
    s.back()
    s.back()
    again = [s.step().cost for _ in range(2)]
    for a, b in zip(first[1:], again):
        assert counts(a) == counts(b) and (a.clip_texts, a.lm_backwards) == (b.clip_texts, b.lm_backwards)


def test_costs_are_columns_and_survive_a_file(tiny_lm, tiny_clip, tmp_path):
    gen = magic_search(tiny_lm, tiny_clip, make_image(0), k=3, max_new_tokens=3, stop_at_eos=False)
    frame = gen.trace.to_frame()
    assert list(frame.columns[-7:]) == ["lm_forwards", "lm_tokens", "lm_backwards", "clip_texts", "clip_text_tokens",
                                        "clip_images", "seconds"]
    assert (frame["clip_texts"] == 3).all() and (frame["lm_backwards"] == 0).all()
    loaded = Trace.load(gen.trace.save(tmp_path / "t.json"))
    assert loaded.setup_cost == gen.trace.setup_cost
    assert [r.cost for r in loaded] == [r.cost for r in gen.trace]
    assert loaded.to_frame().equals(frame)


def test_a_version_2_file_loads_with_unknown_costs(tiny_lm, tmp_path):
    data = Stepper(tiny_lm, "greedy", max_new_tokens=2).run()[0].trace.to_dict()
    data["version"] = 2
    del data["setup_cost"]
    for step in data["steps"]:
        del step["cost"]
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(data))
    loaded = Trace.load(path)
    for cost in [loaded.setup_cost] + [r.cost for r in loaded]:
        assert not cost.known and cost.lm_forwards == -1 and math.isnan(cost.seconds)
    frame = loaded.to_frame()
    assert (frame["lm_tokens"] == -1).all() and frame["seconds"].isna().all()


@pytest.mark.parametrize("cost,message", [({"lm_forwards": 1}, "missing 'lm_tokens'"),
                                          ({**Cost().to_dict(), "lm_tokens": 1.5}, "'lm_tokens' must be an integer"),
                                          ({**Cost().to_dict(), "seconds": "x"}, "'seconds' must be a number"),
                                          ({**Cost().to_dict(), "gpu": 1}, "unknown field 'gpu'"),
                                          ([1], "must be an object")])
def test_a_broken_cost_names_the_step_and_field(tiny_lm, cost, message):
    data = Stepper(tiny_lm, "greedy", max_new_tokens=1).run()[0].trace.to_dict()
    data["steps"][0]["cost"] = cost
    with pytest.raises(MagicEduError, match=r"steps\[0\]: 'cost'") as err:
        Trace.from_dict(data)
    assert message in str(err.value)
