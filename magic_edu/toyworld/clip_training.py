"""The toy CLIP: an open_clip CLIP (ModifiedResNet image tower at 64 px, a 2-layer text tower,
open_clip's own tokenizer) trained contrastively from scratch, saved as a ``local-dir:`` folder.

The loss is symmetric InfoNCE with several positives per image (the targets of
:mod:`magic_edu.toyworld.clip_data`). Two phases:

1. single-object scenes only, each with one whole caption and its counterfactuals (the
   same caption with another shape word). Shape is what CLIP learns last; without this
   phase it stayed at chance for hundreds of steps while colour was learned at once;
2. scenes in twin pairs that differ in one attribute (hard negatives), each with whole
   captions, caption prefixes and story prefixes, their counterfactuals, and a junk continuation.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..fast.clip_prefix import encode_text_trimmed
from ..tools.random_models import save_open_clip, write_open_clip_config
from . import shapes
from .clip_data import (
    attribute_array,
    consistency_matrix,
    counterfactuals,
    normalise_images,
    render_pool,
    sample_texts,
    val_single_objects,
)
from .config import TrainConfig, set_seed, warmup_cosine


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


def encode_texts_trimmed(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip text features of ids (at full context length) in two length buckets, each
    trimmed to its longest text (exact: the text tower is causal and pools the end-of-text
    token), to waste less on padding. With gradients."""
    lengths = ids.argmax(dim=-1) + 1
    order = lengths.argsort()
    out = torch.empty(ids.shape[0], model.text_projection.shape[1])
    for part in order.chunk(2):
        L = int(lengths[part].max())
        out = out.index_put((part,), encode_text_trimmed(model, ids[part, :L]))
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
        "colour+shape": float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])),
        "colour": float(np.mean([p[0] == t[0] for p, t in zip(pred, truth, strict=True)])),
        "shape": float(np.mean([p[1] == t[1] for p, t in zip(pred, truth, strict=True)])),
    }


def train_clip(cfg: TrainConfig, out_dir: Path, vocab: list[str]):
    """Train the toy CLIP and save it to ``out_dir`` (open_clip local-dir format), weights in
    half precision (the 49,408-token embedding table dominates; open_clip casts them back on
    load). Returns the model and its last zero-shot accuracies."""
    import open_clip

    config = clip_config(cfg)
    write_open_clip_config(out_dir, config)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    set_seed(cfg.seed)
    model = open_clip.create_model(f"local-dir:{out_dir.resolve()}")  # built by open_clip's own factory
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir.resolve()}")
    mean, std = config["preprocess_cfg"]["mean"], config["preprocess_cfg"]["std"]

    pool_u8, pool_objects = render_pool(cfg)
    A, n = attribute_array(pool_objects)
    val_u8, val_objects = val_single_objects(cfg)
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
    sched = warmup_cosine(opt, total)
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
    save_open_clip(model, out_dir, half=True)
    return model, acc
