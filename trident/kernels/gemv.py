"""y = x W^T (+ b) for a few rows of x: a Triton matrix-vector kernel that streams the weight once, in one
launch, and its torch reference.

Decode at small batch is bound by reading the weights: each weight element is used once per row of x, so
the kernel's only job is to move W [N, K] from memory at the bandwidth. One program owns BLOCK_N output
columns (weight rows) and walks the whole of K in tiles of [BLOCK_N, BLOCK_K]: rows of BLOCK_K contiguous
elements (256 bytes or more), read 16 bytes a thread, so every warp-wide load covers whole cache lines.

All rows of x ride along as the left operand of one ``tl.dot`` per tile, [BLOCK_M, BLOCK_K] x [BLOCK_K,
BLOCK_N], so the weight is read once whatever the row count; the x tile is small and comes from the L2
(every program reads the same x). The tensor cores pad the rows to their 16-row tile, so rows cost nothing
up to 16. Products of 16-bit operands are exact and accumulate in float32 (float32 operands: exact
products on the FMA units); the bias is added in float32 and the result rounds once to x's dtype. Triton
software-pipelines the loads that feed ``tl.dot`` over ``num_stages`` shared-memory buffers (asynchronous
copies), which keeps several tiles in flight per program without spending registers on them.

No split over K, hence no partial sums and no reduce kernel (nor atomics on a zeroed output): the
parallelism comes from narrow column blocks instead (BLOCK_N 8 to 64: hundreds of programs for N >= 4096
on an H200's 132 multiprocessors, each streaming its own rows end to end), and the pipelined copies keep
enough bytes in flight per multiprocessor. The launch depends on shapes only, never on values: CUDA graphs
can capture it. The row count is not a specialisation key; BLOCK_M, the row count rounded up to a power of
two, is (one compile each for 1, 2, 3-4, 5-8 and 9-16 rows, as the engine's graph buckets are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid

GEMV_MAX_ROWS = 16
"""The most rows of x the kernel takes: the tensor cores' 16-row tile (mma.m16n8k16), so every row count up
to it costs one pass over the weight and the same matrix instructions."""
GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Operand dtypes the kernel takes (x, weight and bias all one of them). float32 runs on the FMA units, exact
and slower; the models' dispatch sends only 16-bit weights here."""
TILE_BYTES = 16384
"""Weight bytes per tile (pipeline stage): 16 KB. A program has num_stages - 1 tiles loading while it
multiplies one, so at 3 stages and two programs per multiprocessor ~64 KB of reads are outstanding per SM,
twice what hides the HBM latency at full bandwidth (4.8 TB/s x ~0.8 us / 132 SMs = 29 KB)."""
TARGET_PROGRAMS = 256
"""Programs to aim for: about two per multiprocessor of an H100/H200 (132 SMs), so that every SM streams."""


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] -> x W^T + b [M, N] in x's dtype: float32 math, one rounding."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for y [m, n] = x [m, k] W^T. Shapes only, never values.

    - block_n: the widest of 64, 32, 16, 8 that still gives TARGET_PROGRAMS programs (8 at the least: the
      mma instruction's N). Llama-3-8B: qkv (6144) and o/down (4096) get 16, gate_up (28672) and the LM
      head 64; Qwen3-0.6B's 1024-wide projections get 8 (128 programs, each a short stream).
    - block_k: TILE_BYTES of weight per stage, at most K rounded up to a power of two (and at least 16, the
      mma's K): 512 bf16 elements at block_n 16, 1024 at 8, 256 at 32, 128 at 64.
    - num_warps: one per 8 columns (each warp owns one mma column tile, none repeats another's work), 1 to 4.
    - num_stages: 3, two tiles loading while one multiplies (and both short-K tiles in flight at once).
    float32 halves block_k (same bytes per stage).
    """
    del m  # every row count up to GEMV_MAX_ROWS reads the same weight bytes through the same instructions
    block_n = 8
    for candidate in (64, 32, 16):
        if triton.cdiv(n, candidate) >= TARGET_PROGRAMS:
            block_n = candidate
            break
    element_bytes = torch.finfo(dtype).bits // 8
    block_k = max(16, min(TILE_BYTES // (block_n * element_bytes), triton.next_power_of_2(k)))
    num_warps = max(1, min(block_n // 8, 4))
    return block_n, block_k, num_warps, 3


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The Triton kernel: same contract as :func:`gemv_reference` for 0 to GEMV_MAX_ROWS rows of x.

    x [M, K] with contiguous rows (any row stride), weight [N, K] contiguous, bias [N] contiguous or None,
    all one dtype of GEMV_DTYPES. ``config`` overrides :func:`gemv_config` (the benchmark's sweep)."""
    assert x.dim() == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    num_rows, k = x.shape
    n = weight.shape[0]
    assert num_rows <= GEMV_MAX_ROWS, f"gemv takes at most {GEMV_MAX_ROWS} rows, got {num_rows}"
    assert weight.shape == (n, k) and weight.is_contiguous(), "weight must be [N, K] contiguous"
    assert x.dtype == weight.dtype and x.dtype in GEMV_DTYPES, f"gemv: x {x.dtype}, weight {weight.dtype}"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous() and bias.dtype == x.dtype)
    y = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return y
    block_n, block_k, num_warps, num_stages = config or gemv_config(num_rows, n, k, x.dtype)
    has_bias = bias is not None
    pdl = pdl_launch(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if has_bias else weight, y, num_rows, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=has_bias, BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # 16-bit operands ignore it
        num_warps=num_warps, num_stages=num_stages, USE_PDL=pdl, launch_pdl=pdl
    )
    return y


# The row count changes with the batch: not specialised on (Triton would compile a variant for 1 and for 16),
# only its power-of-two bucket BLOCK_M is.
@triton.jit(do_not_specialize=["num_rows"])
def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, num_rows, n, k, stride_x, stride_y,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    rows = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    col_mask = cols < n
    row_mask = rows < num_rows
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * k + offs_k[None, :]
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, k, BLOCK_K):
        k_mask = offs_k < k - k_start
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
