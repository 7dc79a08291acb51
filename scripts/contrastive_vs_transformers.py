"""Contrastive search on GPT-2 small's architecture (random weights): our Stepper against
transformers' own implementation, peak memory and time for the same number of tokens.

transformers 5 moved contrastive search to a hub repository (`custom_generate`), which needs a
network; transformers 4.x still ships it. So run the two sides in two environments:

    python scripts/contrastive_vs_transformers.py ours 200            # this project's .venv
    /path/to/venv-with-transformers-4.46/bin/python scripts/contrastive_vs_transformers.py transformers 200

Each prints "<side> <tokens> tokens: <MiB> MiB peak above the loaded model, <s> s" (one thread,
k = 5, alpha = 0.6, no stop at EOS, Linux: the peak is read from /proc/self/status).
"""

from __future__ import annotations

import gc
import sys
import time

import torch


def rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main(side: str, tokens: int) -> None:
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = GPT2LMHeadModel(config).eval()
    if side == "ours":
        from magic_edu import Stepper
        from magic_edu.models import LanguageModel
        from magic_edu.tools.random_models import word_tokenizer

        lm = LanguageModel(model, word_tokenizer(50257))

        def run() -> None:
            Stepper(lm, "contrastive", k=5, alpha=0.6, max_new_tokens=tokens, stop_at_eos=False, record=False,
                    history=False).run()
    else:
        ids = torch.tensor([[0]])

        def run() -> None:
            with torch.no_grad():
                out = model.generate(ids, penalty_alpha=0.6, top_k=5, max_new_tokens=tokens, min_new_tokens=tokens,
                                     do_sample=False, pad_token_id=0, eos_token_id=0)
            assert out.shape[1] == tokens + 1
    gc.collect()
    base = rss_kib()[0]
    with open("/proc/self/clear_refs", "w") as f:  # the peak starts again from here
        f.write("5")
    t = time.perf_counter()
    run()
    seconds = time.perf_counter() - t
    print(f"{side} {tokens} tokens: {(rss_kib()[1] - base) / 1024:.0f} MiB peak above the loaded model, "
          f"{seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200)
