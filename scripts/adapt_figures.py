"""The README's adapt-lm figures, measured on a tiny model on the CPU (no download):

    PYTHONPATH=. python scripts/adapt_figures.py [--steps 300] [--out /tmp/adapt_figures]

1. A tiny random GPT-2 (2 layers, width 64, a byte-level BPE of 400 tokens trained on the corpus)
   adapted on the toy world's caption corpus with SimCTG, and with MLE only, the same recipe
   otherwise: losses before and after, held-out perplexity, tokens per second, and the
   self-similarity of the token representations (the SimCTG paper's isotropy measure).
2. Two CPU processes (torchrun, gloo, DDP) against one process with the same effective batch:
   the largest differences of the per-step losses and of the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from magic_edu import LanguageModel
from magic_edu.tools.random_models import byte_level_tokenizer, random_language_model
from magic_edu.toyworld import shapes
from magic_edu.training.adapt import AdaptConfig, adapt_lm, self_similarity_of

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="/tmp/adapt_figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    captions = sorted(set(shapes.caption_corpus(range(6000), per_scene=1)))
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(captions) + "\n")
    tok = byte_level_tokenizer("\n".join(captions), vocab_size=400)
    lm = random_language_model(n_layer=2, n_embd=64, n_head=4, sos_token=None, tokenizer=tok,
                               initializer_range=0.02, seed=0)
    lm.model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    recipe = dict(corpus=str(corpus), base=str(root / "base"), steps=args.steps, batch_size=32,
                  micro_batch_size=32, learning_rate=1e-3, save_every=args.steps, log_every=args.steps,
                  progress=False, clip="local-dir:none", clip_pretrained=None)
    print(f"corpus: {len(captions)} toy captions; {torch.get_num_threads()} thread(s); {args.steps} steps, "
          "batch 32, lr 1e-3, warm-up 10 %, margin 0.5")
    held = None
    rows = {}
    for name, contrastive in (("SimCTG", True), ("MLE only", False)):
        started = time.perf_counter()
        r = adapt_lm(AdaptConfig(out=str(root / name.replace(" ", "-")), contrastive=contrastive, **recipe))
        seconds = time.perf_counter() - started
        adapted = LanguageModel.from_pretrained(str(root / name.replace(" ", "-")))
        if held is None:
            held = captions[:300]  # (held-out texts are a seeded 5 %; these 300 serve as probe texts)
            base = LanguageModel.from_pretrained(str(root / "base"))
            rows["base (random init)"] = {"self_similarity": self_similarity_of(base, held)}
        first, last = r.history[:10], r.history[-10:]
        tokens = sum(h["tokens"] for h in r.history)
        rows[name] = {
            "train_mle_first10": sum(h["mle"] for h in first) / 10,
            "train_mle_last10": sum(h["mle"] for h in last) / 10,
            "train_cl_first10": sum(h["cl"] for h in first) / 10 if contrastive else None,
            "train_cl_last10": sum(h["cl"] for h in last) / 10 if contrastive else None,
            "held_out_ppl_start": r.evals[0]["held_out_ppl"], "held_out_ppl_end": r.evals[-1]["held_out_ppl"],
            "held_out_cl_start": r.evals[0]["held_out_cl"], "held_out_cl_end": r.evals[-1]["held_out_cl"],
            "tokens_per_s": tokens / sum(h["seconds"] for h in r.history), "seconds": seconds,
            "self_similarity": self_similarity_of(adapted, held),
        }
    print(json.dumps(rows, indent=1))

    # two processes against one, the same effective batch of 16 (micro-batches of 8)
    two = ["--corpus", str(corpus), "--base", str(root / "base"), "--steps", "20", "--batch-size", "16",
           "--micro-batch-size", "8", "--learning-rate", "1e-3", "--save-every", "20", "--no-progress",
           "--clip", "local-dir:none", "--clip-pretrained", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "magic_edu", "adapt-lm", *two, "--out", str(root / "two")], env=env, check=True,
                   capture_output=True)
    two_s = time.perf_counter() - started
    started = time.perf_counter()
    one = adapt_lm(AdaptConfig(**{**recipe, "steps": 20, "batch_size": 16, "micro_batch_size": 8,
                                  "save_every": 20, "log_every": 20}, out=str(root / "one")))
    one_s = time.perf_counter() - started
    log = json.loads((root / "two" / "training_log.json").read_text())["steps"]
    d_mle = max(abs(a["mle"] - b["mle"]) / a["mle"] for a, b in zip(one.history, log))
    d_cl = max(abs(a["cl"] - b["cl"]) / max(a["cl"], 1e-12) for a, b in zip(one.history, log))
    x = LanguageModel.from_pretrained(str(root / "one")).model.state_dict()
    y = LanguageModel.from_pretrained(str(root / "two")).model.state_dict()
    d_w = max(float((x[k] - y[k]).abs().max()) for k in x)
    print(f"two processes vs one, 20 steps: largest relative difference of the MLE loss {d_mle:.2e}, of the "
          f"contrastive loss {d_cl:.2e}; largest weight difference {d_w:.2e}; wall time {two_s:.1f} s "
          f"(torchrun, 2 processes, start-up included) vs {one_s:.1f} s (in this process)")


if __name__ == "__main__":
    main()
