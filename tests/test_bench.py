"""The benchmark runs and its figures are consistent (speed itself is printed, never asserted)."""

from __future__ import annotations

import torch

from magic_edu.reference import magic_reference
from magic_edu.tools import bench
from magic_edu.tools.bench import (
    authors_style_magic,
    bench_models,
    format_table,
    format_work,
    step_latency,
    summary,
    work_per_step,
)

from conftest import make_image


def test_bench_models_reports_every_decoder(tiny_lm, tiny_clip):
    timings = bench_models(tiny_lm, tiny_clip, "tiny GPT-2 + CLIP", (1, 2), tokens=3, k=4, repeats=1, reference=True)
    labels = [t.label for t in timings]
    for word in ("greedy", "top-k", "nucleus", "contrastive", "MAGIC (k=4)", "no trace", "no CLIP prefix sharing",
                 "no CLIP reuse across steps", "batch 2", "batch 2, no trace", "batch 2, no CLIP prefix sharing",
                 "authors-style", "reference"):
        assert any(word in label for label in labels), word
    for t in timings:
        assert t.seconds > 0 and 0 <= t.lm_s <= t.seconds * 1.01 and 0 <= t.clip_s <= t.seconds * 1.01
        assert t.tokens == 3 * t.captions  # stop_at_eos=False: every caption has all its tokens
    magic = next(t for t in timings if "MAGIC (k=4)" in t.label)
    assert magic.clip_s > 0 and magic.lm_s > 0
    assert next(t for t in timings if t.label.endswith("greedy")).clip_s == 0
    table = format_table(timings)
    assert table.count("\n") == len(timings) + 1
    lines = summary(timings)
    assert any("MAGIC / contrastive" in line for line in lines) and any("batch 2" in line for line in lines)
    assert step_latency(tiny_lm, tiny_clip, 4, 0.1, 1.0, steps=2) > 0


def test_work_per_step_is_what_each_decoder_must_do(tiny_lm, tiny_clip):
    """Per step: greedy and sampling one forward of one token, beam search one per beam (the last
    step ends the search and runs none), contrastive and MAGIC one forward of k tokens, MAGIC k CLIP
    texts; before the first step the prefix's forward, and MAGIC's image."""
    tokens, k, beams = 4, 5, 3
    works = {w.label.split(" (")[0]: w for w in work_per_step(tiny_lm, tiny_clip, tokens, k=k, num_beams=beams)}
    prefix = len(tiny_lm.prefix_ids(None))
    for label in ("greedy", "top-k sampling", "nucleus sampling", "typical sampling"):
        assert (works[label].total.lm_forwards, works[label].total.lm_tokens) == (tokens, tokens)
    assert works["beam search"].total.lm_forwards == beams * (tokens - 1)
    for label in ("contrastive", "MAGIC"):
        assert (works[label].total.lm_forwards, works[label].total.lm_tokens) == (tokens, k * tokens)
    assert works["MAGIC"].per_step("clip_texts") == k and works["contrastive"].total.clip_texts == 0
    zerocap = works.pop("ZeroCap")
    assert all(w.total.lm_backwards == 0 and w.setup.lm_tokens == prefix and w.steps == tokens for w in works.values())
    # ZeroCap (1 beam, 5 iterations, every token a candidate: the vocabulary is under 512): its first
    # step reads a prefix of one id and is not steered (one forward); every later step runs the
    # context, p0, 5 steered forwards with a backward each and the final steered forward, CLIP 5 x V texts
    steered, vocab = tokens - 1, tiny_lm.vocab_size
    assert (zerocap.total.lm_forwards, zerocap.total.lm_backwards) == (1 + steered * (5 + 3), steered * 5)
    assert zerocap.total.clip_texts == steered * 5 * vocab and zerocap.setup.clip_images == 1
    assert works["MAGIC"].setup.clip_images == 1 and works["greedy"].setup.clip_images == 0
    table = format_work(list(works.values()))
    assert table.count("\n") == len(works) + 1 and "| MAGIC (k=5) | 1.0 | 5.0 | 0.0 | 5.0 |" in table


def test_magic_vs_zerocap_counts_each_decoders_work(tiny_lm, tiny_clip):
    """Per caption of 3 tokens after ZeroCap's prompt "Image of a" (so every step is steered): MAGIC one
    forward of the prefix and one of k candidates per step, k CLIP texts per step; ZeroCap per step the
    context, p0, num_iterations steered forwards with a backward each and the final one, and
    num_iterations x candidates CLIP texts."""
    images = [make_image(0), make_image(1)]
    v = bench.magic_vs_zerocap(tiny_lm, tiny_clip, images, 3, "tiny", dict(k=4, alpha=0.1, beta=1.0),
                               dict(num_iterations=2, candidates=7))
    assert (v.images, v.tokens, v.settings["zerocap"]["prompt"]) == (2, 3, "Image of a")
    assert (v.magic_work.lm_forwards, v.magic_work.lm_backwards, v.magic_work.clip_texts) == (1 + 3, 0, 3 * 4)
    assert v.magic_work.clip_images == 1 and v.zerocap_work.clip_images == 1
    assert (v.zerocap_work.lm_forwards, v.zerocap_work.lm_backwards) == (3 * (2 + 3), 3 * 2)
    assert v.zerocap_work.clip_texts == 3 * 2 * 7
    assert v.magic_s > 0 and v.zerocap_s > 0 and v.speedup == v.zerocap_s / v.magic_s
    lines = bench.format_versus(v)
    assert "nearly 27x" in lines[0] and f"{v.speedup:.1f}x faster" in lines[0] and "6 backward passes" in lines[1]


def test_authors_style_loop_takes_the_reference_tokens(tiny_lm64, tiny_clip64):
    image = make_image(2)
    for k, alpha, beta in ((4, 0.3, 2.0), (6, 0.1, 5.0)):
        expected = magic_reference(tiny_lm64, tiny_clip64, image, k=k, alpha=alpha, beta=beta, max_new_tokens=6,
                                   stop_at_eos=False)
        assert authors_style_magic(tiny_lm64, tiny_clip64, image, k=k, alpha=alpha, beta=beta,
                                   max_new_tokens=6) == expected


def test_gpu_timing_takes_the_wall_time_from_a_plain_run(tiny_lm, monkeypatch):
    """On a GPU, per-forward timing syncs the device (no CPU/GPU overlap), so the wall time comes
    from a plain run and the timed run's shares are scaled to it. (The CUDA branch, run on the CPU.)"""
    syncs = []
    monkeypatch.setattr(bench, "synchronize", lambda device: syncs.append(device.type))
    monkeypatch.setattr(type(tiny_lm), "device", property(lambda self: torch.device("cuda")))
    ids = torch.tensor([[1, 2, 3]])
    calls = []

    def run() -> list:
        calls.append(1)
        tiny_lm.model(input_ids=ids)  # one timed LM forward when the timers are on
        return []

    elapsed, lm_s, clip_s, tokens, captions = bench._timed_run(run, tiny_lm, None)
    assert len(calls) == 2 and tokens == captions == 0
    assert 0 < lm_s <= elapsed * 1.01 and clip_s == 0
    assert syncs.count("cuda") == 6  # around the plain run, around the timed run, around its one forward


def test_decode_memory_is_measured_in_a_fresh_process():
    mib_short, seconds = bench.decode_memory(20, size="tiny")
    assert seconds > 0 and 0 <= mib_short < 200


def test_bench_command_refuses_bad_arguments_before_any_work(capsys):
    from magic_edu.tools import cli

    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "bogus"]) == 2
    assert "--device must be a torch device" in capsys.readouterr().err
