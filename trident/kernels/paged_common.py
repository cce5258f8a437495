"""Pieces shared by the paged-attention kernels (decode and prefill): score scaling with optional tanh
soft-capping in Triton, and the plain torch math their references are built from.

Cache layout of these kernels: ``[num_blocks, num_kv_heads, block_size, head_dim]``, and for a quantized cache
(int8 / fp8 codes) float32 scales ``[num_blocks, num_kv_heads, block_size]``: the kernels convert a tile of
codes to the queries' dtype (exact: int8 and e4m3 values are bf16/fp16/fp32 values) and apply the key scales
to the scores and the value scales to the probabilities, in registers. Scores are kept in
the log2 domain (``exp2`` in the online softmax), so the host folds ``log2(e)`` into the scale factors
that :func:`score_factors` returns.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trident.quant.kv import dequantize_kv

LOG2E = math.log2(math.e)


def score_factors(scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """(scale_in, scale_out) for :func:`scaled_scores`: with soft-capping the raw dot product is mapped to
    ``cap * tanh(raw * scale / cap)``, without it to ``raw * scale``; both then times log2(e)."""
    if logit_softcap is None:
        return scale * LOG2E, 1.0
    return scale / logit_softcap, logit_softcap * LOG2E


def padded_head_dim(head_dim: int) -> int:
    """The head dim the attention kernels' tiles use (DIM_PAD): a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def compute_dtype(query: torch.Tensor, k_cache: torch.Tensor) -> torch.dtype:
    """The dtype the kernels' products take: the cache's, or the queries' for a cache of int8 / fp8 codes."""
    return query.dtype if k_cache.dtype in (torch.int8, torch.float8_e4m3fn) else k_cache.dtype


def kv_scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(quantized, key scales, value scales) for a kernel launch: a float cache passes its key codes as unused
    scale pointers."""
    if k_scale is None:
        return False, k_cache, k_cache
    assert v_scale is not None and k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1
    return True, k_scale, v_scale


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 caches (the reference numerics); 16-bit operands ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def scaled_scores(raw, scale_in, scale_out, USE_SOFTCAP: tl.constexpr):
    """Raw q.k products -> log2-domain scores (soft-capped when USE_SOFTCAP)."""
    if USE_SOFTCAP:
        x = raw * scale_in
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at both ends (exp overflow -> 1, underflow -> -1).
        return (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * scale_out
    else:
        return raw * scale_in


# -- torch reference math ---------------------------------------------------------------------------------

def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, length: int,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a block-major cache, as [length, kv_heads, D]
    (dequantized to float32 with ``scale`` when the cache holds codes)."""
    num_pages = -(-length // cache.shape[2])
    pages = cache[block_table[:num_pages].long()]  # [pages, kv_heads, block_size, D]
    if scale is not None:
        pages = dequantize_kv(pages, scale[block_table[:num_pages].long()], torch.float32)
    return pages.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:length]


def attend_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor,
                     scale: float, sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
    """Plain fp32 attention of one sequence: query [L, H, D] at ``query_positions`` over key/value
    [S, kv_heads, D] at positions 0..S-1 -> [L, H, D] fp32. A query at position i sees keys j with
    i - window < j <= i."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    k = key.float().repeat_interleave(group, dim=1)  # [S, H, D]
    v = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,shd->hls", query.float(), k) * scale
    if logit_softcap is not None:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    key_positions = torch.arange(key.shape[0], device=query.device)
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hls,shd->lhd", probs, v)


INT8_MAGIC: tl.constexpr = tl.constexpr(1152.0)
"""F16_CODES_NOTE. With an int8 or fp8 cache and 16-bit queries the products run in float16 on the tensor cores,
the queries converted once per program (exact for bfloat16 values in float16's range, |q| < 65504). fp8 e4m3
codes become float16 by the hardware's paired conversion (exact: e4m3 is a subset of float16). An int8 code c
becomes the float16 1152 + c by bits, one 16-bit add of 0x6480 (1024 + 128 + c, where float16's spacing is 1),
instead of an integer-to-float conversion, which issues at a fraction of the arithmetic rate: at batch 256 with
~900-token contexts that conversion made the int8 kernel 1.5x slower than the bfloat16 one (242 against 160 us
per layer on an H200) while reading half the bytes. The 1152 * sum(q) (keys) and 1152 * sum(p) (values) the
offset adds to the float32 accumulations are taken back off; their rounding is 2^-24 of 1280 * sum |q|, far below
the codes' own quantization step."""


@triton.jit
def codes_f16(codes, INT8: tl.constexpr):
    """int8 codes as the float16 INT8_MAGIC + c (exact, by bits), or fp8 e4m3 codes as float16 (exact)."""
    if INT8:
        return (codes.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)
    return codes.to(tl.float16)
