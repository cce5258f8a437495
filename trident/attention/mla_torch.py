"""Multi-head latent attention over the paged latent cache, in plain torch (the exact form).

The cache of a layer (``LayerKVCache.key``, no value tensor) holds per token one vector: the normalised latent c
(``kv_lora_rank``) followed by the rotated rope key shared by all heads (``qk_rope_head_dim``); laid out as the torch
backend lays out keys, ``[1, num_blocks, block_size, latent_dim]``. To attend, a sequence's latents are gathered,
up-projected to per-head keys (no-position part) and values by ``kv_b_proj``, the shared rope key is joined to every
head's key, and queries attend with the causal mask. Prefill chunks attend one by one; decoding sequences are
padded to the longest and attended together.

Decode steps take the absorbed form when given kv_b_proj's weight (``absorb_weight``): per head, the key
up-projection W_UK [qk_nope, kv_lora_rank] is folded into the query (q_nope W_UK, one latent-width vector per head),
scores are taken against the cached latents themselves (plus the rope parts), the probabilities average the
latents, and W_UV maps that average to the head's value width. The same sums in another order: no per-token keys
or values are formed, which is what makes decoding over long contexts affordable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.attention.torch_ref import _gather, _mask


@dataclass(frozen=True)
class MlaShape:
    """Head counts and widths of one MLA layer."""

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


def write_latent(latent: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata) -> None:
    """latent [num_tokens, kv_lora_rank + qk_rope_head_dim] into the tokens' slots (``meta.slot_mapping``)."""
    flat = cache.key.view(1, -1, cache.key.shape[-1])
    flat.index_copy_(1, meta.slot_mapping, latent.unsqueeze(0).to(cache.key.dtype))


def mla_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                  up_project: Callable[[torch.Tensor], torch.Tensor], shape: MlaShape, scale: float,
                  absorb_weight: torch.Tensor | None = None) -> torch.Tensor:
    """q_nope [T, H, qk_nope], q_rope [T, H, qk_rope] (rotated) -> [T, H, v_head_dim]. ``up_project``: the layer's
    kv_b_proj, latents [N, kv_lora_rank] -> [N, H * (qk_nope + v_head_dim)]; ``absorb_weight``: its weight
    [H * (qk_nope + v_head_dim), kv_lora_rank], for the absorbed form of the decode steps (None: the exact form)."""
    query = torch.cat((q_nope, q_rope), dim=-1)
    out = query.new_empty(query.shape[0], shape.num_heads, shape.v_head_dim)
    for seq in meta.prefills:
        rows = slice(seq.token_start, seq.token_start + seq.num_query_tokens)
        latents = _gather(cache.key, seq.block_table)[0, : seq.context_len]  # [S, latent]
        k, v = _expand(latents, up_project, shape, query.dtype)  # [H, S, .]
        mask = _mask(seq.query_positions, torch.arange(seq.context_len, device=query.device), None)
        q = query[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, Dqk]
        o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask[None, None],
                                           scale=scale)
        out[rows] = o[0].transpose(0, 1)
    decode = meta.decode
    if decode is not None and absorb_weight is not None:
        rows = decode.token_indices
        out[rows] = _decode_absorbed(q_nope[rows], q_rope[rows], cache, decode.block_tables, decode.context_lens,
                                     absorb_weight, shape, scale).to(out.dtype)
    elif decode is not None:
        latents = _gather(cache.key, decode.block_tables)[0]  # [B, S, latent]
        batch, span, _ = latents.shape
        k, v = _expand(latents.reshape(batch * span, -1), up_project, shape, query.dtype)  # [H, B*S, .]
        k = k.view(shape.num_heads, batch, span, -1).transpose(0, 1)  # [B, H, S, Dqk]
        v = v.view(shape.num_heads, batch, span, -1).transpose(0, 1)
        visible = torch.arange(span, device=query.device)[None, :] < decode.context_lens[:, None]  # [B, S]
        q = query[decode.token_indices].unsqueeze(2)  # [B, H, 1, Dqk]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
        out[decode.token_indices] = o[:, :, 0]
    return out


def _expand(latents: torch.Tensor, up_project: Callable[[torch.Tensor], torch.Tensor], shape: MlaShape,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents [N, latent] -> keys [H, N, qk_nope + qk_rope] and values [H, N, v_head_dim]."""
    latents = latents.to(dtype)
    n = latents.shape[0]
    c, k_rope = latents.split([shape.kv_lora_rank, shape.qk_rope_head_dim], dim=-1)
    kv = up_project(c).view(n, shape.num_heads, shape.qk_nope_head_dim + shape.v_head_dim).transpose(0, 1)
    k_nope, v = kv.split([shape.qk_nope_head_dim, shape.v_head_dim], dim=-1)
    k = torch.cat((k_nope, k_rope.unsqueeze(0).expand(shape.num_heads, n, shape.qk_rope_head_dim)), dim=-1)
    return k, v


def _decode_absorbed(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, weight: torch.Tensor, shape: MlaShape, scale: float) -> torch.Tensor:
    """One query per sequence, attended in latent space: q_nope [B, H, qk_nope], q_rope [B, H, qk_rope] ->
    [B, H, v_head_dim] (scores and softmax in float32 at least)."""
    dtype = q_nope.dtype
    if q_nope.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # torch's CPU batched matmuls are far slower in 16 bits at one query row
    w = weight.view(shape.num_heads, shape.qk_nope_head_dim + shape.v_head_dim, shape.kv_lora_rank).to(dtype)
    w_uk, w_uv = w[:, : shape.qk_nope_head_dim], w[:, shape.qk_nope_head_dim:]  # [H, nope, R], [H, v, R]
    latents = _gather(cache.key, block_tables)[0].to(dtype)  # [B, S, R + rope]
    c, k_rope = latents.split([shape.kv_lora_rank, shape.qk_rope_head_dim], dim=-1)
    q_latent = torch.matmul(q_nope.to(dtype).transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
    scores = torch.matmul(q_latent, c.transpose(1, 2)) + torch.matmul(q_rope.to(dtype), k_rope.transpose(1, 2))
    span = latents.shape[1]
    visible = torch.arange(span, device=latents.device)[None, :] < context_lens[:, None]  # [B, S]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).mul_(scale)
    scores = scores.masked_fill_(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(dtype)  # [B, H, S]
    o_latent = torch.matmul(probs, c)  # [B, H, R]
    return torch.matmul(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]
