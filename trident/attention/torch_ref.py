"""Reference attention over the paged KV cache in plain torch (the CPU path, and what GPU kernels are
tested against).

Keys and values of a sequence are gathered block by block from the cache (whole blocks are
contiguous, so the gather is a few large copies), then attended with a causal mask, an optional
sliding window (a query at position i sees keys j with i - window < j <= i) and optional tanh
soft-capping of the scores. Decoding sequences are padded to the longest and attended in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.attention.base import AttentionMetadata


class TorchAttention:
    """The reference backend. Grouped-query attention without repeating keys/values."""

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, key.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, value.to(v_cache.dtype))

    def forward(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, *, scale: float, sliding_window: int | None,
                logit_softcap: float | None) -> torch.Tensor:
        decode = meta.decode
        if decode is not None and decode.token_indices_are_all:
            return self._decode(query, k_cache, v_cache, meta, scale, sliding_window, logit_softcap)
        out = torch.empty_like(query)
        for seq in meta.prefills:
            q = query[seq.token_start: seq.token_start + seq.num_query_tokens]
            k = _gather_blocks(k_cache, seq.block_table).flatten(0, 1)[: seq.context_len]
            v = _gather_blocks(v_cache, seq.block_table).flatten(0, 1)[: seq.context_len]
            mask = _mask(seq.query_positions, torch.arange(seq.context_len), sliding_window)
            out[seq.token_start: seq.token_start + seq.num_query_tokens] = _attend(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0), scale, logit_softcap
            )[0]
        if decode is not None:
            out[decode.token_indices] = self._decode(
                query[decode.token_indices], k_cache, v_cache, meta, scale, sliding_window, logit_softcap
            )
        return out

    def _decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None,
                logit_softcap: float | None) -> torch.Tensor:
        decode = meta.decode
        assert decode is not None
        batch = decode.block_tables.shape[0]
        k = _gather_blocks(k_cache, decode.block_tables).flatten(1, 2)  # [B, blocks * block_size, kv_heads, D]
        v = _gather_blocks(v_cache, decode.block_tables).flatten(1, 2)
        key = ("decode", sliding_window, k.shape[1])
        bias = meta.mask_cache.get(key)
        if bias is None:  # additive mask [B, 1, 1, S]: 0 where visible, -inf elsewhere; built once per step
            key_positions = torch.arange(k.shape[1], device=k.device)
            valid = key_positions[None, :] < decode.context_lens[:, None]
            if sliding_window is not None:
                valid &= key_positions[None, :] > (decode.query_positions[:, None] - sliding_window)
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=k.device).masked_fill_(~valid, float("-inf"))
            bias = bias.view(batch, 1, 1, -1)
            meta.mask_cache[key] = bias
        return _attend_one(query, k, v, bias, scale, logit_softcap)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                logit_softcap: float | None) -> torch.Tensor:
    """One query per sequence: q [B, H, D], k/v [B, S, Hkv, D], bias [B, 1, 1, S] -> [B, H, D].

    Plain batched matmuls: for a single query they cost far less than the fused CPU kernel's setup."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()  # [B, Hkv, G, S]
    scores.mul_(scale)
    if logit_softcap is not None:
        scores = torch.tanh(scores.div_(logit_softcap)).mul_(logit_softcap)
    probs = torch.softmax(scores.add_(bias), dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache[block_table] through index_select, which copies whole contiguous blocks (much faster on
    the CPU than advanced indexing)."""
    flat = torch.index_select(cache, 0, block_table.reshape(-1))
    return flat.view(*block_table.shape, *cache.shape[1:])


def _mask(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [q, k]: True where the query may attend to the key."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            logit_softcap: float | None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk] -> [B, Lq, H, D]."""
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    attn_mask = mask.unsqueeze(1)
    if logit_softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
    # Soft-capped scores (gemma2): explicit matmuls, keys/values shared by each group of query heads.
    batch, num_heads, lq, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group * lq, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.view(batch, num_kv_heads, group, lq, -1)
    scores = scores.masked_fill(~attn_mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(batch, num_kv_heads, group * lq, -1)
    out = torch.matmul(probs, v).view(batch, num_heads, lq, head_dim)
    return out.transpose(1, 2)
