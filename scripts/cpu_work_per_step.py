"""MAGIC's CPU time outside the models per step, at batch 1 and 16: what a GPU cannot hide.

On a GPU the models' forwards cost about the same at batch 1 and 16, so batch throughput is
decided by the CPU's work outside them (k texts per row per step, tokenisation, bookkeeping).
This measures it on any machine: tiny models (so their time is small, as on a GPU), with
paper-sized vocabularies (50,256 words for the LM, CLIP's BPE), k = 45, 16 tokens, median of 5.

    python scripts/cpu_work_per_step.py
    PYTHONPATH=/path/to/another/checkout python scripts/cpu_work_per_step.py   # compare versions

It uses the checkout's own ``bench.forward_timers``; the vocabulary is built here, so that
every version is measured on the same one.
"""

import tempfile
import time

import open_clip
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from magic_edu.decoding import Stepper

try:  # the layout since the architecture rework
    from magic_edu.tools.bench import forward_timers
    from magic_edu.tools.random_models import EOS, random_clip, random_language_model
except ImportError:  # older checkouts, for comparing versions
    from magic_edu.bench import forward_timers
    from magic_edu.random_models import EOS, random_clip, random_language_model

torch.set_num_threads(1)
words = [w[:-4] if w.endswith("</w>") else w for w in open_clip.get_tokenizer("ViT-B-32-quickgelu").encoder]
words = [w for w in words if w.isascii() and w.isalpha()]
vocab = {EOS: 0}
for word in words + [w.capitalize() for w in words]:
    if len(vocab) == 50256:
        break
    vocab.setdefault(word, len(vocab))
tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)

lm = random_language_model(n_layer=2, n_embd=64, n_head=2, n_positions=256, tokenizer=tokenizer, initializer_range=0.2)
clip = random_clip(tempfile.mkdtemp(), text_layers=2)
STEPS = 16
for batch in (1, 16):
    images = [Image.new("RGB", (32, 32), (40 + 30 * i % 200, 80, 220 - 10 * i % 200)) for i in range(batch)]

    def run(images: list = images) -> None:
        Stepper(lm, "magic", clip=clip, image=images, k=45, alpha=0.1, beta=2.0, max_new_tokens=STEPS,
                stop_at_eos=False).run()

    run()  # warm-up
    samples = []
    for _ in range(5):
        with forward_timers(lm, clip) as spent:
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
        samples.append((elapsed, elapsed - spent["lm"] - spent["clip"]))
    elapsed, outside = sorted(samples)[len(samples) // 2]
    print(f"batch {batch:2d}: {1000 * elapsed / STEPS:.1f} ms per step, of which outside the models "
          f"{1000 * outside / STEPS:.1f} ms")
