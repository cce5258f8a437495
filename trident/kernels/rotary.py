"""Rotary position embedding of queries and keys in place, in one launch, optionally after a per-head
RMSNorm (Qwen3's and Gemma 3's q_norm / k_norm): a Triton kernel and its torch reference.

Layout: Hugging Face's half split. With ``x1, x2`` the two halves of a head and ``c, s`` the cosine and
sine of ``angle[i] = position * inv_freq[i]`` (i < head_dim / 2), a head becomes
``(x1 * c - x2 * s, x2 * c + x1 * s)``. The angle is the float32 product, as Hugging Face computes it;
the kernel takes cos and sin of it in float32, rotates in float32 and rounds once to the input dtype, so
no cos/sin tables are built or read. On NVIDIA GPUs Triton 3.6 lowers tl.cos / tl.sin to libdevice's
full-range __nv_cosf / __nv_sinf, not to the fast approximations that are accurate only near [-pi, pi]
(checked in the sm_90 PTX); tests/kernels/test_rotary.py checks angles up to 400,000 radians. The
per-head norm is the same arithmetic as :func:`trident.kernels.rms_norm.rms_norm_reference` (rounded to
the input dtype before the rotation, as the unfused model stores it).

One program handles one token's query heads or its key heads, HEADS_PER_PROGRAM at a time: a decode step at batch 1
is a handful of programs side by side (one program doing all 32 + 8 heads of a Llama-3-8B token took 3.6 us on an
H200, its key loads waiting behind its query stores: the two views may alias). Queries and keys may be
strided views of the fused qkv projection (any token and head stride, each head contiguous). The launch
depends on shapes only: CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.kv_cache_write import KVStore, codes_over_scales
from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.kernels.rms_norm import rms_norm_reference

HEADS_PER_PROGRAM = 8
"""Heads (all of one token, all queries or all keys) one program rotates."""


def rotary_reference(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                     eps: float = 0.0, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """query [T, Hq, D], key [T, Hk, D], positions [T], inv_freq [D / 2] float32 -> new rotated
    (query, key), each first normalised per head when its norm weight [D] is given."""
    angle = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rotate(x: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
        if norm_weight is not None:
            x = rms_norm_reference(x, norm_weight, eps, unit_offset)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(query, q_norm_weight), rotate(key, k_norm_weight)


def rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
           eps: float = 0.0, unit_offset: bool = False, value: torch.Tensor | None = None,
           store: KVStore | None = None) -> None:
    """The Triton kernel: :func:`rotary_reference`'s result written over query and key in place. Both
    norm weights are given (Qwen3, Gemma 3) or neither. With ``store`` (and ``value`` [T, Hk, D]) the same launch
    also writes the rotated keys and the values into the paged cache, as
    :func:`trident.kernels.kv_cache_write.write_kv` would after it (quantized for an 8-bit cache: the same codes and
    scales, bit for bit): one launch a layer fewer."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    assert key.shape == (num_tokens, num_k_heads, head_dim) and key.dtype == query.dtype
    assert query.stride(2) == 1 and key.stride(2) == 1, "each head must be contiguous"
    assert head_dim % 2 == 0 and inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    assert positions.shape == (num_tokens,) and inv_freq.is_contiguous()
    qk_norm = q_norm_weight is not None
    assert qk_norm == (k_norm_weight is not None), "give both norm weights or neither"
    if qk_norm:
        for w in (q_norm_weight, k_norm_weight):
            assert w.shape == (head_dim,) and w.is_contiguous() and w.dtype == query.dtype
    assert (value is None) == (store is None), "give the values with the store, or neither"
    if store is not None:
        store.check()
        assert value.shape == key.shape and value.stride(2) == 1 and store.slot_mapping.shape == (num_tokens,)
        assert store.k_cache.shape[1] == num_k_heads and store.k_cache.shape[3] == head_dim
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    heads_per_program = min(HEADS_PER_PROGRAM, triton.next_power_of_2(max(num_q_heads, num_k_heads)))
    q_programs = triton.cdiv(num_q_heads, heads_per_program)
    pdl = pdl_launch(query.device)
    if store is None:  # unused pointers and strides
        v_ptr, k_cache, v_cache, slots, k_scale, v_scale, qmax = key, key, key, positions, key, key, 0.0
        v_strides, cache_strides, scale_strides, block_size = key.stride()[:2], (0, 0, 0), (0, 0), 1
    else:
        v_ptr, k_cache, v_cache, slots = value, store.k_cache, store.v_cache, store.slot_mapping
        k_scale, v_scale, qmax = store.scale_args()
        v_strides, cache_strides, scale_strides = value.stride()[:2], k_cache.stride()[:3], k_scale.stride()[:2]
        block_size = k_cache.shape[2]
    _rotary_kernel[(num_tokens, q_programs + triton.cdiv(num_k_heads, heads_per_program))](
        query, key, positions, inv_freq,
        q_norm_weight if qk_norm else inv_freq, k_norm_weight if qk_norm else inv_freq,
        v_ptr, k_cache, v_cache, k_scale, v_scale, slots,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), *v_strides, *cache_strides, *scale_strides,
        num_q_heads, num_k_heads, q_programs, half, eps, block_size,
        QK_NORM=qk_norm, UNIT_OFFSET=unit_offset, H_PAD=heads_per_program, HALF_PAD=half_pad,
        STORE=store is not None, QUANTIZED=store is not None and store.k_scale is not None,
        INT_CODES=store is not None and store.k_cache.dtype == torch.int8, QMAX=qmax,
        num_warps=min(max(heads_per_program * half_pad // 512, 1), 8), USE_PDL=pdl, launch_pdl=pdl
    )


@triton.jit
def _rotate_heads(base_ptr, norm_weight_ptr, stride_head, num_heads, half, eps, cos, sin, dims,
                  QK_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, H_PAD: tl.constexpr):
    """Normalise (if QK_NORM) and rotate the ``num_heads`` heads at base_ptr, in place."""
    heads = tl.arange(0, H_PAD)
    dim_mask = dims < half
    mask = (heads[:, None] < num_heads) & dim_mask[None, :]
    first = base_ptr + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + half, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if QK_NORM:
        mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)
        scale = tl.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_weight_ptr + half + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
        if UNIT_OFFSET:
            x1 = (x1 * scale * (1.0 + w1)).to(dtype).to(tl.float32)
            x2 = (x2 * scale * (1.0 + w2)).to(dtype).to(tl.float32)
        else:
            x1 = ((x1 * scale).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            x2 = ((x2 * scale).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    r1 = (x1 * c - x2 * s).to(dtype)
    r2 = (x2 * c + x1 * s).to(dtype)
    tl.store(first, r1, mask=mask)
    tl.store(first + half, r2, mask=mask)
    return r1, r2


@triton.jit
def _store_heads(cache_ptr, scale_ptr, x1, x2, mask, head_mask, cache_offsets, scale_offsets, half,
                 QUANTIZED: tl.constexpr, INT_CODES: tl.constexpr, QMAX: tl.constexpr):
    """Heads given as their halves x1, x2 [H_PAD, HALF_PAD] into their cache rows (kv_cache_write's layout), as
    codes over one absmax scale per head when QUANTIZED (kv_cache_write._quantize_rows on the whole head)."""
    if QUANTIZED:
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1)) / QMAX
        x1 = codes_over_scales(x1, scale, QMAX, INT_CODES)
        x2 = codes_over_scales(x2, scale, QMAX, INT_CODES)
        tl.store(scale_ptr + scale_offsets, scale, mask=head_mask)
    tl.store(cache_ptr + cache_offsets, x1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + cache_offsets + half, x2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, inv_freq_ptr, q_norm_ptr, k_norm_ptr,
                   v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_cb, stride_ch, stride_cs, stride_sb, stride_sh,
                   num_q_heads, num_k_heads, q_programs, half, eps, block_size,
                   QK_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
                   H_PAD: tl.constexpr, HALF_PAD: tl.constexpr, STORE: tl.constexpr, QUANTIZED: tl.constexpr,
                   INT_CODES: tl.constexpr, QMAX: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    position = tl.load(positions_ptr + token).to(tl.float32)
    dims = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < half, other=0.0)
    angle = position * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if block < q_programs:
        first = block * H_PAD
        _rotate_heads(q_ptr + token * stride_qt + first * stride_qh, q_norm_ptr, stride_qh, num_q_heads - first,
                      half, eps, cos, sin, dims, QK_NORM, UNIT_OFFSET, H_PAD)
    else:
        first = (block - q_programs) * H_PAD
        k1, k2 = _rotate_heads(k_ptr + token * stride_kt + first * stride_kh, k_norm_ptr, stride_kh,
                               num_k_heads - first, half, eps, cos, sin, dims, QK_NORM, UNIT_OFFSET, H_PAD)
        if STORE:
            slot = tl.load(slot_ptr + token)
            if slot >= 0:
                heads = tl.arange(0, H_PAD)
                head_mask = heads < num_k_heads - first
                mask = head_mask[:, None] & (dims[None, :] < half)
                page = slot // block_size
                offset = slot % block_size
                rows = page * stride_cb + offset * stride_cs + (first + heads) * stride_ch
                cache_offsets = rows[:, None] + dims[None, :]
                scale_offsets = page * stride_sb + (first + heads) * stride_sh + offset
                _store_heads(k_cache_ptr, k_scale_ptr, k1, k2, mask, head_mask, cache_offsets, scale_offsets, half,
                             QUANTIZED, INT_CODES, QMAX)
                value = v_ptr + token * stride_vt + (first + heads)[:, None] * stride_vh + dims[None, :]
                v1 = tl.load(value, mask=mask, other=0.0)
                v2 = tl.load(value + half, mask=mask, other=0.0)
                _store_heads(v_cache_ptr, v_scale_ptr, v1, v2, mask, head_mask, cache_offsets, scale_offsets, half,
                             QUANTIZED, INT_CODES, QMAX)
