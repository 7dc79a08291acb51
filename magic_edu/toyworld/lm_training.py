"""The toy language model: a word-level tokenizer, and a small GPT-2 trained on text only
(captions and stories, never an image) with SimCTG, plus its twin trained with plain MLE.

SimCTG (Su et al. 2022, "A Contrastive Framework for Neural Text Generation") adds a
token-level contrastive loss with margin 0.5 to MLE. One LM serves captions
(``<-start_of_text-> caption <|endoftext|>``) and stories (``title <|endoftext|> story <|endoftext|>``,
prompted with ``title + " " + EOS``).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..presets import PAPER_PAD, PAPER_SOS
from ..training.simctg import contrastive_loss
from . import shapes
from .config import TrainConfig, set_seed, warmup_cosine

EOS, UNK = "<|endoftext|>", "<-unk->"


# -----------------------------------------------------------------------------
# the word-level tokenizer and the corpus


def build_tokenizer(texts: list[str], max_length: int):
    """A word-level tokenizer over every word of ``texts`` (sorted, so deterministic),
    wrapped as a transformers PreTrainedTokenizerFast. Punctuation is its own token and
    decoding puts no space before it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAPER_PAD, PAPER_SOS, EOS, UNK]
    words = sorted({w for t in texts for w in shapes.words_of(t)} | set(shapes.COLOURS) | set(shapes.SHAPES))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=PAPER_SOS, eos_token=EOS, pad_token=PAPER_PAD, unk_token=UNK,
        model_max_length=max_length, clean_up_tokenization_spaces=False,
    )


def lm_corpus(cfg: TrainConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Captions and (title, story) pairs from training seeds (text only)."""
    captions = shapes.caption_corpus(range(cfg.lm_captions // 3), per_scene=3)
    stories = shapes.story_corpus(range(500_000, 500_000 + cfg.lm_stories))
    return captions, stories


def lm_sequences(tokenizer, captions: list[str], stories: list[tuple[str, str]]) -> dict[str, list[list[int]]]:
    """``<-start_of_text-> caption <|endoftext|>`` and ``title <|endoftext|> story <|endoftext|>``
    token ids, kept apart so that a batch holds sequences of similar length."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "captions": [[sos, *enc(c), eos] for c in captions],
        "stories": [[*enc(t), eos, *enc(s), eos] for t, s in stories],
    }


# -----------------------------------------------------------------------------
# the language model: MLE or SimCTG


def simctg_loss(hidden: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """SimCTG's token-level contrastive loss, averaged over the real (non-pad) pairs of distinct
    positions: :func:`magic_edu.training.simctg.contrastive_loss`, the one implementation that
    ``magic-edu adapt-lm`` trains with too."""
    return contrastive_loss(hidden, mask, margin)


def train_lm(cfg: TrainConfig, tokenizer, seqs: dict[str, list[list[int]]], contrastive: bool, desc: str):
    """A small GPT2LMHeadModel trained on ``seqs``; SimCTG if ``contrastive`` else plain MLE."""
    from transformers import GPT2Config, GPT2LMHeadModel

    set_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.lm_positions, n_embd=cfg.lm_width, n_layer=cfg.lm_layers,
        n_head=cfg.lm_heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.lm_steps)
    rng = random.Random(cfg.seed)
    pad = tokenizer.pad_token_id
    model.train()
    bar = tqdm(range(cfg.lm_steps), desc=desc, mininterval=2)
    kinds = list(seqs)
    weights = [len(seqs[k]) for k in kinds]
    for _ in bar:
        batch = rng.sample(seqs[rng.choices(kinds, weights)[0]], cfg.lm_batch)
        T = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad] * (T - len(s)) for s in batch])
        mask = (ids != pad).float()
        labels = ids.masked_fill(ids == pad, -100)
        out = model(input_ids=ids, attention_mask=mask.long(), labels=labels, output_hidden_states=True)
        loss = out.loss
        if contrastive:
            cl = simctg_loss(out.hidden_states[-1], mask, cfg.margin)
            loss = loss + cl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(mle=f"{out.loss.item():.3f}", **({"cl": f"{cl.item():.3f}"} if contrastive else {}))
    return model.eval()


def train_lms(out: Path, cfg: TrainConfig) -> float:
    """Build the tokenizer, train the SimCTG LM (``out/lm``) and its MLE twin (``out/lm-mle``),
    save both; seconds taken."""
    t0 = time.time()
    captions, stories = lm_corpus(cfg)
    tokenizer = build_tokenizer(captions + [t + " " + s for t, s in stories], cfg.lm_positions)
    seqs = lm_sequences(tokenizer, captions, stories)
    for name, contrastive in (("lm", True), ("lm-mle", False)):
        model = train_lm(cfg, tokenizer, seqs, contrastive, desc=f"train {name} ({'SimCTG' if contrastive else 'MLE'})")
        if (out / name).exists():
            shutil.rmtree(out / name)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return time.time() - t0
