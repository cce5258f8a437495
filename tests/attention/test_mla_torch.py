"""Multi-head latent attention over a paged latent cache: the exact form (up-projected keys and values) and the
absorbed form of the decode steps both equal a float64 loop written from the definition."""

from __future__ import annotations

import torch

from trident.attention.base import AttentionMetadata, DecodeBatch, LayerKVCache
from trident.attention.mla_torch import MlaShape, mla_attention

SHAPE = MlaShape(num_heads=3, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)
BLOCK = 4


def _reference(q_nope, q_rope, slots_per_seq, cache, weight, scale):
    """Per sequence and head: keys (c W_UK^T, rope key) and values c W_UV^T of its cached tokens, softmax(q k / s) v."""
    w = weight.view(SHAPE.num_heads, SHAPE.qk_nope_head_dim + SHAPE.v_head_dim, SHAPE.kv_lora_rank)
    flat = cache.view(-1, cache.shape[-1])
    out = torch.empty(len(slots_per_seq), SHAPE.num_heads, SHAPE.v_head_dim, dtype=torch.float64)
    for b, slots in enumerate(slots_per_seq):
        c, k_rope = flat[slots, : SHAPE.kv_lora_rank], flat[slots, SHAPE.kv_lora_rank:]
        for h in range(SHAPE.num_heads):
            k = torch.cat((c @ w[h, : SHAPE.qk_nope_head_dim].T, k_rope), dim=-1)
            v = c @ w[h, SHAPE.qk_nope_head_dim:].T
            q = torch.cat((q_nope[b, h], q_rope[b, h]))
            out[b, h] = torch.softmax(k @ q * scale, dim=0) @ v
    return out


def test_decode_exact_and_absorbed_forms_equal_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, latent = 6, SHAPE.kv_lora_rank + SHAPE.qk_rope_head_dim
    cache = torch.randn(1, num_blocks, BLOCK, latent, generator=gen, dtype=torch.float64)
    weight = torch.randn(SHAPE.num_heads * (SHAPE.qk_nope_head_dim + SHAPE.v_head_dim), SHAPE.kv_lora_rank,
                         generator=gen, dtype=torch.float64)
    tables = torch.tensor([[3, 1, 5], [0, 2, 4]])
    lens = torch.tensor([9, 11])
    q_nope = torch.randn(2, SHAPE.num_heads, SHAPE.qk_nope_head_dim, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(2, SHAPE.num_heads, SHAPE.qk_rope_head_dim, generator=gen, dtype=torch.float64)
    decode = DecodeBatch(token_indices=torch.arange(2), block_tables=tables, context_lens=lens,
                         query_positions=lens - 1, token_indices_are_all=True)
    meta = AttentionMetadata(slot_mapping=torch.tensor([-1, -1]), prefills=(), decode=decode, num_tokens=2)
    scale = 0.3
    slots = [[int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(int(lens[b]))] for b in range(2)]
    ref = _reference(q_nope, q_rope, slots, cache, weight, scale)
    kv_cache = LayerKVCache(cache, None)
    exact = mla_attention(q_nope, q_rope, kv_cache, meta, lambda c: c @ weight.T, SHAPE, scale)
    absorbed = mla_attention(q_nope, q_rope, kv_cache, meta, lambda c: c @ weight.T, SHAPE, scale, weight)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(absorbed, ref, rtol=1e-10, atol=1e-10)
