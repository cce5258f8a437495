"""Write new keys and values into the paged KV cache: a Triton kernel and its torch reference.

Cache layout (the Triton attention backend's): ``[num_blocks, num_kv_heads, block_size, head_dim]``; a quantized
cache (int8 / fp8 codes, ``trident.quant.kv``) also has float32 scales ``[num_blocks, num_kv_heads,
block_size]``, one per (slot, kv head) for the keys and one for the values. Token ``t`` goes to slot
``slot_mapping[t]`` = ``block * block_size + offset``; a negative slot marks a padding token (as CUDA-graph
batches will have) and is skipped. One program writes one token: all its key and value heads, each a contiguous
``head_dim`` run in the cache, quantized on the way in (absmax of the row, then codes) when the cache is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.quant.kv import format_of_codes, quantize_kv


@dataclass(frozen=True)
class KVStore:
    """Where a kernel that makes a step's keys and values stores them: the caches (this module's layout), the slot of
    each token (negative: skipped) and, for an 8-bit cache, the scales. The rotary kernel takes one to write the
    keys it rotates (and the values beside them) in the same launch (:func:`trident.kernels.rotary.rotary`)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def check(self) -> None:
        """Assert the layout the kernels index: one stride set for both caches, unit stride over D, scales of one
        layout with unit stride over the slots."""
        assert self.k_cache.shape == self.v_cache.shape and self.k_cache.stride() == self.v_cache.stride()
        assert self.k_cache.stride(3) == 1 and self.k_cache.dtype == self.v_cache.dtype
        assert (self.k_scale is None) == (self.v_scale is None), "give both scale tensors or neither"
        if self.k_scale is not None:
            assert self.k_scale.stride() == self.v_scale.stride() and self.k_scale.stride(2) == 1

    def scale_args(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(k_scale, v_scale, QMAX) for a launch: the caches themselves and 0 where there are no scales (unused)."""
        if self.k_scale is None:
            return self.k_cache, self.k_cache, 0.0
        return self.k_scale, self.v_scale, format_of_codes(self.k_cache.dtype).qmax


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] into their slots (negative slots skipped), quantized
    when scale tensors are given."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for new, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if scale is None:
            cache[blocks, :, offsets] = new[keep].to(cache.dtype)  # advanced indices first: [n, kv_heads, D]
            continue
        codes, scales = quantize_kv(new[keep], format_of_codes(cache.dtype))
        cache.view(torch.uint8)[blocks, :, offsets] = codes.view(torch.uint8)  # no float8 index_put on the CPU
        scale[blocks, :, offsets] = scales


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """The Triton kernel: same contract as :func:`write_kv_reference`. key/value may be strided views."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    store = KVStore(k_cache, v_cache, slot_mapping, k_scale, v_scale)
    store.check()
    assert value.shape == key.shape and key.stride(2) == 1 and value.stride(2) == 1
    quantized = k_scale is not None
    k_scale, v_scale, qmax = store.scale_args()
    pdl = pdl_launch(key.device)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        num_kv_heads, head_dim, k_cache.shape[2],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
        QUANTIZED=quantized, INT_CODES=k_cache.dtype == torch.int8, QMAX=qmax, USE_PDL=pdl, launch_pdl=pdl,
    )


@triton.jit
def _quantize_rows(x, QMAX: tl.constexpr, INT_CODES: tl.constexpr):
    """Rows [heads, D] -> (codes as float32 values, one scale per row): absmax / QMAX scaling, clamped to
    +-QMAX (saturating), then rounded to the code grid: integers, half up (INT_CODES), or e4m3 values."""
    x = x.to(tl.float32)
    scale = tl.max(tl.abs(x), 1) / QMAX
    return codes_over_scales(x, scale, QMAX, INT_CODES), scale


@triton.jit
def codes_over_scales(x, scale, QMAX: tl.constexpr, INT_CODES: tl.constexpr):
    """Rows [heads, n] of float32 x over their scales [heads] (as :func:`_quantize_rows` takes them) -> codes as
    float32 values."""
    y = tl.minimum(tl.maximum(x / tl.where(scale > 0, scale, 1.0)[:, None], -QMAX), QMAX)
    if INT_CODES:
        return tl.floor(y + 0.5)
    return _round_to_e4m3(y)


@triton.jit
def _round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded to the nearest float8 e4m3 value, ties to even, kept as float32, so the
    cast that stores it is exact: normal range, keep 3 of float32's 23 mantissa bits (adding half a step
    minus one, plus the kept lowest bit, carries into the exponent as it should); below 2^-6, multiples of
    e4m3's subnormal step 2^-9. Done by hand because Triton 3.6's interpreter drops that carry."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # -0x100000: the sign, exponent and 3 top bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = tl.floor(y * 512.0 + 0.5) / 512.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ch, stride_cs, stride_sb, stride_sh,
                     num_kv_heads, head_dim, block_size,
                     HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, QUANTIZED: tl.constexpr,
                     INT_CODES: tl.constexpr, QMAX: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, DIM_PAD)
        head_mask = heads < num_kv_heads
        mask = head_mask[:, None] & (dims[None, :] < head_dim)
        cache_offsets = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
        k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask, other=0.0)
        v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask,
                    other=0.0)
        if QUANTIZED:
            scale_offsets = block * stride_sb + heads * stride_sh + offset
            k, k_scale = _quantize_rows(k, QMAX, INT_CODES)
            tl.store(k_scale_ptr + scale_offsets, k_scale, mask=head_mask)
            v, v_scale = _quantize_rows(v, QMAX, INT_CODES)
            tl.store(v_scale_ptr + scale_offsets, v_scale, mask=head_mask)
        tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
