"""Write new keys and values into the paged KV cache: a Triton kernel and its torch reference.

Cache layout (the Triton attention backend's): ``[num_blocks, num_kv_heads, block_size, head_dim]``.
Token ``t`` goes to slot ``slot_mapping[t]`` = ``block * block_size + offset``; a negative slot marks a
padding token (as CUDA-graph batches will have) and is skipped. One program writes one token: all its
key and value heads, each a contiguous ``head_dim`` run in the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] into their slots (negative slots skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for new, cache in ((key, k_cache), (value, v_cache)):
        cache[blocks, :, offsets] = new[keep].to(cache.dtype)  # advanced indices first: [n, kv_heads, D]


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The Triton kernel: same contract as :func:`write_kv_reference`. key/value may be strided views."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert value.shape == key.shape and k_cache.shape == v_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert key.stride(2) == 1 and value.stride(2) == 1
    pdl = pdl_launch(key.device)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[2],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
        USE_PDL=pdl, launch_pdl=pdl,
    )


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ch, stride_cs,
                     num_kv_heads, head_dim, block_size,
                     HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, DIM_PAD)
        mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim)
        cache_offsets = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
        k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
