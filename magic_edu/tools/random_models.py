"""Randomly initialised models of any size, built offline in a second.

The tests use tiny ones as stand-ins for real checkpoints (same classes, same code paths);
the benchmarks use ones of GPT-2-small and CLIP ViT-B/32 architecture, whose speed does not
depend on their weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..models import ImageTextMatcher, LanguageModel

EOS = "<|endoftext|>"

_CORPUS = """a man riding a horse on a beach . a woman holding an umbrella in the rain .
two dogs playing with a red ball in the park . a plate of food with broccoli and rice .
a group of people standing around a kitchen . a cat sleeping on a laptop keyboard .
a train travelling down the tracks next to a station . a red circle on the left .
a small blue square and a large green triangle . there is a yellow star in the middle .
the boy kicked the ball . she went to the store to buy some bread . it was a sunny day ,
and the children were happy . he could not believe what he saw ! why did they leave ?"""


def byte_level_tokenizer(corpus: str = _CORPUS, vocab_size: int = 400, extra_words: int = 0) -> Any:
    """A GPT-2-style byte-level BPE tokenizer trained on ``corpus``, with ``<|endoftext|>``
    as BOS, EOS and UNK (as GPT-2's). ``extra_words`` adds that many whole-word tokens
    ("w0", "w1", ...) to reach a GPT-2-sized vocabulary without training on a big corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.split("\n"), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if extra_words:
        wrapped.add_tokens([f" w{i}" for i in range(extra_words)])
    return wrapped


def random_language_model(
    n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 128, seed: int = 0,
    sos_token: str | None = "<-start_of_text->", tokenizer: Any = None, initializer_range: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> LanguageModel:
    """A GPT2LMHeadModel with random weights and a small byte-level tokenizer.

    ``sos_token`` is added to the tokenizer (as the paper's code adds ``<-start_of_text->``).
    A large ``initializer_range`` makes the next-token distributions peaked, like a trained LM's.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or byte_level_tokenizer()
    if sos_token is not None and sos_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([sos_token])
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(dtype)
    return LanguageModel(model, tokenizer, sos_token=sos_token, name=f"random-gpt2-{n_layer}x{n_embd}")


def clip_config(
    embed_dim: int = 32, image_size: int = 32, patch_size: int = 8, vision_width: int = 32, vision_layers: int = 1,
    text_width: int = 32, text_layers: int = 1, heads: int = 2, context_length: int = 77,
) -> dict[str, Any]:
    """An open_clip model config (ViT image tower, causal text tower, open_clip's tokenizer)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "patch_size": patch_size, "head_width": vision_width // heads},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": heads, "layers": text_layers},
    }


def write_open_clip_config(folder: str | Path, config: dict[str, Any]) -> Path:
    """Write ``config`` (``model_cfg`` and ``preprocess_cfg``) as the ``open_clip_config.json`` of a
    ``local-dir:`` folder, creating the folder; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder


def save_open_clip(model: torch.nn.Module, folder: str | Path, config: dict[str, Any] | None = None,
                   half: bool = False) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder: its weights as
    ``open_clip_model.safetensors`` and, given ``config``, ``open_clip_config.json``. With
    ``half`` floating point tensors but ``logit_scale`` are stored in half precision (open_clip
    casts them back on load). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        write_open_clip_config(folder, config)
    state = {k: (v.half() if half and v.is_floating_point() and k != "logit_scale" else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def save_random_clip(folder: str | Path, seed: int = 0, **config: Any) -> Path:
    """Write a random open_clip model as a ``local-dir:`` folder (open_clip_config.json +
    open_clip_model.safetensors) and return the folder."""
    import open_clip

    cfg = clip_config(**config)
    torch.manual_seed(seed)
    return save_open_clip(open_clip.CLIP(**cfg), folder, {"model_cfg": cfg, "preprocess_cfg": {}})


def random_clip(folder: str | Path, seed: int = 0, **config: Any) -> ImageTextMatcher:
    """A random open_clip model, saved to ``folder`` and loaded back through ``local-dir:``."""
    path = save_random_clip(folder, seed=seed, **config)
    return ImageTextMatcher.from_pretrained(f"local-dir:{path.resolve()}")


# -- paper-sized architectures, for benchmarks ---------------------------------------------
def word_tokenizer(n_tokens: int = 50257) -> Any:
    """A word-level tokenizer of ``n_tokens`` English words and word pieces, taken from
    CLIP's own BPE vocabulary (so the texts CLIP scores are as long as real ones), then as
    many of them capitalised as it takes (GPT-2's vocabulary has both), with ``<|endoftext|>``
    as BOS, EOS and UNK."""
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    clip_words = []
    for piece in open_clip.get_tokenizer("ViT-B-32-quickgelu").encoder:
        word = piece[:-4] if piece.endswith("</w>") else piece
        if word.isascii() and word.isalpha():  # (the vocabulary's other "letters" are byte codes)
            clip_words.append(word)
    words: dict[str, int] = {EOS: 0}
    for word in clip_words + [w.capitalize() for w in clip_words]:
        if len(words) == n_tokens:
            break
        words.setdefault(word, len(words))
    tok = Tokenizer(models.WordLevel(words, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def gpt2_small(seed: int = 0, sos_token: str | None = "<-start_of_text->") -> LanguageModel:
    """GPT-2 small's architecture (12 layers, width 768, 124 M parameters) with random weights."""
    return random_language_model(n_layer=12, n_embd=768, n_head=12, n_positions=1024, seed=seed,
                                 sos_token=sos_token, tokenizer=word_tokenizer(50256), initializer_range=0.02)


def clip_vit_b32(seed: int = 0) -> ImageTextMatcher:
    """CLIP ViT-B/32's architecture (open_clip ``ViT-B-32-quickgelu``) with random weights."""
    import open_clip

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    return ImageTextMatcher(model, preprocess, open_clip.get_tokenizer("ViT-B-32-quickgelu"),
                            name="ViT-B-32-quickgelu/random")
