"""Thin wrappers around the two models MAGIC plugs together.

* :class:`LanguageModel`: a transformers causal LM of the GPT-2 family, its tokenizer,
  its start token and the way a prompt becomes the prefix ids it was trained on.
* :class:`ImageTextMatcher`: an open_clip model with its preprocessing and tokenizer.

Decoding code only talks to these two classes, never to one checkpoint.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .fast.clip_tokens import ClipTokenizer
from .errors import MagicEduError
from .inputs import ImageLike, load_image

DEFAULT_PROMPT_FORMAT = "{sos}{prompt}"
STORY_PROMPT_FORMAT = "{prompt} {eos}"
# On a GPU, encode the candidates' shared CLIP prefix once only when that saves at least this many
# token positions of text-tower work (below it the extra kernel launches cost more; an estimate
# from the H200's float32 throughput and launch cost, to be checked with scripts/gpu_check.sh).
SHARE_ON_GPU_SAVED_TOKENS = 4096


class LanguageModel:
    """A causal LM plus what MAGIC needs to know about it.

    * ``sos_token``: the start token put before every caption (``<-start_of_text->`` for the
      paper's caption LMs); ``None`` means the tokenizer's BOS.
    * ``prompt_format``: how a prompt becomes the prefix, with ``{sos}``, ``{eos}`` and
      ``{prompt}`` placeholders. Default ``"{sos}{prompt}"``; the paper's story LM uses
      ``"{prompt} {eos}"`` (a title, a space, EOS, and no start token).
    * ``max_sentences``: if set, :meth:`output_text` keeps at most that many
      '.'-separated sentences (the paper's story parser keeps five).
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
        self._decoder_kind = decoder_kind(tokenizer)
        self._piece_cache: dict[int, str] = {}

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
    ) -> "LanguageModel":
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

    def clip_texts_extended(self, batch: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]
                            ) -> list[list[str]]:
        """``clip_texts([ids + [v] for v in row])`` for each ``ids`` in ``batch`` and its ``row``
        of candidates, decoding each ``ids`` once and appending each candidate's own text.

        Exact for the two decoders the GPT-2 family uses. A byte-level BPE (GPT-2's) decodes a
        sequence as the UTF-8 text of its tokens' bytes, so when the bytes of ``ids`` end at a
        character boundary (no U+FFFD in their text) the text of ``ids + [v]`` is that text
        followed by v's. A WordPiece decoder turns each token into its own piece (a space before
        every token but the first, none before a ``##`` piece, then its clean-up), and a fast
        tokenizer without a decoder joins tokens with spaces, so there the text of ``ids + [v]``
        is that text followed by v's piece. Other decoders, and texts with U+FFFD, are decoded in
        full (all rows in one call).
        """
        out: list[list[str] | None] = [None] * len(batch)
        if self._decoder_kind is not None:
            eos = self.eos_token
            for i, (base, row) in enumerate(zip(self.decode_batch(batch), candidates)):
                if self._decoder_kind == "bytes" and "\ufffd" not in base:
                    out[i] = [(base + piece).split(eos, 1)[0] for piece in self.token_texts(row)]
                elif self._decoder_kind == "pieces":
                    pieces = self._following_pieces(row) if batch[i] else self.token_texts(row)
                    out[i] = [(base + piece).split(eos, 1)[0] for piece in pieces]
        todo = [i for i, texts in enumerate(out) if texts is None]
        if todo:
            whole = self.clip_texts([list(batch[i]) + [int(v)] for i in todo for v in candidates[i]])
            for i in todo:
                out[i], whole = whole[: len(candidates[i])], whole[len(candidates[i]):]
        return out  # type: ignore[return-value]

    def _following_pieces(self, token_ids: Sequence[int]) -> list[str]:
        """For a WordPiece decoder: the text each token adds after at least one other token."""
        missing = [i for i in dict.fromkeys(int(t) for t in token_ids) if i not in self._piece_cache]
        if missing:
            lead = self.decode([self.eos_token_id])
            texts = self.decode_batch([[self.eos_token_id, i] for i in missing])
            self._piece_cache.update((i, text[len(lead):]) for i, text in zip(missing, texts))
        return [self._piece_cache[int(t)] for t in token_ids]

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
        new_cache = getattr(out, "cache", None) if self._cache_kwarg == "cache" else out.past_key_values
        return (out.logits if logits else None), out.hidden_states[-1], [(key, value) for key, value, *_ in new_cache]


KeysValues = list  # the LM's keys and values: one (keys, values) pair per layer, each (B, heads, T, d_head)


def cache_length(cache: KeysValues | None) -> int:
    """The number of positions in ``cache``."""
    return int(cache[0][0].shape[2]) if cache else 0


def decoder_kind(tokenizer: Any) -> str | None:
    """How a tokenizer turns ids into text, for :meth:`LanguageModel.clip_texts_extended`:
    ``"bytes"`` (a fast tokenizer with a byte-level decoder: the UTF-8 text of the tokens' bytes),
    ``"pieces"`` (a fast tokenizer whose tokens each become their own piece: a WordPiece decoder,
    or no decoder, which joins tokens with spaces), or None (anything else: decode in full)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no promise about how it decodes
        return None
    decoder = backend.decoder
    if decoder is None:
        return "pieces"
    return {"ByteLevel": "bytes", "WordPiece": "pieces"}.get(type(decoder).__name__)


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
    and several times cheaper.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, name: str | None = None) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__
        self.logit_scale = float(model.logit_scale.exp().item())
        self._tower = _causal_text_tower(model)
        self._blocks = _plain_blocks(self._tower) if self._tower is not None else None
        self._clip_tokenizer = ClipTokenizer(tokenizer)
        self.remember_prefixes = True  # reuse the text tower's work on a prefix across calls (MAGIC steps)
        self.prefix_memo = PrefixMemo()

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, device: str | torch.device | None = None, **kwargs: Any
    ) -> "ImageTextMatcher":
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
        return emb[0] if single else emb

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip token ids, trimmed to the longest text (exact for causal towers);
        words seen before are not tokenised again (:mod:`magic_edu.fast.clip_tokens`)."""
        return self._token_ids(texts).to(self.device)

    def _token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """:meth:`tokenize` on the CPU."""
        return self._clip_tokenizer(texts, trim=self._tower is not None)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (n, d)."""
        return self.embed_text_groups([texts])[0]

    @torch.no_grad()
    def embed_text_groups(self, groups: Sequence[Sequence[str]]) -> torch.Tensor:
        """L2-normalised embeddings of G groups of n texts each: (G, n, d).

        MAGIC's k candidate texts at one step share a long token prefix (the caption so far).
        CLIP's text tower is causal, so that prefix is encoded once per group (and only its new
        tokens when an earlier call, the previous step, encoded its beginning: ``prefix_memo``),
        and each text runs only its own few last tokens on top of it, all of a group's packed in
        one sequence: exact, and several times cheaper. (On a GPU, only for large calls.)
        """
        sizes = {len(g) for g in groups}
        if len(sizes) != 1 or 0 in sizes:
            raise MagicEduError("groups: every group must hold the same number (>= 1) of texts")
        n = sizes.pop()
        ids = self._token_ids([t for g in groups for t in g])
        return self._encode_ids(ids.view(len(groups), n, -1))

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower's forward on token ids (G, n, L) on the CPU: normalised (G, n, d).

        The packing is planned on the CPU (no device round trip); sharing the prefix saves
        arithmetic (what bounds a CPU, and a GPU on large batches) but adds kernel launches (what
        bounds a GPU on small ones): on a GPU it is used when it saves enough token positions.
        """
        g, n, length = ids.shape
        device, full = self.device, g * n * length  # full: token positions of every row encoded in full
        gpu = device.type != "cpu"
        memo = self.prefix_memo if self.remember_prefixes else None
        packed = None
        if self._blocks is not None and (not gpu or full >= SHARE_ON_GPU_SAVED_TOKENS):
            if memo is not None:
                memo.check_weights(self._tower)
            packed = _pack_rows(ids, memo)
            if gpu and full - packed.positions < SHARE_ON_GPU_SAVED_TOKENS:
                packed = None
        if self._tower is None:
            emb = self.model.encode_text(ids.view(g * n, length).to(device))
        elif packed is None:
            emb = _encode_text_trimmed(self._tower, ids.view(g * n, length).to(device))
        else:
            emb = _encode_packed(self._tower, self._blocks, packed.to(device), memo)
        return F.normalize(emb.float() if emb.dtype != torch.float64 else emb, dim=-1).view(g, n, -1)

    def text_cosines(self, image_embedding: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """cos(image, text) for every text: (n,) for one image embedding (d,)."""
        return self.embed_texts(texts) @ image_embedding.to(self.device).float()

    def text_scores(self, image_embedding: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """softmax over the texts of logit_scale x cos(image, text)."""
        return torch.softmax(self.logit_scale * self.text_cosines(image_embedding, texts), dim=-1)


def _causal_text_tower(model: torch.nn.Module) -> Any:
    """The module holding open_clip's causal text transformer, or None when the text tower
    is of another kind (then texts are encoded at full context length, which is always exact)."""
    tower = getattr(model, "text", model)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(tower, a) for a in needed) or getattr(tower, "attn_mask", None) is None:
        return None
    if pool != "argmax" or getattr(tower, "cls_emb", None) is not None:
        return None
    return tower


def _encode_text_trimmed(tower: Any, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoder on ids of any length L <= context length (causal mask cut to L x L)."""
    n = ids.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast_dtype) + tower.positional_embedding[:n].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    return _project(tower, x)


def _project(tower: Any, x: torch.Tensor) -> torch.Tensor:
    """The text tower's final projection of the pooled end-of-text states."""
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _plain_blocks(tower: Any) -> list[Any] | None:
    """The text tower's residual blocks if all are open_clip's plain pre-norm blocks with
    nn.MultiheadAttention (every CLIP text tower), else None (then no prefix sharing)."""
    transformer = tower.transformer
    blocks = list(getattr(transformer, "resblocks", []))
    plain = blocks and getattr(transformer, "batch_first", False) and all(
        isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and not hasattr(b, "ln_1_kv")
        and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None for b in blocks
    )
    return blocks if plain else None


def _attend(block: Any, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor):
    """One open_clip residual block on x (B, S, d), attending to ``past`` keys/values
    (B, h, P, d_h) before it. Returns (new x, this block's keys and values of x)."""
    attn = block.attn
    b, s, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = F.linear(out.transpose(1, 2).reshape(b, s, d), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (k, v)


class PrefixMemo:
    """The text tower's keys and values of recently encoded token prefixes, per block.

    A causal tower's keys and values at position i depend on tokens 0..i only, so a prefix
    encoded at one MAGIC step (the caption so far) is valid at the next step for any text that
    starts with the same tokens. Entries of the last two calls are kept; a text that starts
    differently (a re-tokenised last word, the sliding window, Back) is simply encoded again.
    """

    def __init__(self) -> None:
        self._now: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._before: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._weights: tuple = ()
        self._tower: Any = None
        self._param_list: list[torch.Tensor] = []

    def check_weights(self, module: torch.nn.Module) -> None:
        """Forget everything if ``module``'s parameters were replaced or changed in place
        (moved, cast, trained) since the last call."""
        weights = tuple((p.data_ptr(), p.dtype, p._version) for p in self._params(module))
        if weights != self._weights:
            self.clear()
            self._weights = weights

    def _params(self, tower: Any) -> list[torch.Tensor]:
        """The text tower's parameters (listed once, walking the modules each call is slow; listed
        again if the tower or its token embedding was replaced, as ``load_state_dict(assign=True)`` does)."""
        if self._tower is not tower or self._param_list[0] is not tower.token_embedding.weight:
            self._tower = tower
            parts = [tower.token_embedding, tower.transformer, tower.ln_final, tower.positional_embedding,
                     tower.text_projection]
            self._param_list = [t for part in parts if part is not None
                                for t in (part.parameters() if isinstance(part, torch.nn.Module) else [part])]
        return self._param_list

    def longest(self, tokens: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(r, per-block (keys, values) of at least the first r tokens) for the longest
        remembered prefix of ``tokens``; (0, None) when none is."""
        for r in range(len(tokens), 0, -1):
            key = tuple(tokens[:r])
            entry = self._now.get(key) or self._before.get(key)
            if entry is not None:
                return r, entry
        return 0, None

    def new_call(self) -> None:
        self._before, self._now = self._now, {}

    def remember(self, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._now[tuple(tokens)] = kv

    def clear(self) -> None:
        self._now, self._before = {}, {}


@dataclass
class _Packed:
    """G groups of n token rows laid out for :func:`_encode_packed` (see :func:`_pack_rows`)."""

    prefixes: list[list[int]]  # each group's shared prefix, tokens 0 .. p - 1
    reused: int  # r: positions < r come from the memo's keys and values
    remembered: list[list[tuple[torch.Tensor, torch.Tensor]] | None]  # per group, the memo's entry
    prefix_ids: torch.Tensor  # (G, p - r): the prefix tokens still to encode
    prefix_mask: torch.Tensor  # (p - r, p): what each of them sees
    tokens: torch.Tensor  # (G, T): the rows' own tokens, one row after the other
    position: torch.Tensor  # (G, T): their positions in their rows
    suffix_mask: torch.Tensor  # (G, 1, T, p + T): each sees the prefix and its own row's earlier tokens
    ends: torch.Tensor  # (G, n): the slot of each row's end-of-text token

    @property
    def positions(self) -> int:
        """Token positions the text tower runs: the new prefix tokens and the packed slots."""
        return self.prefix_ids.numel() + self.tokens.numel()

    def to(self, device: torch.device) -> "_Packed":
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("prefix_ids", "prefix_mask", "tokens", "position", "suffix_mask", "ends")})


def _pack_rows(ids: torch.Tensor, memo: PrefixMemo | None = None) -> _Packed:
    """Plan the shared-prefix encoding of G groups of n token rows (G, n, L):

    * each group's common token prefix (tokens 0 .. p - 1, the same p for all groups) is
      encoded once, and only from r on where ``memo`` has keys and values for its beginning;
    * the rest of the n rows, up to their end-of-text tokens, are packed one after another
      in one sequence per group (no padding to the longest row).
    """
    g, n, length = ids.shape
    eot = ids.argmax(dim=-1)  # (G, n): the end-of-text position of every row
    same = (ids == ids[:, :1]).all(dim=1).all(dim=0)  # (L,): positions equal within every group
    differ = (~same).nonzero()
    p = int(differ[0]) if len(differ) else length
    p = max(1, min(p, int(eot.min())))  # every row keeps at least its end-of-text token after the prefix
    prefixes = ids[:, 0, :p].tolist()
    remembered = [memo.longest(tokens) if memo is not None else (0, None) for tokens in prefixes]
    r = min(min(hit for hit, _ in remembered), p - 1)
    # new prefix queries see the reused part and the causal part of the new one
    prefix_mask = torch.cat([torch.ones(p - r, r, dtype=torch.bool), torch.ones(p - r, p - r, dtype=torch.bool).tril()],
                            dim=1)
    # row i of a group brings its tokens p .. eot_i; slot t of a group holds one of them
    s = length - p
    lens = eot - p + 1  # (G, n)
    valid = torch.arange(s) < lens[..., None]  # (G, n, S)
    totals = lens.sum(dim=1)  # (G,)
    slot = torch.arange(int(totals.max())) < totals[:, None]  # (G, T)
    tokens = torch.zeros(slot.shape, dtype=ids.dtype)
    tokens[slot] = ids[:, :, p:][valid]
    position = torch.zeros(slot.shape, dtype=torch.long)
    position[slot] = (p + torch.arange(s)).expand(g, n, s)[valid]
    row = torch.full(slot.shape, -1, dtype=torch.long)
    row[slot] = torch.arange(n)[:, None].expand(g, n, s)[valid]
    own = (row[:, :, None] == row[:, None, :]) & (position[:, None, :] <= position[:, :, None])
    suffix_mask = torch.cat([torch.ones(g, slot.shape[1], p, dtype=torch.bool), own], dim=2)[:, None]
    return _Packed(prefixes, r, [entry for _, entry in remembered], ids[:, 0, r:p], prefix_mask, tokens, position,
                   suffix_mask, lens.cumsum(dim=1) - 1)


def _encode_packed(tower: Any, blocks: list[Any], packed: _Packed, memo: PrefixMemo | None = None) -> torch.Tensor:
    """open_clip's text encoder on the rows :func:`_pack_rows` laid out: (G * n, d). Exact: the
    tower is causal and pools the end-of-text token, so a row's embedding depends only on its
    own tokens, and a shared prefix's keys and values are the same for every row."""
    r = packed.reused
    cast = tower.transformer.get_cast_dtype()
    pos = tower.positional_embedding.to(cast)
    prefix = tower.token_embedding(packed.prefix_ids).to(cast) + pos[r: r + packed.prefix_ids.shape[1]]
    suffix = tower.token_embedding(packed.tokens).to(cast) + pos[packed.position]  # (G, T, d)
    prefix_kv = []
    for i, block in enumerate(blocks):
        past = None
        if r > 0:
            past = tuple(torch.cat([entry[i][j][:, :, :r] for entry in packed.remembered]) for j in (0, 1))
        prefix, (k, v) = _attend(block, prefix, past, packed.prefix_mask)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        prefix_kv.append((k, v))
        suffix, _ = _attend(block, suffix, (k, v), packed.suffix_mask)
    if memo is not None:
        memo.new_call()
        for group, tokens in enumerate(packed.prefixes):
            memo.remember(tokens, [(k[group: group + 1], v[group: group + 1]) for k, v in prefix_kv])
    x = tower.ln_final(suffix)
    g, n = packed.ends.shape
    x = x[torch.arange(g, device=x.device)[:, None], packed.ends].reshape(g * n, -1)
    return _project(tower, x)
