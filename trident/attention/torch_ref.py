"""Reference attention over the paged KV cache in plain torch (the CPU path, and what GPU kernels are
tested against).

Cache layout (this backend's choice): ``[num_kv_heads, num_blocks, block_size, head_dim]``, head-major,
so that gathering a sequence's blocks yields keys already laid out ``[kv_heads, tokens, head_dim]`` for
the matmuls, with no transposing copy. A quantized cache (int8 / fp8 codes, ``trident.quant.kv``) keeps its
scales as ``[num_kv_heads, num_blocks, block_size]``: keys and values are quantized as they are written and
the gathered blocks dequantized to the queries' dtype before the matmuls. Queries attend with a causal mask,
an optional sliding window (a query at position i sees keys j with i - window < j <= i) and optional tanh
soft-capping of the scores. All decoding sequences are padded to the longest and attended in one batched matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.quant.kv import dequantize_kv, format_of_codes, quantize_kv


class TorchAttention:
    """The reference backend. Grouped-query attention without repeating keys/values."""

    wants_prefill_batch = False  # attends chunk by chunk from AttentionMetadata.prefills
    supports_mla = True  # multi-head latent attention runs in torch over this layout (trident/attention/mla_torch.py)
    supports_cuda_graphs = False  # padding rows (slot -1) would be written to the last slot

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 meta: AttentionMetadata) -> None:
        """key/value [num_tokens, kv_heads, head_dim] into their slots (quantized first for a quantized cache)."""
        slots = meta.slot_mapping
        for new, target, scales in ((key, cache.key, cache.key_scale), (value, cache.value, cache.value_scale)):
            flat = target.view(target.shape[0], -1, target.shape[3])
            new = new.transpose(0, 1)  # [kv_heads, tokens, D]
            if scales is None:
                flat.index_copy_(1, slots, new.to(target.dtype))
                continue
            codes, new_scales = quantize_kv(new, format_of_codes(target.dtype))
            # index_copy_ has no float8 kernel on the CPU: copy the code bytes
            flat.view(torch.uint8).index_copy_(1, slots, codes.view(torch.uint8))
            scales.view(scales.shape[0], -1).index_copy_(1, slots, new_scales)

    @staticmethod
    def kv_store(cache: LayerKVCache, meta: AttentionMetadata) -> None:
        """None: this layout is not the kernels' (write_kv writes)."""
        return None

    def forward(self, query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, *, scale: float,
                sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim] -> output of the same shape."""
        decode = meta.decode
        if decode is not None and decode.token_indices_are_all:
            return self._decode(query, cache, meta, scale, sliding_window, logit_softcap)
        out = torch.empty_like(query)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_query_tokens)
            k, v = _gather_kv(cache, seq.block_table, query.dtype)
            k, v = k[:, : seq.context_len], v[:, : seq.context_len]  # [kv_heads, S, D]
            key_positions = torch.arange(seq.context_len, device=query.device)
            mask = _mask(seq.query_positions, key_positions, sliding_window)
            q = query[rows].transpose(0, 1).unsqueeze(0).to(k.dtype)  # [1, H, L, D]
            o = _attend(q, k.unsqueeze(0), v.unsqueeze(0), mask[None, None], scale, logit_softcap)
            out[rows] = o[0].transpose(0, 1).to(out.dtype)
        if decode is not None:
            out[decode.token_indices] = self._decode(
                query[decode.token_indices], cache, meta, scale, sliding_window, logit_softcap
            )
        return out

    def _decode(self, query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
        """One query per sequence: query [B, H, D] -> [B, H, D]."""
        decode = meta.decode
        assert decode is not None
        batch, num_heads, head_dim = query.shape
        num_kv_heads = cache.key.shape[0]
        k, v = _gather_kv(cache, decode.block_tables, query.dtype)  # [kv_heads, B, S, D]
        if k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float16):
            # torch's CPU batched matmul is many times slower in 16 bits than in float32 at these shapes (one query
            # row per sequence: bf16 0.30 ms against 0.03 for 3 x 304 keys of 64), so decode attends in float32.
            k, v = k.float(), v.float()
        span = k.shape[2]
        key = ("decode", sliding_window, span)
        bias = meta.mask_cache.get(key)
        if bias is None:  # additive mask [1, B, 1, S]: 0 where visible, -inf elsewhere; built once per step
            key_positions = torch.arange(span, device=k.device)
            valid = key_positions[None, :] < decode.context_lens[:, None]
            if sliding_window is not None:
                valid &= key_positions[None, :] > (decode.query_positions[:, None] - sliding_window)
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=k.device).masked_fill_(~valid, float("-inf"))
            bias = bias.view(1, batch, 1, span)
            meta.mask_cache[key] = bias
        # Plain batched matmuls over [kv_heads, B]: for one query they cost far less than a fused kernel's setup.
        q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1).to(k.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # [kv_heads, B, G, S]
        if logit_softcap is not None:
            scores = torch.tanh(scores.div_(logit_softcap)).mul_(logit_softcap)
        probs = torch.softmax(scores.add_(bias), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # [kv_heads, B, G, D]
        return out.transpose(0, 1).reshape(batch, num_heads, head_dim).to(query.dtype)


def _gather_kv(cache: LayerKVCache, block_table: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """Keys and values of the blocks of ``block_table`` ([n] or [B, n]) as [kv_heads, (B,) n * block_size,
    head_dim]: as stored for a float cache, dequantized to ``dtype`` for a quantized one."""
    k, v = _gather(cache.key, block_table), _gather(cache.value, block_table)
    if cache.key_scale is None or cache.value_scale is None:
        return k, v
    return (dequantize_kv(k, _gather(cache.key_scale, block_table), dtype),
            dequantize_kv(v, _gather(cache.value_scale, block_table), dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The blocks of ``block_table`` ([n] or [B, n]) of a [kv_heads, num_blocks, block_size, ...] tensor as
    [kv_heads, (B,) n * block_size, ...]."""
    picked = torch.index_select(cache, 1, block_table.reshape(-1))  # whole contiguous blocks per head
    return picked.view(cache.shape[0], *block_table.shape[:-1], block_table.shape[-1] * cache.shape[2],
                       *cache.shape[3:])


def _mask(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [q, k]: True where the query may attend to the key."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            logit_softcap: float | None) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, S, D], boolean mask [B, 1, Lq, S] -> [B, H, Lq, D]."""
    if logit_softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    # Soft-capped scores (gemma2): explicit matmuls, keys/values shared by each group of query heads.
    batch, num_heads, lq, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group * lq, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.view(batch, num_kv_heads, group, lq, -1)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(batch, num_kv_heads, group * lq, -1)
    return torch.matmul(probs, v).view(batch, num_heads, lq, head_dim)
