"""Where MAGIC's time goes on a GPU at batch 1 and 16 (paper-size models, random weights).

Prints, per decode step: CUDA kernels launched, GPU busy time (sum of kernel durations) against
wall time (a GPU idle most of a step is bound by launches and CPU work, not arithmetic), the
operators with the most CPU time; then MAGIC's time with the CLIP prefix sharing forced on, left
to its rule (``SHARE_ON_GPU_SAVED_TOKENS``) and forced off. Usage (one prepared device run):

    python scripts/gpu_profile.py [cuda|cpu] [tokens]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from magic_edu.decoding import Stepper
from magic_edu.fast import clip_prefix
from magic_edu.tools.bench import authors_style_magic, synchronize
from magic_edu.tools.random_models import clip_vit_b32, gpt2_small


def main(device_name: str = "cuda", tokens: int = 16) -> None:
    device = torch.device(device_name)
    lm, clip = gpt2_small(), clip_vit_b32()
    lm.model.to(device)
    clip.model.to(device)
    images = [Image.new("RGB", (224, 224), (40 + 30 * i % 200, 80, 220 - 10 * i % 200)) for i in range(16)]

    def magic(batch: int) -> None:
        Stepper(lm, "magic", clip=clip, image=images[:batch], k=45, alpha=0.1, beta=2.0, max_new_tokens=tokens,
                stop_at_eos=False, record=False, history=False).run()

    runs = {"MAGIC batch 1": lambda: magic(1), "MAGIC batch 16": lambda: magic(16),
            "authors-style loop": lambda: authors_style_magic(lm, clip, images[0], k=45, alpha=0.1, beta=2.0,
                                                              max_new_tokens=tokens)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, run in runs.items():
        run()  # warm-up
        synchronize(device)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            run()
            synchronize(device)
        wall = (time.perf_counter() - t) * 1000 / tokens
        events = prof.key_averages()
        on_gpu = [e for e in events if e.device_type.name == "CUDA"]  # kernels and copies
        launches = sum(e.count for e in on_gpu)
        gpu_us = sum(e.self_device_time_total for e in on_gpu)
        print(f"\n## {label}: {wall:.2f} ms per step under the profiler, {launches / tokens:.0f} GPU kernels "
              f"and copies per step, GPU busy {gpu_us / 1000 / tokens:.2f} ms per step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))

    print("\n## CLIP prefix sharing on the GPU: ms per caption, median of 5 (each after one warm-up)")
    rules = {"always share": 0, "rule (SHARE_ON_GPU_SAVED_TOKENS)": clip_prefix.SHARE_ON_GPU_SAVED_TOKENS,
             "never share": 10**12}
    for batch in (1, 4, 16):
        row = []
        for name, threshold in rules.items():
            clip_prefix.SHARE_ON_GPU_SAVED_TOKENS = threshold
            magic(batch)
            times = []
            for _ in range(5):
                synchronize(device)
                t = time.perf_counter()
                magic(batch)
                synchronize(device)
                times.append((time.perf_counter() - t) * 1000 / batch)
            row.append(f"{name} {statistics.median(times):.1f}")
        clip_prefix.SHARE_ON_GPU_SAVED_TOKENS = rules["rule (SHARE_ON_GPU_SAVED_TOKENS)"]
        print(f"batch {batch}: " + ", ".join(row))


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["cuda"]), *[int(a) for a in sys.argv[2:3]])
