"""W8A8 on the GPU: y = (x quantized per token) (W int8 per channel)^T, in two Triton kernels. Their torch
references are in :mod:`trident.quant.w8a8` (:func:`~trident.quant.w8a8.quantize_per_token` and
:func:`~trident.quant.w8a8.w8a8_matmul_reference`).

1. :func:`quantize_rows`: one program per row of x (any float dtype, rows contiguous, any row stride) reads the row
   twice in BLOCK_K chunks: the first pass takes its absmax, the scale is ``absmax / 127`` (float32), the second
   writes the codes ``clamp(floor(x / scale + 0.5), -127, 127)`` as int8 (a zero row: scale 0, codes 0). Both
   divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` on float32 is an approximate
   division on NVIDIA GPUs), so the codes and scales equal the torch reference's bit for bit.
2. :func:`w8a8_matmul`: int8 codes of x [M, K] times int8 codes of W [N, K] with ``tl.dot`` into an int32
   accumulator (the int8 tensor cores: exact, |sum| <= K * 127^2 < 2^31 for K < 133,000), then the epilogue in
   float32: ``acc * x_scale[m] * w_scale[n] (+ bias[n])``, stored in the output dtype. Tiles are fixed by M, not
   autotuned: decode (M <= DECODE_MAX_ROWS, bound by reading the weight) 16 rows x the widest of 64 / 32 / 16
   columns giving DECODE_TARGET_PROGRAMS programs x 128 of K, 4 warps, 4 stages; larger M 64 / 128 rows x 128
   columns (64 when that gives fewer than GEMM_TARGET_PROGRAMS programs) x 64 of K, 8 warps for 128 x 128 tiles,
   3 stages. Programs run in groups of GROUP_M row blocks (the
   weight columns one group reads stay in the L2), as trident/kernels/quant_matmul.py.

Launches depend on shapes only and never synchronise with the host (CUDA graphs capture them); the row count is
not a specialisation key.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.kernels.tiling import grouped_tile

QMAX = 127
"""Largest code magnitude: symmetric int8 codes -127..127."""
DECODE_MAX_ROWS = 16
"""Most rows launched with the decode tiles."""
DECODE_TARGET_PROGRAMS = 256
"""Decode programs to aim for: about two per multiprocessor of an H200 (132 SMs), as quant_matmul.py's
matrix-vector launches (each streams its own columns of the weight; no split over K)."""
GEMM_TARGET_PROGRAMS = 128
"""Larger-M programs to aim for before narrowing a tile: about one per multiprocessor."""
GROUP_M = 8
MAX_ROW_BLOCK = 2048
"""Elements of a row the quantization kernel reads per step."""
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class W8A8Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def w8a8_config(m: int, n: int, k: int) -> W8A8Tiles:
    """The tiles of y [m, n] = x [m, k] W^T (see the module docstring), from shapes only; every size a power
    of two, block_k at least 32 (the int8 mma's K)."""
    if m <= DECODE_MAX_ROWS:
        block_n = next((b for b in (64, 32) if triton.cdiv(n, b) >= DECODE_TARGET_PROGRAMS), 16)
        return W8A8Tiles(16, block_n, 128, 4, 4)
    block_m = 64 if m <= 64 else 128
    block_n = 128 if triton.cdiv(m, block_m) * triton.cdiv(n, 128) >= GEMM_TARGET_PROGRAMS else 64
    return W8A8Tiles(block_m, block_n, 64, 8 if block_m * block_n >= 128 * 128 else 4, 3)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous) -> (codes int8 [M, K] contiguous, scales float32 [M]); see the module
    docstring."""
    assert x.dim() == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    num_rows, k = x.shape
    codes = torch.empty((num_rows, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return codes, scales
    block_k = min(triton.next_power_of_2(max(k, 1)), MAX_ROW_BLOCK)
    pdl = pdl_launch(x.device)
    _quantize_rows_kernel[(num_rows,)](x, codes, scales, k, x.stride(0), BLOCK_K=block_k, USE_PDL=pdl,
                                       num_warps=4 if block_k >= 1024 else 2 if block_k >= 256 else 1,
                                       launch_pdl=pdl)
    return codes, scales


def w8a8_matmul(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                config: W8A8Tiles | None = None) -> torch.Tensor:
    """(x_codes [M, K] int8 contiguous, x_scales [M] float32) times (w_codes [N, K] int8 contiguous, w_scales [N]
    float32) (+ bias [N] of ``out_dtype``) -> y [M, N] in ``out_dtype``. ``config`` overrides :func:`w8a8_config`."""
    assert x_codes.dtype == torch.int8 and w_codes.dtype == torch.int8
    assert x_codes.is_contiguous() and w_codes.is_contiguous()
    num_rows, k = x_codes.shape
    n = w_codes.shape[0]
    assert w_codes.shape[1] == k, f"x has {k} features, the weight {w_codes.shape[1]}"
    assert x_scales.shape == (num_rows,) and x_scales.dtype == torch.float32 and x_scales.is_contiguous()
    assert w_scales.shape == (n,) and w_scales.dtype == torch.float32 and w_scales.is_contiguous()
    assert out_dtype in OUTPUT_DTYPES, f"output dtype {out_dtype} is not one of {OUTPUT_DTYPES}"
    assert bias is None or (bias.shape == (n,) and bias.dtype == out_dtype and bias.is_contiguous())
    y = torch.empty((num_rows, n), dtype=out_dtype, device=x_codes.device)
    if num_rows == 0 or n == 0:
        return y
    block_m, block_n, block_k, num_warps, num_stages = config or w8a8_config(num_rows, n, k)
    pdl = pdl_launch(x_codes.device)
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(n, block_n),)
    _w8a8_matmul_kernel[grid](
        x_codes, x_scales, w_codes, w_scales, bias if bias is not None else y, y, num_rows, n, k, y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    return y


# The row count changes with the batch: one program per row, the count is the grid, never an argument.
@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scales_ptr, k, stride_x, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    codes_row = codes_ptr + row * k
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < k, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    divisor = tl.where(scale > 0, scale, 1.0)
    for start in range(0, k, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        mask = offs < k
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.floor(tl.math.div_rn(x, divisor) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(codes_row + offs, q.to(tl.int8), mask=mask)
    tl.store(scales_ptr + row, scale)


@triton.jit(do_not_specialize=["num_rows"])
def _w8a8_matmul_kernel(x_ptr, x_scales_ptr, w_ptr, w_scales_ptr, bias_ptr, y_ptr, num_rows, n, k, stride_y,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, n, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    col_mask = cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * k
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        in_k = offs_k < k
        a = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & in_k[None, :], other=0)
        b = tl.load(w_rows + offs_k[None, :], mask=col_mask[:, None] & in_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    x_scale = tl.load(x_scales_ptr + rows, mask=row_mask, other=0.0)
    w_scale = tl.load(w_scales_ptr + cols, mask=col_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
