"""Adapt a language model to a domain's text alone: MAGIC's first half.

    magic-edu adapt-lm --corpus captions.txt --base gpt2 --out runs/coco-lm      # one GPU, or the CPU
    torchrun --standalone --nproc_per_node 4 -m magic_edu adapt-lm --corpus ... --out ...   # 4 GPUs
    magic_edu.training.adapt.adapt_lm(AdaptConfig(corpus="captions.txt", out="runs/coco-lm"))

The language model never sees an image: it is tuned on the target domain's captions with the
SimCTG objective, MLE plus the token-level contrastive loss of margin 0.5
(:mod:`magic_edu.training.simctg`, the same code the toy world's LM trains with). The result is
a Hugging Face folder that :func:`magic_edu.load_models` loads like a preset
(``load_models("runs/coco-lm")``) and :meth:`LanguageModel.from_pretrained` like any checkpoint.

**The authors' recipe** (yxuansu/MAGIC, ``image_captioning/language_model/``: the MSCOCO script
``train_mscoco.sh``, with ``train.py``, ``dataclass.py``, ``simctg.py`` and ``trainer.py``), the
defaults of :class:`AdaptConfig`:

* the start token ``<-start_of_text->`` and the pad token ``<-pad->`` are added to the tokenizer
  with ``add_tokens`` (when missing) and the embeddings resized (``dataclass.py`` / ``simctg.py``:
  ``add_special_token``); every text becomes ``<-start_of_text->`` + its first ``max_length`` (64)
  tokens + EOS (``--add_eos_token_to_data True``; EOS is GPT-2's ``<|endoftext|>``), and texts of
  fewer than two tokens are dropped (``process_one_text``);
* effective batch 128 (``--batch_size_per_gpu 32`` x ``--gradient_accumulation_steps 4``),
  learning rate 2e-5 with AdamW (transformers' old ``AdamW``: eps 1e-6, no weight decay), a
  linear warm-up over the first 10 % of the steps then a linear decay to zero
  (``get_linear_schedule_with_warmup``), gradients clipped to norm 1.0, 20,000 steps, margin 0.5;
  GPT-2's dropout stays on, as in their training;
* a checkpoint every 500 steps (``--save_every 500``) with the held-out perplexity.

Where this code differs, on purpose:

* **Loss normalisation.** Their trainer sums the means of the micro-batches and clips after every
  micro-batch. Here the step's loss is the mean over the whole effective batch (every target
  token for MLE, every pair of distinct positions for the contrastive loss), and the gradient
  is clipped once: so the update does not depend on how the batch is split into micro-batches
  and processes, which is what makes one GPU, several GPUs and several machines give the same
  training (tested: two CPU processes give one process's loss curve).
* **Shifting per text.** A text of n ids gives n - 1 inputs and n - 1 targets before padding (their
  code shifts the padded batch, so whether a text's EOS is also an input depends on the longest
  text in its batch).
* **Sampling.** Each step takes the next 128 texts of a shuffled pass over the corpus (a new
  shuffle per pass), not 128 drawn at random; which texts a step sees depends only on the seed
  and the step, so a resumed run sees what an uninterrupted one would.
* **Held-out split.** Without ``dev_corpus`` a share of the corpus (``held_out``, 5 %, at most
  5,000 texts) is held out for the perplexity; their scripts read separate dev and test files
  (``dev_corpus`` reads one). The last checkpoint is the result (theirs keeps the best by
  dev loss; the log lists every checkpoint's perplexity).

**Distributed.** One command, any number of processes: under ``torchrun`` (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` in the environment) each process joins the process group (NCCL on CUDA,
gloo on the CPU) and the model is wrapped in PyTorch's ``DistributedDataParallel``. The
effective batch stays ``batch_size``: sorted by length and cut into micro-batches of
``micro_batch_size``, micro-batch j goes to process j mod WORLD_SIZE, each process accumulates its
share, and DDP averages the gradients. Dropout masks are seeded by (seed, step, micro-batch), so
the same micro-batch gets the same mask whichever process runs it.

**Resuming.** Checkpoints (``out/checkpoints/step-NNNNNN``: the model and tokenizer in the Hugging
Face format, ``optimizer.pt``, ``trainer_state.json``) are written to a temporary folder and
renamed into place. Running the same command again resumes from the last one; the result is
the same as an uninterrupted run's (tested bit for bit on the CPU). Other settings than the
first run's are refused (choose another ``out``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MagicEduError
from ..inputs import read_texts
from ..presets import PAPER_CLIP, PAPER_CLIP_WEIGHTS, PAPER_PAD, PAPER_SOS, PRESET_FILE
from ..trace import write_json_atomic
from .simctg import IGNORE, contrastive_loss, mle_loss, pair_count

CONFIG_FILE = "adapt_config.json"
LOG_FILE = "training_log.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"step-(\d+)")
CAPTION_DEFAULTS = {"k": 45, "alpha": 0.1, "beta": 2.0, "max_new_tokens": 15}  # the paper-mscoco preset's


@dataclass
class AdaptConfig:
    """Every setting of an adaptation; the defaults are the authors' MSCOCO recipe (see the module
    docstring). ``corpus``: a text file (one text a line), a JSON file in the paper's caption format
    (a list of ``{"captions": [...]}``, or a list of strings), or a list of texts."""

    corpus: str | list[str] = field(metadata={"help": "the texts: a .txt file (one a line) or a .json file in "
                                                      "the paper's caption format (a list of {\"captions\": [...]})"})
    out: str = field(metadata={"help": "the folder to write the adapted model and its checkpoints to"})
    base: str = field(default="gpt2", metadata={"help": "the model to start from: a hub id or a local folder"})
    dev_corpus: str | list[str] | None = field(
        default=None, metadata={"help": "held-out texts for the perplexity (default: a share of --corpus)"})
    held_out: float = field(default=0.05, metadata={"help": "share of --corpus held out when no --dev-corpus"})
    held_out_max: int = field(default=5000, metadata={"help": "at most this many texts held out"})
    max_length: int = field(default=64, metadata={"help": "tokens kept of each text (before the start token and EOS)"})
    batch_size: int = field(default=128, metadata={"help": "texts per optimizer step, over all processes"})
    micro_batch_size: int = field(default=32, metadata={"help": "texts per forward pass in one process"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    warmup: float = field(default=0.1, metadata={"help": "share of the steps of linear warm-up"})
    steps: int = field(default=20_000, metadata={"help": "optimizer steps"})
    margin: float = field(default=0.5, metadata={"help": "the contrastive loss's margin rho"})
    contrastive: bool = field(default=True, metadata={"help": "SimCTG: MLE + contrastive loss (False: MLE only)",
                                                      "off": "MLE only, no contrastive loss (a baseline)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient to this norm"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints (and held-out perplexities)"})
    log_every: int = field(default=100, metadata={"help": "steps between printed lines of the losses"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (the newest)"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the order of the texts and dropout"})
    sos_token: str = field(default=PAPER_SOS, metadata={"help": "start token put before every text"})
    pad_token: str = field(default=PAPER_PAD, metadata={"help": "padding token"})
    clip: str = field(default=PAPER_CLIP, metadata={"help": "the CLIP load_models pairs the result with"})
    clip_pretrained: str | None = field(default=PAPER_CLIP_WEIGHTS,
                                        metadata={"help": "that CLIP's open_clip weights (none for local-dir:)"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when there is one)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar", "off": "no progress bar"})

    # the settings that decide the result: a resume with others is refused
    RESULT_FIELDS = ("base", "held_out", "held_out_max", "max_length", "batch_size", "micro_batch_size",
                     "learning_rate", "warmup", "steps", "margin", "contrastive", "max_grad_norm", "seed",
                     "sos_token", "pad_token")

    def check(self) -> None:
        """Every setting in its range, or a :class:`MagicEduError` naming it."""
        from ..inputs import check_float, check_int

        for name in ("held_out_max", "max_length", "batch_size", "micro_batch_size", "steps", "save_every",
                     "log_every", "keep_checkpoints"):
            check_int(getattr(self, name), name, 1)
        check_int(self.seed, "seed", 0)
        check_float(self.held_out, "held_out", 0.0, 0.5)
        check_float(self.warmup, "warmup", 0.0, 1.0)
        check_float(self.margin, "margin", 0.0)
        check_float(self.max_grad_norm, "max_grad_norm", 0.0)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise MagicEduError(f"learning_rate must be a number in (0, 1); got {self.learning_rate!r}")
        if self.batch_size % self.micro_batch_size:
            raise MagicEduError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                                f"({self.micro_batch_size})")
        if not self.out or not isinstance(self.out, (str, os.PathLike)):
            raise MagicEduError(f"out must be a folder path; got {self.out!r}")


@dataclass
class AdaptResult:
    """What :func:`adapt_lm` returns: the folder of the adapted model and the training's record.
    ``history``: one entry per step (mle, cl, lr, tokens, seconds); ``evals``: the held-out
    figures at step 0 and at every checkpoint (held_out_mle, held_out_ppl, held_out_cl)."""

    out: Path
    steps: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None

    @property
    def held_out_ppl(self) -> float | None:
        """The held-out perplexity after the last step (None without a held-out split)."""
        return self.evals[-1]["held_out_ppl"] if self.evals else None


# -- the corpus -----------------------------------------------------------------------------
def fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a list of texts (a resume checks the corpus is the same)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, sos_id: int, eos_id: int
                 ) -> tuple[list[list[int]], int]:
    """``[sos] + the first max_length ids of the text + [eos]`` per text, and the number of texts
    dropped for having fewer than two tokens (as the authors' ``process_one_text``)."""
    out, dropped = [], 0
    for start in range(0, len(texts), 4096):
        batch = list(texts[start:start + 4096])
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if len(ids) <= 1:
                dropped += 1
                continue
            out.append([sos_id, *ids[:max_length], eos_id])
    return out, dropped


def split_held_out(n: int, share: float, most: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of n texts: a seeded shuffle, the first
    min(most, round(share * n)) held out (none if share is 0; at least one text is kept for training)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(most, round(share * n), n - 1) if share > 0 else 0
    return sorted(order[k:]), sorted(order[:k])


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, mask), each (B, T): text i's inputs are its ids but the last, its labels
    the ids but the first (shifted per text); padding has pad_id, label IGNORE and mask 0."""
    t = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s) - 1
        ids[row, :n] = torch.tensor(s[:-1])
        labels[row, :n] = torch.tensor(s[1:])
    mask = (labels != IGNORE).long()
    return ids, labels, mask


class TextOrder:
    """Which training texts step s sees: positions s * B .. (s + 1) * B - 1 of an endless stream of
    shuffled passes over the corpus, pass e shuffled with seed (seed, e). Depends on nothing else."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._passes: dict[int, np.ndarray] = {}

    def _pass(self, e: int) -> np.ndarray:
        if e not in self._passes:
            self._passes = {k: v for k, v in self._passes.items() if k >= e - 1}  # keep the memory small
            self._passes[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return self._passes[e]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [int(self._pass(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]


def micro_batches(seqs: list[list[int]], size: int) -> list[list[list[int]]]:
    """The effective batch sorted by length (stable), cut into micro-batches of ``size`` (less padding)."""
    ordered = sorted(seqs, key=len)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def lr_at(step: int, cfg: AdaptConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): transformers'
    ``get_linear_schedule_with_warmup`` over ``cfg.steps`` with ``warmup`` x steps warm-up steps."""
    warmup = int(cfg.warmup * cfg.steps)
    if step < warmup:
        return cfg.learning_rate * step / max(1, warmup)
    return cfg.learning_rate * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))


# -- processes -----------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place: rank, world size, device, and whether it started the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over every process."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.started_group:
            torch.distributed.destroy_process_group()


def join_processes(device: str | None) -> Processes:
    """Read torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and join the process
    group when there are several processes: NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "cpu", "cuda"):
        raise MagicEduError(f"device must be cuda or cpu; got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise MagicEduError("device cuda: no CUDA device is available; use --device cpu")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        started = True
    return Processes(rank, world, local_rank, dev, started)


@contextmanager
def seeded(seed_parts: Sequence[int], device: torch.device) -> Iterator[None]:
    """Run the block with torch's random state seeded by ``seed_parts`` (dropout), and give the
    caller's random state back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence(list(seed_parts)).generate_state(1, dtype=np.uint64)[0] >> 1))
        yield


# -- the model ---------------------------------------------------------------------------------
def load_base(cfg: AdaptConfig) -> tuple[torch.nn.Module, Any]:
    """The base model and tokenizer, with the start and pad tokens added as the authors add them
    (``tokenizer.add_tokens`` when missing, then the embeddings resized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=False)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(cfg.base, trust_remote_code=False, dtype=torch.float32)
    except OSError as err:
        raise MagicEduError(f"base {cfg.base!r}: cannot load it as a causal language model ({err})") from None
    if tokenizer.eos_token is None:
        raise MagicEduError(f"base {cfg.base!r}: its tokenizer has no EOS token, which every text must end with")
    added = [t for t in (cfg.sos_token, cfg.pad_token) if t not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_tokens(added)
        torch.manual_seed(cfg.seed)  # the new embedding rows are drawn at random
        model.resize_token_embeddings(len(tokenizer))
    tokenizer.pad_token = cfg.pad_token
    return model, tokenizer


def token_id(tokenizer: Any, token: str) -> int:
    return int(tokenizer.convert_tokens_to_ids([token])[0])


def forward_sums(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 margin: float, contrastive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the targets, summed contrastive loss over the pairs) of one
    micro-batch; the contrastive sum is 0 when ``contrastive`` is off."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ce = mle_loss(out.logits, labels, reduction="sum")
    cl = contrastive_loss(out.hidden_states[-1], mask, margin, reduction="sum") if contrastive else ce.new_zeros(())
    return ce, cl


@torch.no_grad()
def evaluate_held_out(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, cfg: AdaptConfig,
                      procs: Processes) -> dict[str, float]:
    """Held-out mean cross-entropy per token, its perplexity, and the mean contrastive loss (every
    process takes every WORLD_SIZE-th text; the sums are added over the processes)."""
    was_training = model.training
    model.eval()
    ce = tokens = cl = pairs = 0.0
    mine = seqs[procs.rank::procs.world]
    for batch in micro_batches(mine, cfg.micro_batch_size):
        ids, labels, mask = (t.to(procs.device) for t in collate(batch, pad_id))
        c, p = forward_sums(model, ids, labels, mask, cfg.margin, True)
        ce, cl = ce + float(c), cl + float(p)
        tokens += float(mask.sum())
        pairs += pair_count([len(s) - 1 for s in batch])
    model.train(was_training)
    ce, tokens, cl, pairs = procs.sum([ce, tokens, cl, pairs])
    mean = ce / max(tokens, 1.0)
    return {"held_out_mle": mean, "held_out_ppl": math.exp(min(mean, 700.0)), "held_out_cl": cl / max(pairs, 1.0)}


# -- files -----------------------------------------------------------------------------------
def settings_of(cfg: AdaptConfig, corpus_hash: str, dev_hash: str | None) -> dict[str, Any]:
    """What decides the result (written to ``out/adapt_config.json``)."""
    out = {name: getattr(cfg, name) for name in AdaptConfig.RESULT_FIELDS}
    out.update(format="magic_edu.adapt_config", version=1, corpus=corpus_hash, dev_corpus=dev_hash)
    return out


def preset_of(cfg: AdaptConfig, corpus_name: str) -> dict[str, Any]:
    """The ``magic_edu_preset.json`` that lets ``load_models(out)`` load the folder like a preset."""
    objective = "SimCTG" if cfg.contrastive else "MLE only"
    return {
        "format": "magic_edu.preset", "version": 1, "kind": "caption",
        "description": f"{cfg.base} adapted on {corpus_name} ({objective}, {cfg.steps} steps) + {cfg.clip}",
        "sos_token": cfg.sos_token, "pad_token": cfg.pad_token, "prompt_format": "{sos}{prompt}",
        "clip": cfg.clip, "clip_pretrained": cfg.clip_pretrained, "defaults": dict(CAPTION_DEFAULTS),
    }


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``out/checkpoints``, oldest first: (step, folder)."""
    folder = out / CHECKPOINTS
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = CHECKPOINT_NAME.fullmatch(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, out: Path, step: int,
                    state: dict[str, Any], preset: dict[str, Any], keep: int) -> Path:
    """Write ``out/checkpoints/step-NNNNNN`` through a temporary folder renamed into place, then
    remove all but the newest ``keep`` checkpoints."""
    folder = out / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_json_atomic(tmp / PRESET_FILE, preset)
    write_json_atomic(tmp / STATE_FILE, state)  # last: a folder with it is complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish(checkpoint: Path, out: Path) -> None:
    """Copy a checkpoint's model, tokenizer and preset file into ``out`` itself, each file through a
    temporary name and a rename; the preset file goes last, so ``load_models(out)`` never sees a
    half-written model."""
    files = [p for p in sorted(checkpoint.iterdir())
             if p.is_file() and p.name not in (OPTIMIZER_FILE, STATE_FILE, PRESET_FILE)]
    for p in [*files, checkpoint / PRESET_FILE]:
        tmp = out / f".{p.name}.tmp-{os.getpid()}"
        shutil.copyfile(p, tmp)
        os.replace(tmp, out / p.name)


def remove_stale(out: Path) -> None:
    """Temporary files and folders a killed run left."""
    for folder in (out, out / CHECKPOINTS):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_out(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an ``out`` that holds something else, or an earlier adaptation with other settings."""
    if out.exists() and not out.is_dir():
        raise MagicEduError(f"out {out} is a file; give a folder")
    config = out / CONFIG_FILE
    if config.is_file():
        try:
            before = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MagicEduError(f"out {out}: {config.name} is not readable ({err}); choose another folder") from None
        differ = [f"{k} {json.dumps(before.get(k))} before, {json.dumps(v)} now" for k, v in
                  json.loads(json.dumps(settings)).items() if before.get(k) != v]
        if differ:
            raise MagicEduError(f"out {out} holds an adaptation with other settings ({'; '.join(differ)}); "
                                "run with the same settings to resume it, or choose another folder")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise MagicEduError(f"out {out} is not empty and holds no adaptation; choose a new or empty folder")


def hold_lock(out: Path) -> Any:
    """``out/.adapt.lock``, held for the whole run: a second adapt-lm on the same folder is refused."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / ".adapt.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise MagicEduError(f"out {out}: another adapt-lm is writing it; wait for it or choose another folder"
                            ) from None
    return lock


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MagicEduError(f"checkpoint {checkpoint}: {STATE_FILE} is not readable ({err})") from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars (loading and writing weights) off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# -- the loop ------------------------------------------------------------------------------------
def adapt_lm(config: AdaptConfig) -> AdaptResult:
    """Adapt ``config.base`` to ``config.corpus`` (see the module docstring); resumes from the last
    checkpoint in ``config.out`` if there is one. Under torchrun every process calls this."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config
    cfg.check()
    out = Path(cfg.out)
    texts = read_texts(cfg.corpus, "corpus")
    dev_texts = read_texts(cfg.dev_corpus, "dev_corpus") if cfg.dev_corpus is not None else None
    settings = settings_of(cfg, fingerprint(texts), fingerprint(dev_texts) if dev_texts else None)
    corpus_name = Path(cfg.corpus).name if isinstance(cfg.corpus, (str, os.PathLike)) else f"{len(texts)} texts"

    procs = join_processes(cfg.device)
    with ExitStack() as stack:
        stack.callback(procs.close)
        n_micro = cfg.batch_size // cfg.micro_batch_size
        if n_micro % procs.world:
            raise MagicEduError(
                f"batch_size {cfg.batch_size} / micro_batch_size {cfg.micro_batch_size} = {n_micro} micro-batches "
                f"per step cannot be shared by {procs.world} processes; make batch_size a multiple of "
                f"micro_batch_size x {procs.world}")
        if procs.main:
            check_out(out, settings)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MagicEduError(f"out {out}: cannot create it ({err})") from None
            lock = hold_lock(out)
            stack.callback(lock.release)
            remove_stale(out)
            write_json_atomic(out / CONFIG_FILE, settings)
        procs.barrier()

        found = checkpoints(out)
        resumed_from = found[-1][0] if found else None
        if found:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(found[-1][1], dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(found[-1][1])
            state = load_state(found[-1][1])
        else:
            model, tokenizer = load_base(cfg)
            state = {"step": 0, "history": [], "evals": []}
        sos_id, pad_id = token_id(tokenizer, cfg.sos_token), token_id(tokenizer, cfg.pad_token)
        eos_id = int(tokenizer.eos_token_id)

        seqs, dropped = encode_texts(tokenizer, texts, cfg.max_length, sos_id, eos_id)
        if dev_texts is not None:
            train, held = seqs, encode_texts(tokenizer, dev_texts, cfg.max_length, sos_id, eos_id)[0]
        else:
            train_ids, held_ids = split_held_out(len(seqs), cfg.held_out, cfg.held_out_max, cfg.seed)
            train, held = [seqs[i] for i in train_ids], [seqs[i] for i in held_ids]
        if not train:
            raise MagicEduError("corpus: no text has two tokens or more to train on")
        if procs.main:
            note = f" ({dropped} texts of fewer than two tokens dropped)" if dropped else ""
            print(f"adapt-lm: {len(train)} training texts, {len(held)} held out{note}; {procs.world} process(es) on "
                  f"{procs.device.type}; {'resuming from step ' + str(resumed_from) if found else 'starting'}",
                  file=sys.stderr)

        model.to(procs.device).train()
        raw_model = model
        if procs.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda"
                                            else None)
        optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-6,
                                      weight_decay=0.0)
        if found:
            optimizer.load_state_dict(torch.load(found[-1][1] / OPTIMIZER_FILE, map_location=procs.device,
                                                 weights_only=True))
        preset = preset_of(cfg, corpus_name)
        result = _train(cfg, model, raw_model, tokenizer, optimizer, procs, train, held, pad_id, state, preset, out)
        result.resumed_from = resumed_from
        return result


def _train(cfg: AdaptConfig, model: torch.nn.Module, raw_model: torch.nn.Module, tokenizer: Any,
           optimizer: torch.optim.Optimizer, procs: Processes, train: list[list[int]], held: list[list[int]],
           pad_id: int, state: dict[str, Any], preset: dict[str, Any], out: Path) -> AdaptResult:
    from tqdm import tqdm

    start, history, evals = int(state["step"]), list(state["history"]), list(state["evals"])
    order = TextOrder(len(train), cfg.batch_size, cfg.seed)
    began = time.perf_counter()
    if start == 0 and held and not evals:
        evals.append({"step": 0, **evaluate_held_out(raw_model, held, pad_id, cfg, procs)})
    label = "SimCTG" if cfg.contrastive else "MLE"
    bar = tqdm(total=cfg.steps, initial=start, desc=f"adapt-lm ({label})", unit="step", file=sys.stderr,
               disable=not (cfg.progress and procs.main), mininterval=1.0)
    step = start
    try:
        for step in range(start, cfg.steps):
            entry = train_step(cfg, model, raw_model, optimizer, procs, [train[i] for i in order.batch(step)],
                               pad_id, step)
            history.append(entry)
            bar.update(1)
            bar.set_postfix(mle=f"{entry['mle']:.3f}", **({"cl": f"{entry['cl']:.3f}"} if cfg.contrastive else {}),
                            tok_s=f"{entry['tokens'] / max(entry['seconds'], 1e-9):,.0f}")
            done = step + 1
            if procs.main and (done % cfg.log_every == 0 or done == cfg.steps):
                recent = history[-cfg.log_every:]
                line = f"step {done}: mle {np.mean([h['mle'] for h in recent]):.4f}"
                if cfg.contrastive:
                    line += f", cl {np.mean([h['cl'] for h in recent]):.4f}"
                tokens_s = sum(h["tokens"] for h in recent) / max(sum(h["seconds"] for h in recent), 1e-9)
                bar.write(f"{line}, lr {entry['lr']:.3g}, {tokens_s:,.0f} tokens/s")
            if done % cfg.save_every == 0 or done == cfg.steps:
                if held:
                    evals.append({"step": done, **evaluate_held_out(raw_model, held, pad_id, cfg, procs)})
                    if procs.main:
                        bar.write(f"step {done}: held-out perplexity {evals[-1]['held_out_ppl']:.3f}")
                if procs.main:
                    state = {"format": "magic_edu.adapt_state", "version": 1, "step": done, "history": history,
                             "evals": evals}
                    save_checkpoint(raw_model, tokenizer, optimizer, out, done, state, preset, cfg.keep_checkpoints)
                    write_json_atomic(out / LOG_FILE, {"steps": history, "evals": evals})
                procs.barrier()
    except KeyboardInterrupt:
        bar.close()
        last = checkpoints(out)
        if procs.main:
            where = f"step {last[-1][0]}" if last else "the start (no checkpoint yet)"
            print(f"\ninterrupted at step {step}; the same command resumes from {where}", file=sys.stderr)
        raise
    bar.close()
    if procs.main:
        last = checkpoints(out)
        publish(last[-1][1], out)
        write_json_atomic(out / LOG_FILE, {"steps": history, "evals": evals})
        print(f"adapt-lm: the adapted model is in {out} (load_models({str(out)!r}))", file=sys.stderr)
    procs.barrier()
    return AdaptResult(out, cfg.steps, history, evals, time.perf_counter() - began)


def train_step(cfg: AdaptConfig, model: torch.nn.Module, raw_model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, procs: Processes, batch: list[list[int]], pad_id: int,
               step: int) -> dict[str, Any]:
    """One optimizer step on the effective batch ``batch`` (every process passes the same one):
    each process runs its micro-batches (j = rank, rank + WORLD_SIZE, ...); the loss of a
    micro-batch is its sums divided by the whole batch's target tokens and pairs (times WORLD_SIZE,
    as DDP averages the gradients), so the gradient is the batch's mean however it is split."""
    t0 = time.perf_counter()
    micro = micro_batches(batch, cfg.micro_batch_size)
    targets = sum(len(s) - 1 for s in batch)
    pairs = max(pair_count([len(s) - 1 for s in batch]), 1)
    mine = list(range(procs.rank, len(micro), procs.world))
    ce_sum = cl_sum = 0.0
    for n, j in enumerate(mine):
        ids, labels, mask = (t.to(procs.device) for t in collate(micro[j], pad_id))
        last = n == len(mine) - 1
        sync = nullcontext() if last or procs.world == 1 else model.no_sync()
        with sync, seeded((cfg.seed, step, j), procs.device):
            ce, cl = forward_sums(model, ids, labels, mask, cfg.margin, cfg.contrastive)
            loss = (ce / targets + cl / pairs) * procs.world
            loss.backward()
        ce_sum, cl_sum = ce_sum + float(ce.detach()), cl_sum + float(cl.detach())
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ce_sum, cl_sum = procs.sum([ce_sum, cl_sum])
    if procs.device.type == "cuda":
        torch.cuda.synchronize(procs.device)
    return {"step": step + 1, "mle": ce_sum / targets, "cl": cl_sum / pairs if cfg.contrastive else None,
            "lr": lr, "tokens": targets, "seconds": time.perf_counter() - t0}


# -- after training ------------------------------------------------------------------------------
@torch.no_grad()
def self_similarity_of(lm: Any, texts: Sequence[str], max_length: int = 64, batch_size: int = 64) -> float:
    """The mean self-similarity (:func:`magic_edu.training.simctg.self_similarity`) of ``lm``'s
    last-layer hidden states over ``texts``, each encoded as in training (start token, text, EOS):
    lower is more isotropic. ``lm``: a :class:`~magic_edu.models.LanguageModel`."""
    from .simctg import self_similarity

    tok = lm.tokenizer
    sos = lm.sos_token_id if lm.sos_token_id is not None else lm.eos_token_id
    seqs, _ = encode_texts(tok, list(texts), max_length, sos, lm.eos_token_id)
    values = []
    for batch in micro_batches(seqs, batch_size):
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [lm.eos_token_id] * (width - len(s)) for s in batch], device=lm.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=lm.device)
        out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        values += self_similarity(out.hidden_states[-1], mask).tolist()
    return float(np.nanmean(values))


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`AdaptConfig` (the command line makes one option of each)."""
    return list(dataclasses.fields(AdaptConfig))


# -- the command line -----------------------------------------------------------------------------
def add_adapt_lm_command(subparsers: Any) -> None:
    """``magic-edu adapt-lm``: one option per :class:`AdaptConfig` field."""
    p = subparsers.add_parser(
        "adapt-lm", help="adapt a language model to a corpus of texts (SimCTG: MLE + contrastive loss)",
        description="Tune a causal LM on a domain's texts alone, with SimCTG, the authors' MSCOCO recipe as "
                    "defaults (yxuansu/MAGIC image_captioning/language_model/train_mscoco.sh). The result in --out "
                    "loads with magic_edu.load_models(OUT) and `magic-edu caption --preset OUT`. Run the same "
                    "command again to resume an interrupted run. Several processes: torchrun --nproc_per_node N "
                    "-m magic_edu adapt-lm ... (several machines: torchrun's --nnodes and rendezvous options).")
    for f in config_fields():
        opt = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.default is True:
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           help=f.metadata["off"])
            continue
        required = f.default is dataclasses.MISSING
        kind = type(f.default) if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) else str
        shown = "" if required or f.default is None else f" (default: {f.default})"
        p.add_argument(opt, dest=f.name, type=kind, required=required, default=None if required else f.default,
                       metavar=f.name.upper(), help=help_text + shown)
    p.set_defaults(func=run_adapt_lm)


def run_adapt_lm(args: Any) -> int:
    values = {f.name: getattr(args, f.name) for f in config_fields()}
    if values["clip_pretrained"] in ("", "none", "None"):
        values["clip_pretrained"] = None
    try:
        result = adapt_lm(AdaptConfig(**values))
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        ppl = result.held_out_ppl
        shown = f"held-out perplexity {result.evals[0]['held_out_ppl']:.2f} at step 0, {ppl:.2f} now; " if ppl else ""
        print(f"adapt-lm: {result.steps} steps; {shown}{result.seconds:.0f} s this run")
    return 0
