"""CLIP's text tower on many texts that share a beginning: the prefix once, the rest packed.

At a MAGIC step the k candidate texts are the caption so far plus one token each. CLIP's text
tower is causal and pools the end-of-text token, so a text's embedding depends on its own
tokens only, and the keys and values of a shared token prefix are the same for every text.
:class:`SharedPrefixEncoder` therefore encodes each group's shared prefix once (only its new
tokens when an earlier call, the previous step, encoded its beginning: :class:`PrefixMemo`),
then runs each text's own last tokens on top of it, all of a group's packed in one sequence
with a block mask and explicit positions (no padding to the longest). Exact (tests compare it
with open_clip's ``encode_text`` at 77 tokens), and several times cheaper.

:func:`encode_text_trimmed` is the plain alternative: open_clip's encoder on ids cut to the
longest text instead of 77 tokens (exact for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..costs import Cost

# On a GPU, encode the candidates' shared CLIP prefix once only when that saves at least this many
# token positions of text-tower work (below it the extra kernel launches cost more). Checked on an
# H200 with scripts/gpu_profile.py (ms per caption, always share / this rule / never share):
# batch 1 384 / 275 / 281, batch 4 102 / 78 / 78, batch 16 31 / 37 / 42.
SHARE_ON_GPU_SAVED_TOKENS = 4096


def causal_text_tower(model: torch.nn.Module) -> Any:
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


def encode_text_trimmed(tower: Any, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoder on ids of any length L <= context length (causal mask cut to L x L)."""
    n = ids.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast_dtype) + tower.positional_embedding[:n].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    return project(tower, x)


def project(tower: Any, x: torch.Tensor) -> torch.Tensor:
    """The text tower's final projection of the pooled end-of-text states."""
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def plain_blocks(tower: Any) -> list[Any] | None:
    """The text tower's residual blocks if all are open_clip's plain pre-norm blocks with
    nn.MultiheadAttention (every CLIP text tower), else None (then no prefix sharing)."""
    transformer = tower.transformer
    blocks = list(getattr(transformer, "resblocks", []))
    plain = blocks and getattr(transformer, "batch_first", False) and all(
        isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and not hasattr(b, "ln_1_kv")
        and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None for b in blocks
    )
    return blocks if plain else None


def attend(block: Any, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor):
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
class Packed:
    """G groups of n token rows laid out for :func:`encode_packed` (see :func:`pack_rows`)."""

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

    def to(self, device: torch.device) -> Packed:
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("prefix_ids", "prefix_mask", "tokens", "position", "suffix_mask", "ends")})


def pack_rows(ids: torch.Tensor, memo: PrefixMemo | None = None) -> Packed:
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
    return Packed(prefixes, r, [entry for _, entry in remembered], ids[:, 0, r:p], prefix_mask, tokens, position,
                   suffix_mask, lens.cumsum(dim=1) - 1)


def encode_packed(tower: Any, blocks: list[Any], packed: Packed, memo: PrefixMemo | None = None) -> torch.Tensor:
    """open_clip's text encoder on the rows :func:`pack_rows` laid out: (G * n, d). Exact: the
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
        prefix, (k, v) = attend(block, prefix, past, packed.prefix_mask)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        prefix_kv.append((k, v))
        suffix, _ = attend(block, suffix, (k, v), packed.suffix_mask)
    if memo is not None:
        memo.new_call()
        for group, tokens in enumerate(packed.prefixes):
            memo.remember(tokens, [(k[group: group + 1], v[group: group + 1]) for k, v in prefix_kv])
    x = tower.ln_final(suffix)
    g, n = packed.ends.shape
    x = x[torch.arange(g, device=x.device)[:, None], packed.ends].reshape(g * n, -1)
    return project(tower, x)

class SharedPrefixEncoder:
    """The shared-prefix text encoding of one open_clip model (see the module docstring).

    ``tower`` is None when the model's text tower is not open_clip's causal kind (then only
    open_clip's own ``encode_text`` is exact); ``blocks`` is None when its residual blocks are
    not the plain pre-norm kind (then :func:`encode_text_trimmed` is used, never sharing).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.tower = causal_text_tower(model)
        self.blocks = plain_blocks(self.tower) if self.tower is not None else None
        self.memo = PrefixMemo()

    def encode(self, ids: torch.Tensor, device: torch.device, share: bool = True, remember: bool = True,
               cost: Cost | None = None) -> torch.Tensor:
        """Embeddings (G * n, d), not normalised, of token ids (G, n, L) on the CPU; adds the token
        positions the text tower runs to ``cost.clip_text_tokens``.

        The packing is planned on the CPU (no device round trip); sharing the prefix saves
        arithmetic (what bounds a CPU, and a GPU on large batches) but adds kernel launches (what
        bounds a GPU on small ones): on a GPU it is used when it saves enough token positions.
        """
        g, n, length = ids.shape
        full = g * n * length  # token positions of every row encoded in full
        gpu = device.type != "cpu"
        memo = self.memo if remember else None
        packed = None
        if share and self.blocks is not None and (not gpu or full >= SHARE_ON_GPU_SAVED_TOKENS):
            if memo is not None:
                memo.check_weights(self.tower)
            packed = pack_rows(ids, memo)
            if gpu and full - packed.positions < SHARE_ON_GPU_SAVED_TOKENS:
                packed = None
        if cost is not None:
            cost.clip_text_tokens += full if packed is None else packed.positions
        if packed is None:
            return encode_text_trimmed(self.tower, ids.view(g * n, length).to(device))
        return encode_packed(self.tower, self.blocks, packed.to(device), memo)
