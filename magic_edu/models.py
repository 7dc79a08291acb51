"""Thin wrappers around the two models MAGIC plugs together.

* :class:`LanguageModel`: a transformers causal LM of the GPT-2 family, its tokenizer,
  its start token and the way a prompt becomes the prefix ids it was trained on.
* :class:`ImageTextMatcher`: an open_clip model with its preprocessing and tokenizer.

Decoding code only talks to these two classes, never to one checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .costs import Cost
from .errors import MagicEduError
from .fast.clip_prefix import PrefixMemo, SharedPrefixEncoder
from .fast.clip_tokens import ClipTokenizer
from .inputs import ImageLike, load_image

DEFAULT_PROMPT_FORMAT = "{sos}{prompt}"
STORY_PROMPT_FORMAT = "{prompt} {eos}"
# the LM's keys and values: one (keys, values) pair per layer, each (B, heads, T, d_head)
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]
class LanguageModel:
    """A causal LM plus what MAGIC needs to know about it.

    * ``sos_token``: the start token put before every caption (``<-start_of_text->`` for the
      paper's caption LMs); ``None`` means the tokenizer's BOS.
    * ``prompt_format``: how a prompt becomes the prefix, with ``{sos}``, ``{eos}`` and
      ``{prompt}`` placeholders. Default ``"{sos}{prompt}"``; the paper's story LM uses
      ``"{prompt} {eos}"`` (a title, a space, EOS, and no start token).
    * ``max_sentences``: if set, :meth:`output_text` keeps at most that many
      '.'-separated sentences (the paper's story parser keeps five).
    * ``defaults``: decoding settings the decoders use when the caller gives none (k, alpha,
      beta, max_new_tokens; :func:`~magic_edu.presets.load_models` sets the preset's);
      ``max_length``: a length budget counting the prompt (the paper's story setting), used
      for ``max_new_tokens`` when neither the caller nor ``defaults`` give it.
    * ``cost``: the running count of the work done (:mod:`magic_edu.costs`); every forward adds
      its rows and tokens to it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        sos_token: str | None = None,
        prompt_format: str = DEFAULT_PROMPT_FORMAT,
        max_sentences: int | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.prompt_format = prompt_format
        self.max_sentences = max_sentences
        self.defaults: dict[str, Any] = {}
        self.max_length: int | None = None

        self.sos_token = sos_token if sos_token is not None else tokenizer.bos_token
        self.sos_token_id = self._token_id(self.sos_token, "sos_token") if self.sos_token is not None else None
        if tokenizer.eos_token is None:
            raise MagicEduError("tokenizer has no eos_token; MAGIC needs one to know where a caption ends")
        self.eos_token = tokenizer.eos_token
        self.eos_token_id = self._token_id(self.eos_token, "eos_token")
        if "{sos}" in prompt_format and self.sos_token is None:
            raise MagicEduError("prompt_format uses {sos} but the tokenizer has no BOS; pass sos_token=")

        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        cfg = model.config
        self.context_length = int(
            getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        )
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        self._only_itself: dict[tuple, torch.Tensor] = {}  # forward_candidates' masks, by (k, dtype, device)
        self._token_text_cache: dict[int, str] = {}
        self.cost = Cost()  # running: forwards add to it, a Stepper reads it around each step

    def _token_id(self, token: str, name: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        unk = self.tokenizer.unk_token_id
        if not ids or ids[0] is None or (ids[0] == unk and token != self.tokenizer.unk_token):
            raise MagicEduError(
                f"{name} {token!r} is not in the tokenizer's vocabulary; "
                "LanguageModel.from_pretrained(..., sos_token=...) adds it"
            )
        return int(ids[0])

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        sos_token: str | None = None,
        pad_token: str | None = None,
        prompt_format: str = DEFAULT_PROMPT_FORMAT,
        max_sentences: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **hub_kwargs: Any,
    ) -> LanguageModel:
        """Load a causal LM and its tokenizer (hub id or local folder).

        ``sos_token`` / ``pad_token`` are added with ``tokenizer.add_tokens`` when the
        checkpoint lacks them (as the paper's code does), and the embeddings resized.
        Never runs remote code; weights load as safetensors (or weights-only torch.load).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=False, dtype=dtype or torch.float32, **hub_kwargs
        )
        added = False
        for token, attr in ((sos_token, None), (pad_token, "pad_token")):
            if token is None:
                continue
            if token not in tokenizer.get_vocab():
                tokenizer.add_tokens([token])
                added = True
            if attr:
                tokenizer.pad_token = token
        if added:
            model.resize_token_embeddings(len(tokenizer))
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, sos_token=sos_token, prompt_format=prompt_format,
                   max_sentences=max_sentences, name=name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- text <-> ids ---------------------------------------------------------------
    def prefix_ids(self, prompt: str | None = None) -> list[int]:
        """The ids before the first generated token: ``prompt_format`` filled in and tokenized."""
        if prompt is not None and not isinstance(prompt, str):
            raise MagicEduError(f"prompt must be a string or None; got {type(prompt).__name__}")
        text = self.prompt_format.format(sos=self.sos_token or "", eos=self.eos_token, prompt=prompt or "")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise MagicEduError("prompt: the prefix is empty; give a prompt or use a model with a start token")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's plain ``decode`` (special tokens kept, no clean-up of spaces)."""
        return self.decode_batch([ids])[0]

    def token_text(self, token_id: int) -> str:
        """The text of one token as it would appear in a decoded string."""
        return self.token_texts([token_id])[0]

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """The texts of several tokens (remembered, so a trace costs little)."""
        missing = [i for i in dict.fromkeys(int(t) for t in token_ids) if i not in self._token_text_cache]
        if missing:
            texts = self.decode_batch([[i] for i in missing])
            self._token_text_cache.update(zip(missing, texts))
        return [self._token_text_cache[int(t)] for t in token_ids]

    def output_text(self, generated_ids: Sequence[int]) -> str:
        """The reference's output parser: drop start tokens, cut at the first EOS,
        decode, collapse whitespace (and keep at most ``max_sentences`` sentences)."""
        ids = [int(i) for i in generated_ids]
        if self.eos_token_id in ids:  # cut first: GPT-2's start token is its EOS
            ids = ids[: ids.index(self.eos_token_id)]
        ids = [i for i in ids if i != self.sos_token_id]
        text = " ".join(self.decode(ids).split())
        if self.max_sentences is not None:
            text = keep_sentences(text, self.max_sentences)
        return text

    def clip_text(self, ids: Sequence[int]) -> str:
        """The text CLIP sees for ``ids``: ``decode``, cut at the EOS string."""
        return self.decode(ids).split(self.eos_token, 1)[0]

    def clip_texts(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """:meth:`clip_text` of many id lists in one tokenizer call."""
        return [t.split(self.eos_token, 1)[0] for t in self.decode_batch(batch)]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """``decode`` of many id lists in one tokenizer call (nothing cut)."""
        batch = [list(ids) for ids in batch]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: its Rust decoder directly, as ``decode`` does
            return backend.decode_batch(batch, skip_special_tokens=False)
        return self.tokenizer.batch_decode(batch, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- the forward ------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KeysValues | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, KeysValues]:
        """One forward of ``input_ids`` (B, S) after the keys and values ``cache``: (logits,
        last-layer hidden states, keys and values of every position so far), all S positions.

        The hidden states are transformers' ``hidden_states[-1]`` (after the final layer norm),
        the ``h`` of the paper's degeneration penalty. ``cache`` is not modified.
        """
        past = cache_length(cache)
        # nothing is padded; saying so keeps transformers from guessing
        mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        return self._forward(input_ids, cache, mask)

    @torch.no_grad()
    def forward_candidates(self, candidates: torch.Tensor, cache: KeysValues) -> tuple[torch.Tensor, KeysValues]:
        """The k candidate next tokens of every row (B, k), side by side in one forward.

        Candidate i sits at the next position (T = the cache's length) and attends to the T
        cached positions and to itself only, never to the other candidates: its hidden state is
        exactly that of the one-token forward of [cache, i], without copying the cache k times.
        Returns (last-layer hidden states (B, k, d), keys and values of the T + k positions);
        logits are left out (see :meth:`logits` for the chosen candidate's).
        """
        b, k = candidates.shape
        past = cache_length(cache)
        dtype, device = cache[0][0].dtype, candidates.device
        key = (k, dtype, device)
        if key not in self._only_itself:  # 0 on the diagonal, the lowest float elsewhere
            self._only_itself[key] = torch.full((k, k), torch.finfo(dtype).min, dtype=dtype, device=device
                                                ).fill_diagonal_(0.0)
        mask = torch.cat([torch.zeros(k, past, dtype=dtype, device=device), self._only_itself[key]], dim=1)
        positions = torch.full((b, k), past, dtype=torch.long, device=device)
        _, hidden, new_cache = self._forward(candidates, cache, mask.expand(b, 1, k, past + k), positions,
                                             logits=False)
        return hidden, new_cache

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from last-layer hidden states (the LM head)."""
        return self.model.get_output_embeddings()(hidden)

    def _forward(self, input_ids: torch.Tensor, cache: KeysValues | None, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, logits: bool = True) -> tuple[Any, torch.Tensor, KeysValues]:
        from transformers import DynamicCache

        # a new cache object around the same tensors: the forward appends to it, never to ``cache``
        kwargs = {self._cache_kwarg: DynamicCache(cache) if cache else None, "use_cache": True,
                  "output_hidden_states": True, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if not logits and self._keeps_logits:  # no LM head over the whole vocabulary for every position
            kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        out = self.model(input_ids=input_ids, **kwargs)
        self.cost.lm_forwards += int(input_ids.shape[0])  # every row is one sequence through the LM
        self.cost.lm_tokens += int(input_ids.numel())
        new_cache = getattr(out, "cache", None) if self._cache_kwarg == "cache" else out.past_key_values
        return (out.logits if logits else None), out.hidden_states[-1], [(key, value) for key, value, *_ in new_cache]


def cache_length(cache: KeysValues | None) -> int:
    """The number of positions in ``cache``."""
    return int(cache[0][0].shape[2]) if cache else 0


def keep_sentences(text: str, n: int) -> str:
    """Keep at most ``n`` '.'-separated sentences of ``text`` (the paper's story parser)."""
    parts = text.split(".")
    if len(parts) - 1 <= n:  # n or fewer full stops
        return text
    return ".".join(parts[:n]).strip() + "."


class ImageTextMatcher:
    """An open_clip model as an image-text matcher.

    ``text_scores(e, texts) = softmax_i(logit_scale * cos(e, CLIP_text(texts[i])))``.
    Texts are encoded only up to the longest one's token length instead of open_clip's
    fixed 77: exact, because CLIP's text tower is causal and pools the end-of-text token,
    and several times cheaper. ``cost`` is the running count of the work done
    (:mod:`magic_edu.costs`): texts and the token positions the text tower ran, images.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, name: str | None = None) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__
        self.logit_scale = float(model.logit_scale.exp().item())
        # the exact shortcuts of magic_edu.fast, on by default; off, texts go through open_clip's
        # encode_text (trimmed to the longest text) and every step starts afresh
        self.share_prefix = True  # encode the texts' shared token prefix once, the rest packed
        self.remember_prefixes = True  # and reuse a prefix's keys and values across calls (MAGIC steps)
        self.text_encoder = SharedPrefixEncoder(model)  # magic_edu.fast.clip_prefix
        self._clip_tokenizer = ClipTokenizer(tokenizer)
        self.cost = Cost()

    @property
    def prefix_memo(self) -> PrefixMemo:
        """The remembered prefixes' keys and values (``clear()`` forgets them)."""
        return self.text_encoder.memo

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, device: str | torch.device | None = None, **kwargs: Any
    ) -> ImageTextMatcher:
        """Create from open_clip names (``"ViT-B-32-quickgelu", pretrained="openai"``) or
        ``hf-hub:org/repo`` / ``local-dir:/path`` ids."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device or "cpu", **kwargs
        )
        tokenizer = open_clip.get_tokenizer(model_name)
        name = model_name if pretrained is None else f"{model_name}/{pretrained}"
        return cls(model, preprocess, tokenizer, name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_image(self, image: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalised image embedding: (d,) for one image, (n, d) for a list."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        pixels = torch.stack([self.preprocess(load_image(im)) for im in images]).to(self.device)
        dtype = next(self.model.parameters()).dtype
        emb = F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)
        self.cost.clip_images += len(images)
        return emb[0] if single else emb

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip token ids, trimmed to the longest text (exact for causal towers);
        words seen before are not tokenised again (:mod:`magic_edu.fast.clip_tokens`)."""
        return self._token_ids(texts).to(self.device)

    def _token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """:meth:`tokenize` on the CPU."""
        return self._clip_tokenizer(texts, trim=self.text_encoder.tower is not None)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (n, d)."""
        return self.embed_text_groups([texts])[0]

    @torch.no_grad()
    def embed_text_groups(self, groups: Sequence[Sequence[str]], remember: bool | None = None) -> torch.Tensor:
        """L2-normalised embeddings of G groups of n texts each: (G, n, d).

        A group's texts may share a long token prefix (MAGIC's k candidates at one step: the
        caption so far); with ``share_prefix`` on, it is encoded once per group
        (:mod:`magic_edu.fast.clip_prefix`), exactly. ``remember`` (default
        ``remember_prefixes``): reuse prefixes encoded by the previous calls; exact, but the
        rounding depends on which calls came before.
        """
        sizes = {len(g) for g in groups}
        if len(sizes) != 1 or 0 in sizes:
            raise MagicEduError("groups: every group must hold the same number (>= 1) of texts")
        n = sizes.pop()
        ids = self._token_ids([t for g in groups for t in g]).view(len(groups), n, -1)
        if self.text_encoder.tower is None:  # a text tower of another kind: open_clip's own encoder
            emb = self.model.encode_text(ids.flatten(0, 1).to(self.device))
            self.cost.clip_text_tokens += int(ids.numel())
        else:
            remember = self.remember_prefixes if remember is None else remember
            emb = self.text_encoder.encode(ids, self.device, self.share_prefix, remember, self.cost)
        self.cost.clip_texts += len(groups) * n
        return F.normalize(emb.float() if emb.dtype != torch.float64 else emb, dim=-1).view(len(groups), n, -1)

    def text_cosines(self, image_embedding: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """cos(image, text) for every text: (n,) for one image embedding (d,)."""
        return self.embed_texts(texts) @ image_embedding.to(self.device).float()

    def text_scores(self, image_embedding: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """softmax over the texts of logit_scale x cos(image, text)."""
        return torch.softmax(self.logit_scale * self.text_cosines(image_embedding, texts), dim=-1)
