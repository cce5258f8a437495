"""The Triton KV-cache write kernel equals its torch reference and the reference backend's write, bit for
bit: shuffled slots, skipped padding slots (-1), strided inputs, several block sizes, head counts, head
dims and dtypes (a cast when the cache dtype differs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.attention.torch_ref import TorchAttention
from trident.kernels.kv_cache_write import write_kv, write_kv_reference

pytestmark = pytest.mark.gpu

# (input dtype, cache dtype, block_size, num_kv_heads, head_dim)
CASES = [
    (torch.bfloat16, torch.bfloat16, 16, 8, 128),
    (torch.bfloat16, torch.bfloat16, 32, 2, 64),
    (torch.float16, torch.float16, 16, 1, 256),
    (torch.float32, torch.float32, 4, 3, 24),
    (torch.float32, torch.bfloat16, 16, 4, 64),  # the cache dtype differs: a rounding cast on the way in
]


def _check(device: torch.device, in_dtype: torch.dtype, cache_dtype: torch.dtype, block_size: int,
           num_kv_heads: int, head_dim: int, num_tokens: int, num_blocks: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # key/value as strided views of one fused projection, as the model hands them over
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=g).to(in_dtype).to(device)
    key, value = fused[:, num_kv_heads: 2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.2] = -1  # padding tokens are skipped
    slots = slots.to(device)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=g).to(cache_dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(cache_dtype).to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(key, value, k_cache, v_cache, slots)
    write_kv_reference(key, value, k_ref, v_ref, slots)
    if in_dtype != cache_dtype and device.type == "cpu":  # Triton's interpreter truncates fp32 -> bf16
        torch.testing.assert_close(k_cache.float(), k_ref.float(), rtol=2**-7, atol=0)
        torch.testing.assert_close(v_cache.float(), v_ref.float(), rtol=2**-7, atol=0)
        return
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # the reference backend's head-major layout holds the same values
    k_torch = k_ref.permute(1, 0, 2, 3).contiguous()
    v_torch = v_ref.permute(1, 0, 2, 3).contiguous()
    keep = slots >= 0
    meta = AttentionMetadata(slot_mapping=slots[keep], prefills=(), decode=None, num_tokens=int(keep.sum()))
    TorchAttention().write_kv(key[keep], value[keep], LayerKVCache(k_torch, v_torch), meta)
    assert torch.equal(k_torch.permute(1, 0, 2, 3), k_cache) and torch.equal(v_torch.permute(1, 0, 2, 3), v_cache)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_write_kv_matches_reference(kernel_device, index: int) -> None:
    in_dtype, cache_dtype, block_size, num_kv_heads, head_dim = CASES[index]
    _check(kernel_device, in_dtype, cache_dtype, block_size, num_kv_heads, head_dim, num_tokens=37,
           num_blocks=-(-40 // block_size), seed=index)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 80), num_blocks=st.integers(5, 12), seed=st.integers(0, 2**16))
def test_write_kv_random_slots(kernel_device, num_tokens: int, num_blocks: int, seed: int) -> None:
    _check(kernel_device, torch.bfloat16, torch.bfloat16, 16, 2, 64, num_tokens, num_blocks, seed)


def test_write_kv_writes_nothing_else(kernel_device) -> None:
    """Only the mapped slots change, and the skipped (-1) tokens leave no trace."""
    cache = torch.full((4, 2, 8, 32), -7.0, device=kernel_device)
    other = cache.clone()
    key = torch.randn(3, 2, 32, device=kernel_device)
    write_kv(key, key, cache, other, torch.tensor([9, -1, 30], device=kernel_device))
    changed = (cache != -7.0).any(dim=(1, 3))  # [block, offset]
    assert changed.nonzero().tolist() == [[1, 1], [3, 6]]
    assert torch.equal(cache[1, :, 1], key[0]) and torch.equal(cache[3, :, 6], key[2])
    assert torch.equal(cache, other)
