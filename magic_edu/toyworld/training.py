"""Train ShapesWorld's two models the paper's way, from scratch, on a CPU.

    magic-edu toy --out data/toy           # everything, about 8 min on 2 cores, the same models every time
    magic-edu toy --out /tmp/toy --quick   # a miniature, under a minute
    magic-edu toy --report                 # the README's results table for the models in data/toy

(``python -m magic_edu.toyworld.training`` takes the same arguments.)

It writes
* ``lm/``       a GPT-2 trained on captions and stories only (never an image) with the SimCTG
                objective: MLE + token-level contrastive loss, margin 0.5 (Su et al. 2022,
                "A Contrastive Framework for Neural Text Generation");
* ``lm-mle/``   its twin trained with plain MLE;
* ``clip/``     an open_clip CLIP (ResNet image tower, small text tower, open_clip's own
                tokenizer) as a ``local-dir:`` folder;
* ``defaults.json`` the decoding settings tuned on validation scenes.

One LM serves captions (``<-start_of_text-> caption <|endoftext|>``) and stories
(``title <|endoftext|> story <|endoftext|>``, prompted with ``title + " " + EOS``).

CLIP (ModifiedResNet image tower at 64 px, 2-layer text tower) is trained contrastively on
(image, text) pairs. The target is multi-positive: text j is a positive for image i whenever
the caption (or story) grammar could have written it, or a text starting with it, about scene
i (:func:`magic_edu.toyworld.shapes.text_consistent`). That copes with duplicate captions in a batch
and teaches CLIP to score the partial captions MAGIC shows it at every step. Two phases:

1. single-object scenes only, each with one whole caption and its *counterfactuals* (the
   same caption with another shape word). Shape is what CLIP learns last; without this
   phase it stayed at chance for hundreds of steps while colour was learned at once;
2. scenes in pairs that differ in one attribute (hard negatives), each with whole captions,
   caption prefixes and story prefixes, their counterfactuals, and a junk continuation
   (a prefix plus a word no template puts there, positive for no image: the kind of
   candidate MAGIC meets among the LM's top k).

The two LMs train in a second process while CLIP trains (one core each). Then k, alpha and
beta are tuned with the library's own ``magic_search`` on validation scenes.

Seeds: training scenes come from seeds below 1,000,000; tuning uses 5,000,000+;
the results table and the tests use 9,000,000+ (never seen in training).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import shapes

SOS, EOS, PAD, UNK = "<-start_of_text->", "<|endoftext|>", "<-pad->", "<-unk->"
TUNE_SEED, EVAL_SEED = 5_000_000, 9_000_000
STORY_PROMPT = "a new friend"  # a title naming no colour or shape: what the story says comes from the image


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    # language model (GPT-2)
    lm_layers: int = 3
    lm_width: int = 128
    lm_heads: int = 4
    lm_positions: int = 96
    lm_captions: int = 60_000
    lm_stories: int = 20_000
    lm_steps: int = 600
    lm_batch: int = 48
    lm_lr: float = 2e-3
    margin: float = 0.5
    # CLIP
    clip_image_size: int = 64
    clip_vision_width: int = 16  # ModifiedResNet, layers (1, 1, 1, 1)
    clip_text_width: int = 64
    clip_text_layers: int = 2  # a shallow text tower starts telling shapes apart much sooner
    clip_text_heads: int = 4
    clip_embed_dim: int = 64
    clip_context: int = 64
    clip_pool: int = 16_000  # rendered training images (pairs: a scene and its perturbed twin)
    clip_first_steps: int = 300  # first, single-object scenes only: whole captions + counterfactuals
    clip_first_batch: int = 64
    clip_steps: int = 400  # then scene pairs, captions, prefixes, stories, counterfactuals, junk
    clip_batch: int = 128  # images per step; clip_texts_per_image texts each, plus junk texts
    clip_texts_per_image: int = 2
    clip_lr: float = 2e-3
    clip_text_lr_mult: float = 1.0  # the text tower's learning rate is clip_lr times this
    clip_idf: bool = False
    # tuning of the decoding settings
    tune_scenes: int = 50


QUICK = TrainConfig(
    lm_layers=1, lm_width=32, lm_heads=2, lm_captions=600, lm_stories=200, lm_steps=15, lm_batch=16,
    clip_vision_width=8, clip_text_width=32, clip_text_layers=1, clip_text_heads=2, clip_embed_dim=32,
    clip_pool=256, clip_first_steps=4, clip_first_batch=16, clip_steps=6, clip_batch=32, tune_scenes=0,
)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# the word-level tokenizer


def build_tokenizer(texts: list[str], max_length: int):
    """A word-level tokenizer over every word of ``texts`` (sorted, so deterministic),
    wrapped as a transformers PreTrainedTokenizerFast. Punctuation is its own token and
    decoding puts no space before it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in shapes.words_of(t)} | set(shapes.COLOURS) | set(shapes.SHAPES))
    vocab = {tok: i for i, tok in enumerate([PAD, SOS, EOS, UNK] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([PAD, SOS, EOS, UNK])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
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
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "captions": [[sos] + enc(c) + [eos] for c in captions],
        "stories": [enc(t) + [eos] + enc(s) + [eos] for t, s in stories],
    }


# -----------------------------------------------------------------------------
# the language model: MLE or SimCTG


def simctg_loss(hidden: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """SimCTG's token-level contrastive loss: for every pair of distinct positions i, j of a
    sequence, max(0, margin - (s(h_i, h_i) - s(h_i, h_j))) with s the cosine, averaged over
    the real (non-pad) pairs."""
    h = F.normalize(hidden, dim=-1)
    sim = h @ h.transpose(1, 2)  # (B, T, T)
    gold = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    loss = F.relu(margin - (gold - sim))
    pair_mask = mask.unsqueeze(1) * mask.unsqueeze(2)
    pair_mask = pair_mask * (1 - torch.eye(sim.shape[1], device=sim.device)).unsqueeze(0)
    return (loss * pair_mask).sum() / pair_mask.sum().clamp(min=1)


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
    sched = _warmup_cosine(opt, cfg.lm_steps)
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


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05):
    warmup = max(1, int(steps * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )


# -----------------------------------------------------------------------------
# CLIP: config, training images, texts, multi-positive targets


def clip_config(cfg: TrainConfig) -> dict:
    """The ``open_clip_config.json`` of the toy CLIP."""
    return {
        "model_cfg": {
            "embed_dim": cfg.clip_embed_dim,
            "vision_cfg": {"image_size": cfg.clip_image_size, "layers": [1, 1, 1, 1], "width": cfg.clip_vision_width,
                           "head_width": 32},
            "text_cfg": {"context_length": cfg.clip_context, "vocab_size": 49408, "width": cfg.clip_text_width,
                         "heads": cfg.clip_text_heads, "layers": cfg.clip_text_layers},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def _render_chunk(args: tuple[list[int], int]) -> tuple[np.ndarray, list]:
    """Render scenes of seeds (and each one's perturbed twin) already resized for CLIP."""
    seeds, image_size = args
    from open_clip.transform import image_transform

    resize = image_transform(image_size, is_train=False).transforms[:2]  # Resize, CenterCrop: as at inference
    images, objects = [], []
    for seed in seeds:
        rng = random.Random(seed)
        objs = shapes.sample_objects(rng)
        twin = shapes.perturb(objs, rng)
        for o in (objs, twin):
            placed = shapes.place(o, rng)
            background = rng.choices(list(shapes.BACKGROUNDS), weights=(3, 1, 1))[0]
            texture = rng.choices(("none", "grid", "dots", "noise"), weights=(7, 1, 1, 1))[0]
            img = shapes.render(placed, background, rng, texture=texture)
            for t in resize:
                img = t(img)
            images.append(np.asarray(img, dtype=np.uint8))
            objects.append(o)
    return np.stack(images), objects


def render_pool(cfg: TrainConfig) -> tuple[torch.Tensor, list[list[shapes.ShapeObject]]]:
    """``clip_pool`` training images (uint8, N x H x W x 3) and their objects, in twin pairs."""
    seeds = list(range(100_000, 100_000 + cfg.clip_pool // 2))
    chunks = [(seeds[i : i + 250], cfg.clip_image_size) for i in range(0, len(seeds), 250)]
    images, objects = [], []
    workers = max(1, min(cfg.threads, len(chunks)))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for ims, objs in tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc="render CLIP images"):
            images.append(ims)
            objects += objs
    return torch.from_numpy(np.concatenate(images)), objects


def attribute_array(objects: list[list[shapes.ShapeObject]]) -> tuple[np.ndarray, np.ndarray]:
    """(S, 3, 4) int array of (colour, shape, size, position) indices (-1: no object) and (S,) counts."""
    A = np.full((len(objects), 3, 4), -1, dtype=np.int64)
    for i, objs in enumerate(objects):
        for j, o in enumerate(objs):
            A[i, j] = (list(shapes.COLOURS).index(o.colour), shapes.SHAPES.index(o.shape),
                       shapes.SIZES.index(o.size), shapes.POSITIONS.index(o.position))
    return A, np.array([len(o) for o in objects])


_REL = {r: np.array([[shapes.relation_holds(r, a, b) for b in shapes.POSITIONS] for a in shapes.POSITIONS])
        for r in shapes.RELATIONS}


def query_fits(q: shapes.Query, A: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Vectorised :meth:`shapes.Query.fits` over many scenes: (S,) bool."""
    import itertools

    out = np.zeros(len(n), dtype=bool)
    masks = np.array(q.masks, dtype=np.int64)[None]  # (1, k, 4)
    for nn in range(q.meta.n_min, q.meta.n_max + 1):
        idx = np.nonzero(n == nn)[0]
        if len(idx) == 0 or q.meta.k > nn:
            continue
        sub, ok = A[idx], np.zeros(len(idx), dtype=bool)
        for perm in itertools.permutations(range(nn), q.meta.k):
            a = sub[:, list(perm)]
            good = ((masks >> a) & 1).astype(bool).all(axis=(1, 2))
            if q.meta.relation is not None:
                good &= _REL[q.meta.relation][a[:, 0, 3], a[:, 1, 3]]
            ok |= good
        out[idx] = ok
    return out


def consistency_matrix(texts: list[tuple[str, str]], A: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(S, T) bool: could text t (kind "caption", "story" or "junk") be about scene s?"""
    cache: dict[shapes.Query, np.ndarray] = {}

    def fits(q):
        if q not in cache:
            cache[q] = query_fits(q, A, n)
        return cache[q]

    def any_fits(queries):
        out = np.zeros(len(n), dtype=bool)
        for q in queries:
            out |= fits(q)
        return out

    cols = []
    for text, kind in texts:
        if kind == "caption":
            col = any_fits(shapes.parse_caption(text))
        elif kind == "story":
            readings = shapes.parse_story(text)
            col = np.ones(len(n), dtype=bool) if readings else np.zeros(len(n), dtype=bool)
            for qs in readings:
                col &= any_fits(qs)
        else:
            col = np.zeros(len(n), dtype=bool)
        cols.append(col)
    return np.stack(cols, axis=1)


def counterfactuals(text: str, rng: random.Random) -> list[str]:
    """The text with one of its shape words replaced by each other shape (or, if it names no
    shape, one colour word by two other colours): hard negatives that differ in one word.
    They may well fit other scenes of the batch; the consistency matrix says which."""
    words = text.split()
    for vocab, n in ((shapes.SHAPES, 3), (tuple(shapes.COLOURS), 2)):
        spots = [i for i, w in enumerate(words) if w.rstrip(".,") in vocab]
        if spots:
            i = rng.choice(spots)
            word = words[i].rstrip(".,")
            tail = words[i][len(word):]
            others = rng.sample([v for v in vocab if v != word], n)
            return [shapes.to_text(words[:i] + [o + tail] + words[i + 1:]).replace(" ,", ",") for o in others]
    return []


def junk_continuation(text: str, rng: random.Random, vocab: list[str]) -> str | None:
    """``text`` plus a word no caption or story template puts there: the kind of candidate
    MAGIC meets among the LM's top k, which CLIP must score low for every image."""
    for _ in range(20):
        cut = f"{text} {rng.choice(vocab)}".strip()
        if not shapes.parse_caption(cut) and not shapes.parse_story(cut):
            return cut
    return None


def sample_texts(objects: list[list[shapes.ShapeObject]], rng: random.Random, vocab: list[str],
                 per_scene: int = 1) -> list[tuple[str, str]]:
    """For each scene ``per_scene`` texts (a whole caption, a caption prefix or a story
    prefix); for the first one also its :func:`counterfactuals` and a
    :func:`junk_continuation` of its beginning."""
    texts = []
    for objs in objects:
        for j in range(per_scene):
            r = rng.random()
            if r < 0.35:
                text, kind = shapes.sample_caption(objs, rng), "caption"
            elif r < 0.7:
                words = shapes.sample_caption(objs, rng).split()
                text, kind = " ".join(words[: rng.randint(1, len(words) - 1)]), "caption"
            else:
                words = shapes.make_story(objs, rng)[1].split()
                text, kind = " ".join(words[: rng.randint(1, min(len(words), 40))]), "story"
            texts.append((text, kind))
            if j == 0:
                texts += [(c, kind) for c in counterfactuals(text, rng)]
                words = text.split()
                junk = junk_continuation(" ".join(words[: rng.randint(0, len(words) - 1)]), rng, vocab)
                if junk:
                    texts.append((junk, "junk"))
    return texts


def encode_texts_trimmed(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip text features of ids trimmed to their longest text (exact: the text tower is
    causal and pools the end-of-text token), in two length buckets to waste less on padding."""
    lengths = ids.argmax(dim=-1) + 1
    order = lengths.argsort()
    out = torch.empty(ids.shape[0], model.text_projection.shape[1])
    for part in order.chunk(2):
        if len(part) == 0:
            continue
        L = int(lengths[part].max())
        sub = ids[part, :L]
        x = model.token_embedding(sub) + model.positional_embedding[:L]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
        x = x[torch.arange(len(part)), sub.argmax(dim=-1)] @ model.text_projection
        out = out.index_put((part,), x)
    return out


def multi_positive_loss(logits: torch.Tensor, target: torch.Tensor, idf: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: cross-entropy against the target rows
    (image -> texts) and columns (text -> images), each normalised to sum to one. With
    ``idf`` an image's positive texts weigh 1 / (number of images in the batch they fit), so
    that "a red circle." counts more than "a" (which fits every image). Texts with no
    positive (junk) only act as negatives."""
    t = target.float()
    w = t / t.sum(0, keepdim=True).clamp(min=1) if idf else t
    i2t = -(w / w.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    has = t.sum(0) > 0
    tc = t[:, has]
    t2i = -(tc / tc.sum(0, keepdim=True) * F.log_softmax(logits[:, has], dim=0)).sum(0).mean()
    return (i2t + t2i) / 2


def normalise_images(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W, as open_clip's ToTensor + Normalize."""
    x = images_u8.permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, objects) -> dict[str, float]:
    """On single-object scenes: share where "a <colour> <shape>." is CLIP's best of the 24."""
    labels = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    with torch.no_grad():
        fi = F.normalize(model.encode_image(images), dim=-1)
        ft = F.normalize(encode_texts_trimmed(model, tokenizer([shapes.to_text(["a", c, s, "."])
                                                                for c, s in labels])), dim=-1)
    pred = [labels[i] for i in (fi @ ft.T).argmax(1).tolist()]
    truth = [(o[0].colour, o[0].shape) for o in objects]
    return {
        "colour+shape": float(np.mean([p == t for p, t in zip(pred, truth)])),
        "colour": float(np.mean([p[0] == t[0] for p, t in zip(pred, truth)])),
        "shape": float(np.mean([p[1] == t[1] for p, t in zip(pred, truth)])),
    }


def train_clip(cfg: TrainConfig, out_dir: Path, vocab: list[str]):
    """Train the toy CLIP and save it to ``out_dir`` (open_clip local-dir format)."""
    import open_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    config = clip_config(cfg)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    set_seed(cfg.seed)
    model = open_clip.create_model(f"local-dir:{out_dir.resolve()}")  # built by open_clip's own factory
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir.resolve()}")
    mean, std = config["preprocess_cfg"]["mean"], config["preprocess_cfg"]["std"]

    pool_u8, pool_objects = render_pool(cfg)
    A, n = attribute_array(pool_objects)
    val_u8, val_objects = _val_single_objects(cfg)
    val_images = normalise_images(val_u8, mean, std)

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        text = not name.startswith("visual.") and name != "logit_scale"
        groups.setdefault((text, p.ndim >= 2 and "embedding" not in name), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": 0.05 if decay else 0.0,
                              "lr": cfg.clip_lr * (cfg.clip_text_lr_mult if text else 1.0)}
                             for (text, decay), ps in groups.items()], lr=cfg.clip_lr)
    rng = random.Random(cfg.seed)
    n_pairs = len(pool_objects) // 2
    singles = [i for i, o in enumerate(pool_objects) if len(o) == 1]
    total = cfg.clip_first_steps + cfg.clip_steps
    sched = _warmup_cosine(opt, total)
    model.train()
    bar = tqdm(range(total), desc="train CLIP", mininterval=2)
    for step in bar:
        if step < cfg.clip_first_steps:
            # words before sentences: one object, one whole caption and the same caption
            # with another shape -- the strongest signal for shape, which CLIP learns last
            idx = rng.sample(singles, cfg.clip_first_batch)
            texts = []
            for i in idx:
                caption = shapes.sample_caption(pool_objects[i], rng)
                texts += [(caption, "caption")] + [(c, "caption") for c in counterfactuals(caption, rng)]
        else:
            pairs = rng.sample(range(n_pairs), cfg.clip_batch // 2)
            idx = [i for p in pairs for i in (2 * p, 2 * p + 1)]
            texts = sample_texts([pool_objects[i] for i in idx], rng, vocab, per_scene=cfg.clip_texts_per_image)
        target = torch.from_numpy(consistency_matrix(texts, A[idx], n[idx]))
        images = normalise_images(pool_u8[idx], mean, std)
        fi = F.normalize(model.encode_image(images), dim=-1)
        ft = F.normalize(encode_texts_trimmed(model, tokenizer([t for t, _ in texts])), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.T
        loss = multi_positive_loss(logits, target, idf=cfg.clip_idf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if (step + 1) % max(1, total // 6) == 0 or step + 1 == total:
            model.eval()
            acc = zero_shot_accuracy(model, tokenizer, val_images, val_objects)
            model.train()
            tqdm.write(f"  step {step + 1}: zero-shot on single objects " +
                       ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    model.eval()
    save_clip(model, out_dir)
    return model, acc


def _val_single_objects(cfg: TrainConfig, count: int = 200):
    """Rendered single-object validation scenes (tuning seeds) for the zero-shot check."""
    from open_clip.transform import image_transform

    resize = image_transform(cfg.clip_image_size, is_train=False).transforms[:2]
    images, objects = [], []
    for i in range(count):
        scene = shapes.make_scene(TUNE_SEED + 100_000 + i, n_objects=1, n_captions=1)
        img = scene.image
        for t in resize:
            img = t(img)
        images.append(np.asarray(img, dtype=np.uint8))
        objects.append(scene.objects)
    return torch.from_numpy(np.stack(images)), objects


def save_clip(model, out_dir: Path) -> None:
    """Weights as ``open_clip_model.safetensors``, floating point tensors in half precision
    (the 49,408-token embedding table dominates; open_clip casts them back on load)."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() and k != "logit_scale" else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))


# -----------------------------------------------------------------------------
# tuning the decoding settings with the library's own decoders


def fluent_caption(text: str, n_objects: int) -> bool:
    """A sentence the caption templates could produce; for one object also no repeated
    bigram (with several, the templates themselves repeat "a small" or "and a")."""
    return shapes.is_template_caption(text) and (n_objects > 1 or not shapes.has_repeated_bigram(text))


def story_grounded(text: str, objects: list[shapes.ShapeObject]) -> bool:
    """A story names some object of the scene right and names nothing that is not there."""
    named = shapes.named_pairs(text)
    truth = {(o.colour, o.shape) for o in objects}
    return bool(named) and set(named) <= truth


def tune_defaults(out: Path, cfg: TrainConfig) -> dict:
    """Grid-search k, alpha, beta of MAGIC on validation scenes (tuning seeds, not those of
    the results table). Captions: maximise single-object grounding + half the multi-object
    all-right share among settings with at least 90% fluent captions (:func:`fluent_caption`).
    Stories (prompt :data:`STORY_PROMPT`): maximise the share naming only shapes that are there
    (:func:`story_grounded`) + the share the story grammar could have written about the scene."""
    from .. import ImageTextMatcher, LanguageModel, magic_search
    from ..models import STORY_PROMPT_FORMAT

    lm = LanguageModel.from_pretrained(str(out / "lm"), sos_token=SOS, pad_token=PAD)
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{(out / 'clip').resolve()}")
    n = cfg.tune_scenes
    singles = [shapes.make_scene(TUNE_SEED + i, n_objects=1, n_captions=1) for i in range(n)]
    multis = [shapes.make_scene(TUNE_SEED + 50_000 + i, n_objects=2 + i % 2, n_captions=1) for i in range(n)]
    results = []
    grid = [(k, a, b) for k in (8, 10, 12) for a in (0.1, 0.2) for b in (0.25, 0.5, 1.0)]
    for k, a, b in tqdm(grid, desc="tune MAGIC (captions)"):
        gens = magic_search(lm, clip, [s.image for s in singles + multis], k=k, alpha=a, beta=b,
                            max_new_tokens=32, record=False)
        texts = [g.text for g in gens]
        single = np.mean([shapes.grounding(t, s.objects).any_right for t, s in zip(texts, singles)])
        multi = np.mean([shapes.grounding(t, s.objects).all_right for t, s in zip(texts[n:], multis)])
        fluent = np.mean([fluent_caption(t, 1) for t in texts[:n]] + [fluent_caption(t, 2) for t in texts[n:]])
        results.append(dict(k=k, alpha=a, beta=b, single=float(single), multi_all=float(multi), fluent=float(fluent)))
    ok = [r for r in results if r["fluent"] >= 0.9] or results
    best = max(ok, key=lambda r: (r["single"] + 0.5 * r["multi_all"], -r["k"]))
    tqdm.write(f"  best caption settings: {best}")

    story_lm = LanguageModel.from_pretrained(str(out / "lm"), pad_token=PAD, prompt_format=STORY_PROMPT_FORMAT,
                                             max_sentences=5)
    story_scenes = [shapes.make_scene(TUNE_SEED + 80_000 + i, n_captions=1) for i in range(20)]
    story_results = []
    story_grid = [(k, a, b) for k in (5, 8, 12) for a in (0.1, 0.3) for b in (0.5, 1.0, 2.0)]
    for k, a, b in tqdm(story_grid, desc="tune MAGIC (stories)"):
        gens = magic_search(story_lm, clip, [s.image for s in story_scenes], k=k, alpha=a, beta=b,
                            prompt=STORY_PROMPT, max_new_tokens=64, record=False)
        grounded = np.mean([story_grounded(g.text, s.objects) for g, s in zip(gens, story_scenes)])
        consistent = np.mean([shapes.text_consistent(g.text, s.objects, "story") for g, s in zip(gens, story_scenes)])
        story_results.append(dict(k=k, alpha=a, beta=b, grounded=float(grounded), consistent=float(consistent)))
    best_story = max(story_results, key=lambda r: (r["grounded"] + r["consistent"], -r["k"]))
    tqdm.write(f"  best story settings: {best_story}")
    return {
        "k": best["k"], "alpha": best["alpha"], "beta": best["beta"], "max_new_tokens": 32,
        "story": {"k": best_story["k"], "alpha": best_story["alpha"], "beta": best_story["beta"],
                  "max_new_tokens": 64, "prompt": STORY_PROMPT},
        "tuning": {"captions": results, "stories": story_results},
    }


# -----------------------------------------------------------------------------
# the results table: which decoders name what is in the image?

DECODER_ROWS = ("greedy", "contrastive", "top-k", "nucleus", "MAGIC", "CLIP retrieval")


def load_toy(out: Path):
    """(caption LM, story LM, CLIP, defaults) of a trained toy folder, through the library's
    own loaders (the same path as any checkpoint)."""
    from .. import ImageTextMatcher, LanguageModel
    from ..models import STORY_PROMPT_FORMAT

    lm = LanguageModel.from_pretrained(str(out / "lm"), sos_token=SOS, pad_token=PAD)
    story_dir = out / "lm-story" if (out / "lm-story").is_dir() else out / "lm"
    story_lm = LanguageModel.from_pretrained(str(story_dir), pad_token=PAD, prompt_format=STORY_PROMPT_FORMAT,
                                             max_sentences=5)
    clip = ImageTextMatcher.from_pretrained(f"local-dir:{out.resolve() / 'clip'}")
    defaults = json.loads((out / "defaults.json").read_text())
    return lm, story_lm, clip, defaults


def held_out_scenes(n: int, multi: bool) -> list[shapes.Scene]:
    """Scenes from evaluation seeds, never used in training: single-object, or 2 and 3 objects alternately."""
    if multi:
        return [shapes.make_scene(EVAL_SEED + 100_000 + i, n_objects=2 + i % 2, n_captions=1) for i in range(n)]
    return [shapes.make_scene(EVAL_SEED + i, n_objects=1, n_captions=1) for i in range(n)]


def decode_all(lm, clip, defaults: dict, scenes: list[shapes.Scene], retrieval_pool: int = 20_000
               ) -> dict[str, list[str]]:
    """Every decoder's caption of every scene. The image-blind decoders use the paper's
    baselines' settings (top-k k=40, nucleus p=0.95, contrastive k and alpha of MAGIC);
    CLIP retrieval returns the training caption CLIP scores highest (the paper's baseline)."""
    from .. import contrastive_search, greedy_search, magic_search, nucleus_sampling, top_k_sampling

    k, alpha, beta, mnt = (defaults[x] for x in ("k", "alpha", "beta", "max_new_tokens"))
    n = len(scenes)
    out = {
        "greedy": [greedy_search(lm, max_new_tokens=mnt, record=False).text] * n,
        "contrastive": [contrastive_search(lm, k=k, alpha=alpha, max_new_tokens=mnt, record=False).text] * n,
        "top-k": [top_k_sampling(lm, k=40, seed=i, max_new_tokens=mnt, record=False).text for i in range(n)],
        "nucleus": [nucleus_sampling(lm, p=0.95, seed=i, max_new_tokens=mnt, record=False).text for i in range(n)],
    }
    gens = []
    for i in range(0, n, 50):
        gens += magic_search(lm, clip, [s.image for s in scenes[i : i + 50]], k=k, alpha=alpha, beta=beta,
                             max_new_tokens=mnt, record=False)
    out["MAGIC"] = [g.text for g in gens]
    pool = sorted(set(shapes.caption_corpus(range(retrieval_pool), per_scene=1)))
    with torch.no_grad():
        text_emb = torch.cat([clip.embed_texts(pool[i : i + 1000]) for i in range(0, len(pool), 1000)])
        image_emb = clip.embed_image([s.image for s in scenes]).reshape(n, -1)
    out["CLIP retrieval"] = [pool[j] for j in (image_emb @ text_emb.T).argmax(1).tolist()]
    return out


def score_captions(texts: list[str], scenes: list[shapes.Scene]) -> dict[str, float]:
    """Shares of captions naming an object right (any), all objects right (all), and
    fluent (:func:`fluent_caption`)."""
    g = [shapes.grounding(t, s.objects) for t, s in zip(texts, scenes)]
    return {
        "any": float(np.mean([x.any_right for x in g])),
        "all": float(np.mean([x.all_right for x in g])),
        "fluent": float(np.mean([fluent_caption(t, len(s.objects)) for t, s in zip(texts, scenes)])),
    }


def magic_milliseconds(lm, clip, defaults: dict, n: int = 20) -> float:
    """Mean wall time of one toy MAGIC caption (one image at a time, trace recorded), in ms."""
    from .. import magic_search

    scenes = held_out_scenes(n, multi=False)
    magic_search(lm, clip, scenes[0].image, **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    t = time.perf_counter()
    for s in scenes:
        magic_search(lm, clip, s.image, **{k: defaults[k] for k in ("k", "alpha", "beta", "max_new_tokens")})
    return 1000 * (time.perf_counter() - t) / n


def results_table(out: Path = Path("data/toy"), n: int = 200) -> tuple[str, dict]:
    """The ShapesWorld results table (markdown) on ``n`` held-out single-object and ``n``
    held-out multi-object scenes, and the numbers behind it."""
    lm, _, clip, defaults = load_toy(out)
    single, multi = held_out_scenes(n, multi=False), held_out_scenes(n, multi=True)
    texts_single = decode_all(lm, clip, defaults, single)
    texts_multi = decode_all(lm, clip, defaults, multi)
    rows = {}
    for name in DECODER_ROWS:
        a, b = score_captions(texts_single[name], single), score_captions(texts_multi[name], multi)
        rows[name] = {"single": a["any"], "single_exact": a["all"], "multi_any": b["any"], "multi_all": b["all"],
                      "fluent": (a["fluent"] + b["fluent"]) / 2, "fluent_single": a["fluent"]}
    lines = [
        f"Held-out scenes (seeds never used in training): {n} with one shape, {n} with two or three. "
        "A caption is right if it names the colour and the shape of an object in the image.",
        "",
        "| decoder | sees the image | 1 shape: right | 1 shape: right, nothing else | 2-3 shapes: one right "
        "| 2-3 shapes: all right | fluent |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        sees = "yes" if name in ("MAGIC", "CLIP retrieval") else "no"
        lines.append(f"| {name} | {sees} | {r['single']:.2f} | {r['single_exact']:.2f} | {r['multi_any']:.2f} | "
                     f"{r['multi_all']:.2f} | {r['fluent']:.2f} |")
    chance = 1 / (len(shapes.COLOURS) * len(shapes.SHAPES))
    lines += [
        "",
        f"Chance for one shape: 1/{len(shapes.COLOURS) * len(shapes.SHAPES)} = {chance:.2f}. \"Nothing else\": "
        "no other colour-and-shape named (no invented second shape). \"All right\": every shape named, "
        "nothing invented. Fluent: a sentence the caption templates could produce (for one shape also without "
        "a repeated bigram), over all captions. MAGIC: "
        f"k={defaults['k']}, alpha={defaults['alpha']}, beta={defaults['beta']}; contrastive: the same k and alpha; "
        "top-k: k=40; nucleus: p=0.95. CLIP retrieval: the best of the training captions by CLIP score.",
    ]
    examples = [(s, texts_single["MAGIC"][i]) for i, s in enumerate(single[:3])]
    examples += [(s, texts_multi["MAGIC"][i]) for i, s in enumerate(multi[:3])]
    lines += ["", "Examples (MAGIC):", ""]
    for s, t in examples:
        truth = ", ".join(f"{o.size} {o.colour} {o.shape} ({o.position})" for o in s.objects)
        lines.append(f"- seed {s.seed}: *{t}*  (image: {truth})")
    return "\n".join(lines) + "\n", {"rows": rows, "defaults": defaults, "n": n}


def story_examples(out: Path = Path("data/toy"), n: int = 4, image_dir: Path | None = None) -> str:
    """A few MAGIC stories of held-out scenes (title = the tuned prompt), as markdown; with
    ``image_dir`` the scene images are saved there and shown."""
    from .. import magic_search

    _, story_lm, clip, defaults = load_toy(out)
    st = defaults["story"]
    scenes = [shapes.make_scene(EVAL_SEED + 200_000 + i, n_captions=1) for i in range(n)]
    gens = magic_search(story_lm, clip, [s.image for s in scenes], prompt=st.get("prompt", STORY_PROMPT),
                        **{k: st[k] for k in ("k", "alpha", "beta", "max_new_tokens")}, record=False)
    lines = []
    for s, g in zip(scenes, gens):
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            s.image.save(image_dir / f"story_{s.seed}.png")
            lines.append(f"![scene {s.seed}]({image_dir.name}/story_{s.seed}.png)")
        truth = ", ".join(f"{o.size} {o.colour} {o.shape} ({o.position})" for o in s.objects)
        lines.append(f"**{st.get('prompt', STORY_PROMPT)}**: {g.text}  (image: {truth})\n")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def train_lms(out: Path, cfg: TrainConfig) -> float:
    """Build the tokenizer, train the SimCTG LM and its MLE twin, save both; seconds taken."""
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


def _lm_process(out: str, cfg: TrainConfig, queue) -> None:
    torch.set_num_threads(1)
    queue.put(train_lms(Path(out), cfg))


def train_all(out: Path, cfg: TrainConfig) -> dict:
    """Train everything into ``out``; returns a summary (sizes, timings, accuracies).
    With two or more threads the LMs train in a second process while CLIP trains (small
    models use one core each better than two cores in turn)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict = {"config": asdict(cfg)}
    captions, stories = lm_corpus(cfg)
    vocab = sorted({w for t in captions + [t + " " + s for t, s in stories] for w in shapes.words_of(t)})

    if cfg.threads >= 2:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        lm_proc = ctx.Process(target=_lm_process, args=(str(out), cfg, queue))
        lm_proc.start()
        torch.set_num_threads(cfg.threads - 1)
    else:
        torch.set_num_threads(cfg.threads)
        summary["lm_seconds"] = round(train_lms(out, cfg), 1)

    t1 = time.time()
    _, acc = train_clip(cfg, out / "clip", vocab)
    summary["clip_seconds"] = round(time.time() - t1, 1)
    summary["clip_zero_shot"] = acc
    if cfg.threads >= 2:
        lm_proc.join()
        if lm_proc.exitcode != 0:
            raise RuntimeError(f"training the language models failed (exit code {lm_proc.exitcode})")
        summary["lm_seconds"] = round(queue.get(timeout=60), 1)
        torch.set_num_threads(cfg.threads)

    if cfg.tune_scenes:
        t2 = time.time()
        defaults = tune_defaults(out, cfg)
        summary["tune_seconds"] = round(time.time() - t2, 1)
    else:
        defaults = {"k": 8, "alpha": 0.1, "beta": 1.0, "max_new_tokens": 32,
                    "story": {"k": 8, "alpha": 0.1, "beta": 1.0, "max_new_tokens": 64, "prompt": STORY_PROMPT}}
    tuning = defaults.pop("tuning", None)
    (out / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    summary["defaults"] = defaults
    summary["total_seconds"] = round(time.time() - t0, 1)
    summary["megabytes"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6, 2)
    (out / "training_summary.json").write_text(json.dumps({**summary, "tuning": tuning}, indent=2) + "\n")
    return summary


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/toy", help="the toy folder (default data/toy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a miniature run (tests): under a minute, poor models")
    p.add_argument("--report", action="store_true",
                   help="do not train: print the results table of the models in --out (markdown)")
    p.add_argument("--scenes", type=int, default=200, help="--report: held-out scenes of each kind (default 200)")
    p.add_argument("--stories-dir", type=Path, default=None,
                   help="--report: also save the story scenes' images in this folder and link them")
    p.add_argument("--tune-only", action="store_true",
                   help="do not train: redo the tuning of defaults.json for the models in --out")


def run(args: argparse.Namespace) -> int:
    """Train (default), ``--report`` or ``--tune-only``, as parsed by :func:`_add_arguments`."""
    out = Path(args.out)
    if args.report:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the report is markdown meant for pasting: no loading bars in it
        torch.set_num_threads(args.threads)
        table, _ = results_table(out, args.scenes)
        print(table)
        lm, _, clip, defaults = load_toy(out)
        print(f"A toy MAGIC caption takes {magic_milliseconds(lm, clip, defaults):.1f} ms on this machine "
              f"({args.threads} threads, one image at a time).\n")
        print(story_examples(out, image_dir=args.stories_dir))
        return 0
    if args.tune_only:
        torch.set_num_threads(args.threads)
        defaults = tune_defaults(out, replace(TrainConfig(), seed=args.seed, threads=args.threads))
        defaults.pop("tuning")
        (out / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
        print(json.dumps(defaults, indent=2))
        return 0
    cfg = replace(QUICK if args.quick else TrainConfig(), seed=args.seed, threads=args.threads)
    summary = train_all(out, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


def add_toy_command(subparsers) -> None:
    """``magic-edu toy [--report | --tune-only | --quick] [--out data/toy]``."""
    p = subparsers.add_parser(
        "toy", help="train the offline toy world's models, or print its results table (--report)",
        description="Train ShapesWorld's LM (SimCTG + MLE twin) and CLIP from scratch into --out, "
                    "or with --report print the results table of the models there.")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train ShapesWorld's LM (SimCTG + MLE twin) and CLIP from scratch.")
    _add_arguments(p)
    raise SystemExit(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
