"""y = x W^T (+ b) with W as weight-only affine codes (int8, or int4 two per byte; see trident/quant/affine.py):
one Triton kernel, launched with matrix-vector tiles for 1 to QGEMV_MAX_ROWS rows of x (decode) and with
matrix-multiply tiles beyond (prefill, batched decode). Its torch reference is
:func:`trident.quant.affine.affine_matmul_reference` (float32 dequantization, float32 matmul).

The weight is never dequantized in memory: a program streams its rows' codes (1 byte per weight for int8,
half a byte for int4: the point, decode being bound by reading them) plus one scale (and offset) per group, and
multiplies the integer codes themselves, converted to x's dtype (every int8 and int4 code is exact in bfloat16
and float16), against x on the tensor cores with float32 accumulation. int4 codes are converted by bits rather
than by conversion instructions: the 16-bit float MAGIC + c, whose MAGIC * sum(x) is subtracted per group (see
MAGIC). The affine form is folded in per group
afterwards, in float32:

    sum_k (s q_k + b) x_k = s (q . x) + b sum(x)     over the K elements of one group,

so the inner loop stays codes times x and the scales and offsets cost one multiply-add per output and group.
A K tile of BLOCK_K is cut into SUB_K-wide sub-tiles that each lie inside one group (SUB_K divides the group
size); per channel (one group) the scale and offset are applied once at the end. int4 bytes are split into
their low and high nibbles and interleaved back into K order in registers (``tl.join``).

Matrix-vector launches (M <= QGEMV_MAX_ROWS) follow trident/kernels/gemv.py: one program per BLOCK_N weight
rows walking the whole of K, all rows of x riding along as the dot's left operand (padded to the tensor cores'
16-row tile), no split over K. Matrix-multiply launches tile M too (BLOCK_M of 32 to 128 rows) and walk the
programs in groups of GROUP_M row blocks, so that the weight columns one group reads stay in the L2.

Matrix-multiply launches may split K (split-K, SPLIT_K > 1; the default tiles split it for int8 batched decode
where the output tiles are few and K is deep, see :func:`quant_matmul_config`): a second grid axis gives each
output tile SPLIT_K programs, program s walking the s-th run of ceil(k_tiles / SPLIT_K) K tiles (the last run
shorter, or empty). Every term of the product is linear
in x (the per-group scales and offsets, the per-channel ones applied at the end, MAGIC's correction), so each
program applies them to its own sums and stores a complete float32 partial, split 0 adding the bias, in a
[SPLIT_K, M, N] buffer; a second launch, one program per REDUCE_BLOCK outputs, sums the SPLIT_K partials in
float32 and writes y in x's dtype. With SPLIT_K 1 the one launch writes y (the default tiles split int4 batched
decode in two where its launch is small).

Matrix-multiply tiles may be multiplied transposed (SWAP; the default for int4 in groups at 17 to
BATCHED_DECODE_MAX_ROWS rows): a program accumulates (W x^T)^T, [BLOCK_N, BLOCK_M], with the converted codes as the
dot's left operand, which Hopper's tensor cores (wgmma) read from registers, where the untransposed dot has them
written back to shared memory once converted; the sums are turned back once before the epilogue. Transposed,
BLOCK_N is 64 weight rows (one warp group's tile) and BLOCK_M, the row tile, may be as small as 16.

Launches depend on shapes only, never on values, and never synchronise with the host: CUDA graphs capture
them (split-K's partial buffer is allocated per call, from the graph's pool under capture). The row count is not
a specialisation key; its tile (BLOCK_M) is. Both launches are programmatic dependents (trident/kernels/pdl.py)
where the device takes them: the reduction waits for the product's partials as any kernel for the one before it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.kernels.tiling import grouped_tile
from trident.quant.affine import AffineWeight, check_affine

QGEMV_MAX_ROWS = 16
"""Most rows of x launched with matrix-vector tiles (the tensor cores' 16-row tile)."""
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
TARGET_PROGRAMS = 256
"""Matrix-vector programs to aim for: about two per multiprocessor of an H200 (132 SMs)."""
GEMM_TARGET_PROGRAMS = 128
"""Matrix-multiply programs to aim for before widening a tile: about one per multiprocessor."""
BATCHED_DECODE_MAX_ROWS = 128
"""Most rows of x for which matrix-multiply launches take batched decode's tiles (still bound by reading the
weights): int8 deep-K tiles that may split K (:func:`split_k_for`), int4 tiles multiplied transposed."""
TILE_ELEMENTS = 8192
"""Weight elements per matrix-vector K tile (BLOCK_N x BLOCK_K): 16 KB once converted to 16 bits, as gemv.py's
tiles, i.e. 8 KB of int8 or 4 KB of int4 codes read per stage."""
MAX_SUBTILES = 8
"""Most group-wide sub-tiles per K tile (each its own dot: the loop body is unrolled this many times)."""
MIN_SUB_K = 16
"""The tensor cores' K: the narrowest sub-tile a dot takes."""
GROUP_M = 8
MAX_SPLIT_K = 8
"""Most programs sharing one output tile's K loop (split-K)."""
MIN_SPLIT_K_TILES = 8
"""Fewest K tiles (of BLOCK_K) per split that the batched-decode rule divides K into."""
REDUCE_BLOCK = 1024
"""Outputs per program of the split-K reduction."""
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
"""Per activation dtype: the 16-bit pattern of a float whose last mantissa bits an int4 code can fill (bfloat16
128.0, float16 1024.0: spacing 1 there), and its value. OR-ing a code c (0..15) into the pattern gives the float
MAGIC + c exactly, with no integer-to-float conversion (which issues at a fraction of the arithmetic rate, and
at one row is what the int4 kernel spends its time on); the products' MAGIC * sum(x) is taken back off in float32."""


class TileConfig(NamedTuple):
    """Tiles and launch parameters of one product."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    """Programs sharing one output tile's K loop (1: one program walks all of K and writes y itself)."""
    swap: bool = False
    """Multiply the tile transposed, (W x^T)^T: the converted codes are the dot's left operand, which Hopper's
    tensor cores take from registers (the codes are not written back to shared memory once converted)."""


def sub_k_of(group_size: int, in_features: int, block_k: int) -> int:
    """The sub-tile width for a K tile of block_k: block_k per channel, else the largest power of two that divides
    the group size, at most block_k (0 when that is below MIN_SUB_K: the kernel cannot take the group size)."""
    if group_size == in_features:
        return block_k
    sub = min(group_size & -group_size, block_k)
    return sub if sub >= MIN_SUB_K else 0


def supports(w: AffineWeight) -> bool:
    """Whether the kernel takes this weight's group size (per channel, or a multiple of 16)."""
    return sub_k_of(w.group_size, w.in_features, 1 << 30) > 0


def split_k_for(programs: int, block_m: int, k: int, block_k: int) -> int:
    """Programs per output tile along K for a launch of ``programs`` tiles of block_m rows: the largest power of
    two keeping the launch within GEMM_TARGET_PROGRAMS programs for 64-row tiles, twice that for 32-row ones, at
    most MAX_SPLIT_K and leaving at least MIN_SPLIT_K_TILES K tiles of block_k per split (1: no split)."""
    target = GEMM_TARGET_PROGRAMS * 64 // block_m
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while (programs * split * 2 <= target and 2 * split <= MAX_SPLIT_K
           and 2 * split * MIN_SPLIT_K_TILES <= k_tiles):
        split *= 2
    return split


def quant_matmul_config(m: int, n: int, k: int, bits: int, group_size: int) -> TileConfig:
    """Tiles for y [m, n] = x [m, k] W^T, from shapes only.

    int4 up to QGEMV_MAX_ROWS rows: 8 x 512 tiles of one warp at one row, 32 x 512 of four warps beyond (measured,
    see the code).
    Matrix-vector (m <= QGEMV_MAX_ROWS): block_m the row count rounded up to a power of two; block_n the widest
    of 64, 32, 16, 8 giving TARGET_PROGRAMS programs; block_k TILE_ELEMENTS / block_n, at most K rounded up to
    a power of two and MAX_SUBTILES sub-tiles; one warp per 8 columns (1 to 4); 4 stages (the tiles are half
    or a quarter of gemv.py's bytes, so one more of them in flight).
    int8 up to BATCHED_DECODE_MAX_ROWS rows beyond that: block_m 32 / 64 for m up to 32 / beyond, K tiles of 256
    and 32 (4 stages) or 64 (3 stages) columns, the narrowest giving at most GEMM_TARGET_PROGRAMS programs; else:
    Matrix-multiply: block_m 32 / 64 / 128 for m up to 32 / 64 / beyond; block_n the widest of 128, 64, 32, 16
    giving GEMM_TARGET_PROGRAMS programs; block_k 64; 8 warps for 128 x 128 tiles, else 4; 3 stages.
    Split-K, int8 batched decode only (:func:`split_k_for`): the largest power of two keeping the launch within
    GEMM_TARGET_PROGRAMS programs of 64-row tiles (twice as many of 32-row ones) with at least MIN_SPLIT_K_TILES
    K tiles per split. Measured on an H200 (bench_quant_matmul's sweep at 32, 64 and 128 rows, int8 per channel,
    2026-11-30): a split paid only where the tiles were few and K deep: at 32 rows Llama-3-8B down 46 -> 36 us, o
    16 -> 14, Qwen3-30B-A3B o 15 -> 11; at 64 rows Qwen3-30B-A3B o 16 -> 12; it cost elsewhere (K of 2048; 64-row
    launches of 128 tiles already; the matrix-multiply rule's wide launches: Llama-3-8B gate_up at 128 rows 83 ->
    107 us), which the rule keeps unsplit.
    int4 in groups up to BATCHED_DECODE_MAX_ROWS rows beyond QGEMV_MAX_ROWS: tiles multiplied transposed (``swap``: the
    converted codes stay in registers as the tensor cores' left operand), 64 weight rows a tile, block_m 32 with K
    tiles of 256 (3 stages) up to 32 rows, else 64 with K tiles of 128 (4 stages), 4 warps, K split in two where the
    launch has at most GEMM_TARGET_PROGRAMS programs and K at least 4 tiles. Measured on an H200 (bench_quant_matmul's
    sweep at 32, 64 and 128 rows, int4 g128, Llama-3-8B's projections and Qwen3-30B-A3B's attention ones,
    2026-11-30): 1.1 to 2.6 times as fast as the untransposed tiles before (8B down at 64 rows 151 -> 60 us, qkv 66 ->
    29, gate_up at 128 rows 434 -> 190), within 4% of the fastest of the sweep's variants in 16 of the 18 cases and 5
    and 7% in the other two. The same
    tiles helped int8 only at 128 rows (8B qkv 40 -> 32 us, down 86 -> 70), which the int8 rule leaves as it is.
    Per channel int4 keeps the rules below: transposed per channel tiles (a dot accumulating across K tiles with its
    left operand in registers) came out wrong on an H200 with float16 activations and K of two tiles (Triton 3.6;
    relative errors of 20-50, bfloat16 right), while the grouped ones (each sub-tile's dot used at once) are right
    in both dtypes.
    """
    def fit_k(block_k: int) -> int:
        block_k = max(MIN_SUB_K, min(block_k, triton.next_power_of_2(k)))
        sub = sub_k_of(group_size, k, block_k) or MIN_SUB_K
        return min(block_k, MAX_SUBTILES * sub)

    if bits == 4 and m <= QGEMV_MAX_ROWS:
        # Measured on an H200 over Llama-3-8B's projections (bench_quant_matmul's sweep): int4 runs fastest with
        # narrow one-warp programs at one row (17.5 / 12.9 / 53.7 / 39.3 us for qkv / o / gate_up / down, against
        # 19.9 / 16.1 / 85.0 / 50.9 with the int8 rule below), and 32 x 512 tiles of 4 warps at 16 rows.
        if m == 1:
            return TileConfig(1, 8, fit_k(512), 1, 4)
        return TileConfig(triton.next_power_of_2(m), 32, fit_k(512), 4, 3)
    if bits == 4 and QGEMV_MAX_ROWS < m <= BATCHED_DECODE_MAX_ROWS and group_size < k:
        block_m, (block_k, stages) = (32, (256, 3)) if m <= 32 else (64, (128, 4))
        block_k = fit_k(block_k)
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
        split = 2 if programs <= GEMM_TARGET_PROGRAMS and triton.cdiv(k, block_k) >= 4 else 1
        return TileConfig(block_m, 64, block_k, 4, stages, split, swap=True)
    if m <= QGEMV_MAX_ROWS:
        block_n = 8
        for candidate in (64, 32, 16):
            if triton.cdiv(n, candidate) >= TARGET_PROGRAMS:
                block_n = candidate
                break
        return TileConfig(triton.next_power_of_2(max(m, 1)), block_n, fit_k(TILE_ELEMENTS // block_n),
                          max(1, min(block_n // 8, 4)), 4)
    if bits == 8 and m <= BATCHED_DECODE_MAX_ROWS:
        # Measured on an H200 (bench_quant_matmul's sweep at 32, 64 and 128 rows over Llama-3-8B's projections and
        # Qwen3-30B-A3B's attention ones, 2026-11-29): K tiles of 256 with the narrowest columns (32, else 64) that
        # keep the programs at most GEMM_TARGET_PROGRAMS ran fastest of 14 variants in 11 of the 12 cases this takes
        # and 9% off it in the other (e.g. 8B down at 64 rows 50 us against 101 with the rule below, Qwen3-30B o 16
        # against 28; cuBLAS on bfloat16 weights still takes 37 and 11). Wider matrices (8B gate_up) keep the rule
        # below.
        block_m = 32 if m <= 32 else 64
        for block_n, stages in ((32, 4), (64, 3)):
            programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            if programs <= GEMM_TARGET_PROGRAMS:
                block_k = fit_k(256)
                return TileConfig(block_m, block_n, block_k, 4, stages, split_k_for(programs, block_m, k, block_k))
    block_m = 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 16
    for candidate in (128, 64, 32):
        if triton.cdiv(m, block_m) * triton.cdiv(n, candidate) >= GEMM_TARGET_PROGRAMS:
            block_n = candidate
            break
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return TileConfig(block_m, block_n, fit_k(64), num_warps, 3)


def quant_matmul(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None = None, *,
                 config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] (rows contiguous, any row stride; bfloat16 or float16) -> x W^T (+ b) [M, N] in x's dtype.

    ``w``'s codes, scales and offsets contiguous, its group size per channel or a multiple of 16 (:func:`supports`);
    bias [N] of x's dtype or None. ``config`` overrides :func:`quant_matmul_config` (the benchmark's sweep). With
    split_k > 1, a float32 [split_k, M, N] buffer of partial sums is allocated and reduced into y by a second
    launch."""
    check_affine(w)
    assert x.dim() == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    assert x.dtype in ACTIVATION_DTYPES, f"x must be bfloat16 or float16, got {x.dtype}"
    num_rows, k = x.shape
    n = w.out_features
    assert k == w.in_features, f"x has {k} features, the weight {w.in_features}"
    assert w.codes.is_contiguous() and w.scales.is_contiguous()
    assert w.offsets is None or w.offsets.is_contiguous()
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous() and bias.dtype == x.dtype)
    assert supports(w), f"group size {w.group_size} is neither K nor a multiple of {MIN_SUB_K}"
    y = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return y
    group_size = w.group_size
    block_m, block_n, block_k, num_warps, num_stages, split_k, swap = config or quant_matmul_config(
        num_rows, n, k, w.bits, group_size)
    sub_k = sub_k_of(group_size, k, block_k)
    assert sub_k and block_k % sub_k == 0, f"block_k {block_k} does not suit group size {group_size}"
    assert split_k >= 1, f"split_k {split_k}"
    assert not (swap and w.scales.shape[1] == 1 and x.dtype == torch.float16), (
        "transposed per channel tiles give wrong float16 results (quant_matmul_config)")
    pdl = pdl_launch(x.device)
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(n, block_n), split_k)
    # Split K: each split's float32 partial sums in rows [s M, (s + 1) M) of one [split_k M, N] buffer.
    out = y if split_k == 1 else torch.empty((split_k * num_rows, n), dtype=torch.float32, device=x.device)
    magic_bits, magic = MAGIC[x.dtype]
    _quant_matmul_kernel[grid](
        x, w.codes, w.scales, w.offsets if w.offsets is not None else w.scales,
        bias if bias is not None else x, out, num_rows, n, k, w.scales.shape[1], group_size, x.stride(0),
        out.stride(0), INT4=w.bits == 4, MAGIC_BITS=magic_bits, MAGIC=magic, HAS_OFFSETS=w.offsets is not None,
        HAS_BIAS=bias is not None,
        PER_CHANNEL=w.scales.shape[1] == 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SUB_K=sub_k,
        GROUP_M=GROUP_M, SPLIT_K=split_k, SWAP=swap, USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages,
        launch_pdl=pdl,
    )
    if split_k > 1:
        numel = num_rows * n
        _split_k_reduce_kernel[(triton.cdiv(numel, REDUCE_BLOCK),)](
            out, y, numel, SPLIT_K=split_k, BLOCK=REDUCE_BLOCK, USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return y


@triton.jit
def codes_tile(codes_ptr, cols, col_mask, k_start, k, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                SUB_K: tl.constexpr):
    """Codes [BLOCK_N, SUB_K] of weight rows ``cols`` and K elements k_start.. (zero beyond K or N)."""
    if INT4:
        half = k // 2
        offs = k_start // 2 + tl.arange(0, SUB_K // 2)
        mask = col_mask[:, None] & (offs < half)[None, :]
        packed = tl.load(codes_ptr + cols.to(tl.int64)[:, None] * half + offs[None, :], mask=mask, other=0)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, SUB_K))
    else:
        offs = k_start + tl.arange(0, SUB_K)
        mask = col_mask[:, None] & (offs < k)[None, :]
        codes = tl.load(codes_ptr + cols.to(tl.int64)[:, None] * k + offs[None, :], mask=mask, other=0)
    return codes


# The row count changes with the batch: not specialised on, only its tile BLOCK_M is.
@triton.jit(do_not_specialize=["num_rows"])
def _quant_matmul_kernel(x_ptr, codes_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr, num_rows, n, k, num_groups,
                         group_size, stride_x, stride_y, INT4: tl.constexpr, MAGIC_BITS: tl.constexpr,
                         MAGIC: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, GROUP_M: tl.constexpr,
                         SPLIT_K: tl.constexpr, SWAP: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (tile, s) of a (tiles, SPLIT_K) grid: with SPLIT_K 1, y's tile; else the float32 partial of
    split s (K tiles s ceil(k_tiles / SPLIT_K) on, possibly none), every term linear in x (scales, offsets,
    MAGIC's correction; the bias in split 0 only), in rows s num_rows.. of y_ptr's [SPLIT_K num_rows, n].
    With SWAP the K loop accumulates the tile transposed ([BLOCK_N, BLOCK_M]: codes times x^T), turned back once
    before the epilogue."""
    wait_for_previous_grid(USE_PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, n, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K == 1:
        k_first = 0
        k_end = k
    else:
        split = tl.program_id(1)
        span = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT_K) * BLOCK_K
        k_first = split * span
        k_end = tl.minimum(k_first + span, k)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    col_mask = cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    param_ptrs = cols.to(tl.int64) * num_groups
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per channel with offsets: sum of the row
    for k_tile in range(k_first, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            k_start = k_tile + j * SUB_K
            offs_k = k_start + tl.arange(0, SUB_K)
            x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & (offs_k < k)[None, :], other=0.0)
            codes = codes_tile(codes_ptr, cols, col_mask, k_start, k, INT4, BLOCK_N, SUB_K)
            if INT4:  # MAGIC + c, exactly, by bits (see MAGIC)
                weights = (codes.to(tl.int16) | MAGIC_BITS).to(x.dtype, bitcast=True)
            else:
                weights = codes.to(tl.float32).to(x.dtype)  # exact: |code| <= 128
            if PER_CHANNEL:
                if SWAP:
                    acc = tl.dot(weights, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(weights), acc)
                if HAS_OFFSETS or INT4:
                    x_sum += tl.sum(x.to(tl.float32), axis=1)
            else:
                # The sub-tile lies in one group (SUB_K divides the group size); past K, nothing is loaded.
                in_k = col_mask & (k_start < k)
                group = k_start // group_size
                scale = tl.load(scales_ptr + param_ptrs + group, mask=in_k, other=0.0).to(tl.float32)
                if HAS_OFFSETS or INT4:
                    sub_sum = tl.sum(x.to(tl.float32), axis=1)
                if HAS_OFFSETS:
                    offset = tl.load(offsets_ptr + param_ptrs + group, mask=in_k, other=0.0).to(tl.float32)
                if SWAP:  # [BLOCK_N, BLOCK_M]: per weight row down, per row of x across
                    products = tl.dot(weights, tl.trans(x))
                    if INT4:
                        products -= MAGIC * sub_sum[None, :]
                    acc += products * scale[:, None]
                    if HAS_OFFSETS:
                        acc += offset[:, None] * sub_sum[None, :]
                else:
                    products = tl.dot(x, tl.trans(weights))
                    if INT4:
                        products -= MAGIC * sub_sum[:, None]
                    acc += products * scale[None, :]
                    if HAS_OFFSETS:
                        acc += sub_sum[:, None] * offset[None, :]
    if SWAP:
        acc = tl.trans(acc)
    if PER_CHANNEL:
        if INT4:
            acc -= MAGIC * x_sum[:, None]
        acc *= tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_OFFSETS:
            acc += x_sum[:, None] * tl.load(offsets_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        if SPLIT_K == 1:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            bias_mask = col_mask & (tl.program_id(1) == 0)
            acc += tl.load(bias_ptr + cols, mask=bias_mask, other=0.0).to(tl.float32)[None, :]
    if SPLIT_K == 1:
        y_rows = rows.to(tl.int64)
    else:
        y_rows = tl.program_id(1).to(tl.int64) * num_rows + rows
    y_ptrs = y_ptr + y_rows[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# The output count changes with the batch: not specialised on.
@triton.jit(do_not_specialize=["numel"])
def _split_k_reduce_kernel(partial_ptr, y_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """y (contiguous, numel elements) = the sum in float32 of the SPLIT_K partials [SPLIT_K, numel] of split-K's
    matrix-multiply launch, in y's dtype: BLOCK outputs per program."""
    wait_for_previous_grid(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    partial_ptrs = partial_ptr + offs
    acc = tl.load(partial_ptrs, mask=mask, other=0.0)
    for _ in tl.static_range(1, SPLIT_K):
        partial_ptrs += numel
        acc += tl.load(partial_ptrs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
