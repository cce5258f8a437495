"""The routed experts of an MoE layer in four launches: routing alignment, a grouped GEMM through gate|up with the
gated activation fused, a grouped GEMM through down with the routing weight fused, and the sum over the k
experts of each token. The torch reference is :class:`trident.moe.experts.TorchExperts` (and the float64 math of
the tests).

For hidden [T, H], routing weights float32 [T, k], expert ids [T, k], gate_up [E, 2I, H] (each expert's gate rows,
then its up rows) and down [E, H, I]:

1. :func:`~trident.kernels.moe_align.align_routing` (the layout: trident/moe/align.py) sorts the T k
   (token, slot) pairs by expert and pads each expert's run to whole blocks of BLOCK_M rows; every row block then
   has one expert (or none: -1, past the end).
2. ``_gate_up_kernel``: a program per (row block, BLOCK_N columns of I) gathers the hidden rows of its block's
   tokens, multiplies them by the expert's gate rows and the matching up rows (two accumulators over the same x
   tile), and writes act(gate) * up (float32 math, one rounding) to intermediate [rows, I], in the activation
   dtype, at the sorted row.
3. ``_down_kernel``: a program per (row block, BLOCK_N columns of H) multiplies the block's intermediate rows by
   the expert's down rows, scales each row by its pair's routing weight (float32) and writes it, rounded to the
   activation dtype, to out_pairs [T k, H] at the pair's own row t k + slot.
4. out = out_pairs viewed [T, k, H] summed over k (``_sum_kernel``: slot order, float32): deterministic, no
   atomics (an atomic-add combine would save the pass over out_pairs but make the sum order, and so the last
   bit, depend on scheduling).

Programs of row blocks with no expert return at once, and the aligned layout's row count is bounded by
min(T k, E) experts in use (see trident/moe/align.py), so at batch 1 (k experts, one token each) the grid is k row
blocks by the column blocks: every program streams weight rows of an active expert, and no expert's weights are read
unless a token was routed to it. Tiles depend on shapes only (:func:`moe_tiles`): decode-sized steps (a few
pairs per expert) take 16-row blocks with narrow, deep weight tiles (measured: see moe_tiles); larger steps take
64- or 128-row blocks with matrix-multiply tiles. Programs walk GROUP_M
row blocks per column block (trident/kernels/tiling.py). No split over K: with H = 2048 (Qwen3-30B-A3B) the
down projection of 8 active experts already gives 256 programs of 64 columns.

int8 experts (trident/moe/quant.py: codes int8 [E, 2I, H] / [E, H, I], float32 scales [E, 2I] / [E, H], one per
expert and output row): the same two GEMMs on the codes (the ``INT8`` specialisation). A program streams its int8
code tiles (half the bytes of a 16-bit tile: the point, a step reading every touched expert once), converts them to
the activations' dtype (every int8 value is exact in bfloat16 and float16) and multiplies them on the tensor cores
with float32 accumulation, as trident/kernels/quant_matmul.py does for Linear weights; the per-row scales then
multiply the float32 accumulators: gate's and up's separately, before the activation, and down's before the routing
weight. The scales cost one load per output column and program.

int4 experts (codes two a byte along K, stored q + 8, float32 scales [E, N, K / G] per group of G): the
``INT4`` specialisation cuts its K tiles to lie inside one group (:func:`_in_group`) and joins each byte's two
nibbles back into K order in registers. It is bound by that unpacking, not by memory: 0.7-0.9 TB/s of codes on an
H200 at 16-64 tokens, slower than the bfloat16 kernel over four times the bytes (python -m
trident.kernels.bench_moe_experts --weights int4; two dots per tile on the even and odd elements instead of the join
ran at 0.7, each element loading its own byte and shifting its nibble out at 0.1; at prefill sizes the even / odd
dots were slower still: 1,566 against 526 us at 512 tokens, and in a 15,705-token Qwen3-30B-A3B prefill step 16.7 +
10.3 ms a layer against 12.2 + 2.4, session 20). On CUDA, int4 experts go to trident/native/moe_gemv_cuda.cu at one
token and, in groups of 128 (or per channel), to trident/native/moe_batched_cuda.cu at 2 to 16,384 tokens instead;
these kernels take int4 in groups of 32 or 64 beyond one token, and a prefill-sized int4 kernel at int8's speed (2.2 +
1.1 ms a layer there) is open work. Codes become 16-bit floats by bits
(MAGIC + code, trident/kernels/quant_matmul.py's MAGIC), the constant is taken off with the rows' sums of the
activations, and each tile's products are scaled by their group's scales.

Launches depend on shapes only and never synchronise with the host: a decode step's experts are capturable in
a CUDA graph. bfloat16 and float16 activations; weights of the activations' dtype, or int8 / int4 codes with
float32 scales; the row count is not a specialisation key.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from trident.kernels.activation import KERNEL_ACTIVATIONS, activate
from trident.kernels.moe_align import align_routing
from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.kernels.quant_matmul import MAGIC, codes_tile
from trident.kernels.tiling import grouped_tile
from trident.moe.align import AlignedRouting
from trident.quant.rtn import INT4_ZERO_POINT

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
DECODE_PAIRS_PER_EXPERT = 16
"""Up to this many (token, slot) pairs per expert on average, a step runs the decode tiles (16-row blocks)."""
SUM_BLOCK = 1024
"""Columns of H per program of the sum over k."""
GROUP_M = 8
_ZERO_POINT = tl.constexpr(INT4_ZERO_POINT)


class GemmTiles(NamedTuple):
    """Tiles and launch parameters of one of the two grouped GEMMs (the row block is shared: MoeTiles.block_m)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class MoeTiles(NamedTuple):
    block_m: int
    """Rows per block of the aligned layout (both GEMMs run over the same layout)."""
    gate_up: GemmTiles
    """The gate|up GEMM: BLOCK_N columns of I (each program computes them for gate and for up), K = H."""
    down: GemmTiles
    """The down GEMM: BLOCK_N columns of H, K = I."""


def moe_tiles(num_pairs: int, num_experts: int, hidden_size: int, intermediate_size: int) -> MoeTiles:
    """Tiles for num_pairs = T k routed pairs over num_experts experts, from shapes only; int8 codes take the same
    tiles as bfloat16 / float16 weights.

    block_m: 16 up to DECODE_PAIRS_PER_EXPERT pairs per expert on average, 64 up to 64, 128 beyond. Measured on an
    H200 over the Qwen3-30B-A3B layer (``python -m trident.kernels.bench_moe_experts``, 2026-11-29): 16-row blocks
    with gate|up tiles of 32 columns x 128 (4 warps, 4 stages) and down tiles of 64 x 128 (4 warps, 3 stages) ran
    fastest of nine variants at 1, 8 and 64 tokens (33.9 / 129 / 308 us, 2.2-3.9 TB/s of touched experts); at 512
    tokens (32 pairs per expert) 64-row blocks with 64 x 64 / 128 x 64 tiles (4 warps, 3 stages) did (476 us, against
    504 with 32-row blocks). 128-row blocks: 128 x 64 tiles of 8 warps.
    int8 experts (``--weights int8``, session 7): the same tiles ran fastest of nine int8 variants at 1, 16, 64 and
    512 tokens (25.7 / 122 / 189 / 444 us); K tiles twice as deep, so that a stage reads bfloat16's bytes, were
    4-8% slower (27.7 / 127 / 197 / 454 us).
    The K tiles are cut to K rounded up to a power of two (small models).
    """
    per_expert = num_pairs / num_experts
    if per_expert <= DECODE_PAIRS_PER_EXPERT:
        return MoeTiles(16, _fit(GemmTiles(32, 128, 4, 4), hidden_size), _fit(GemmTiles(64, 128, 4, 3),
                                                                           intermediate_size))
    if per_expert <= 64:
        return MoeTiles(64, _fit(GemmTiles(64, 64, 4, 3), hidden_size), _fit(GemmTiles(128, 64, 4, 3),
                                                                          intermediate_size))
    return MoeTiles(128, _fit(GemmTiles(128, 64, 8, 3), hidden_size), _fit(GemmTiles(128, 64, 8, 3),
                                                                         intermediate_size))


def _fit(tiles: GemmTiles, k: int) -> GemmTiles:
    return tiles._replace(block_k=max(16, min(tiles.block_k, triton.next_power_of_2(k))))


def _in_group(tiles: GemmTiles, k: int, groups: int) -> GemmTiles:
    """int4 tiles whose K tiles each lie inside one group of k / groups (per channel: any tile), at least 32 deep
    (groups are)."""
    if groups == 1:
        return tiles._replace(block_k=max(tiles.block_k, 32))
    group = k // groups
    block_k = min(tiles.block_k, group & -group)
    assert block_k >= 32, f"int4 experts' group size {group} needs a power-of-two factor of at least 32"
    return tiles._replace(block_k=block_k)


def fused_experts(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, activation: str, *, gate_up_scales: torch.Tensor | None = None,
                  down_scales: torch.Tensor | None = None, tiles: MoeTiles | None = None) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t), e = expert_ids[t, j] -> [T, H] in
    hidden's dtype.

    hidden [T, H] (rows contiguous, any row stride), weights float32 [T, k], expert_ids int [T, k] (distinct per
    token, in [0, E)), gate_up [E, 2I, H] and down [E, H, I] contiguous, of hidden's dtype (bfloat16 or
    float16), or int8 codes with ``gate_up_scales`` float32 [E, 2I] and ``down_scales`` float32 [E, H] (both or
    neither; weight = code * scale of its row, trident/moe/quant.py). ``tiles`` overrides :func:`moe_tiles` (the
    benchmark's sweep, the tests)."""
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"fused_experts: no kernel for {activation!r}; have {', '.join(KERNEL_ACTIVATIONS)}")
    assert hidden.dim() == 2 and hidden.stride(1) == 1, "rows of hidden must be contiguous"
    assert hidden.dtype in ACTIVATION_DTYPES, f"hidden must be bfloat16 or float16, got {hidden.dtype}"
    quantized = gate_up_scales is not None
    assert (down_scales is not None) == quantized, "quantized experts need both gate_up_scales and down_scales"
    bits = (8 if gate_up.dtype == torch.int8 else 4) if quantized else 16
    weight_dtype = {16: hidden.dtype, 8: torch.int8, 4: torch.uint8}[bits]
    assert gate_up.dtype == down.dtype == weight_dtype, \
        f"experts' weights must be {weight_dtype} (got {gate_up.dtype}, {down.dtype})"
    assert gate_up.is_contiguous() and down.is_contiguous()
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    intermediate = two_i // 2
    per_byte = 2 if bits == 4 else 1
    assert gate_up.shape == (num_experts, 2 * intermediate, hidden_size // per_byte)
    assert down.shape == (num_experts, hidden_size, intermediate // per_byte)
    if quantized:
        groups = (gate_up_scales.shape[2], down_scales.shape[2]) if bits == 4 else (1, 1)
        assert gate_up_scales.shape[:2] == (num_experts, 2 * intermediate) and gate_up_scales.is_contiguous()
        assert down_scales.shape[:2] == (num_experts, hidden_size) and down_scales.is_contiguous()
        assert gate_up_scales.dtype == down_scales.dtype == torch.float32, "experts' scales must be float32"
        assert gate_up_scales.dim() == down_scales.dim() == (3 if bits == 4 else 2)
    top_k = expert_ids.shape[1]
    assert expert_ids.shape == weights.shape == (num_tokens, top_k)
    assert weights.dtype == torch.float32
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    num_pairs = num_tokens * top_k
    tiles = tiles or moe_tiles(num_pairs, num_experts, hidden_size, intermediate)
    if bits == 4:  # a K tile lies inside one group
        tiles = tiles._replace(gate_up=_in_group(tiles.gate_up, hidden_size, groups[0]),
                               down=_in_group(tiles.down, intermediate, groups[1]))
    aligned = align_routing(expert_ids.contiguous(), num_experts, tiles.block_m)
    inter = _gate_up(hidden, gate_up, gate_up_scales, bits, aligned, top_k, intermediate, activation, tiles)
    out_pairs = _down(inter, down, down_scales, bits, aligned, weights.contiguous(), num_pairs, tiles)
    if top_k == 1:
        return out_pairs
    return sum_over_k(out_pairs, num_tokens, top_k, hidden_size)


def sum_over_k(out_pairs: torch.Tensor, num_tokens: int, top_k: int, hidden_size: int) -> torch.Tensor:
    """out [T, H]: each token's k rows of out_pairs [T k, H] added in slot order in float32 (one launch; torch's sum
    over a middle axis took 5 us for one token on an H200). Also the last launch of the batched CUDA int4 experts
    (trident/native/moe_batched_cuda.py)."""
    out = torch.empty((num_tokens, hidden_size), dtype=out_pairs.dtype, device=out_pairs.device)
    block = min(SUM_BLOCK, triton.next_power_of_2(hidden_size))
    pdl = pdl_launch(out.device)
    _sum_kernel[(num_tokens, triton.cdiv(hidden_size, block))](out_pairs, out, hidden_size, TOP_K=top_k, BLOCK=block,
                                                               USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def _gate_up(hidden: torch.Tensor, gate_up: torch.Tensor, scales: torch.Tensor | None, bits: int,
             aligned: AlignedRouting, top_k: int, intermediate: int, activation: str, tiles: MoeTiles) -> torch.Tensor:
    """intermediate [rows, I]: act(gate) * up of the sorted rows (padding rows: 0). ``scales``: the codes' (``bits``
    8 or 4; 16: none)."""
    rows = aligned.sorted_pairs.numel()
    hidden_size = hidden.shape[1]
    inter = torch.empty((rows, intermediate), dtype=hidden.dtype, device=hidden.device)
    t = tiles.gate_up
    pdl = pdl_launch(hidden.device)
    grid = (rows // tiles.block_m * triton.cdiv(intermediate, t.block_n),)
    magic_bits, magic = MAGIC[hidden.dtype]
    _gate_up_kernel[grid](
        hidden, gate_up, gate_up if scales is None else scales, aligned.sorted_pairs, aligned.block_experts, inter,
        rows, intermediate, hidden_size, hidden.stride(0), 1 if bits != 4 else scales.shape[2], TOP_K=top_k,
        ACTIVATION=activation, INT8=bits == 8, INT4=bits == 4, MAGIC_BITS=magic_bits, MAGIC=magic,
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, EVEN_K=hidden_size % t.block_k == 0, GROUP_M=GROUP_M, USE_PDL=pdl,
        num_warps=t.num_warps, num_stages=t.num_stages, launch_pdl=pdl,
    )
    return inter


def _down(inter: torch.Tensor, down: torch.Tensor, scales: torch.Tensor | None, bits: int, aligned: AlignedRouting,
          weights: torch.Tensor, num_pairs: int, tiles: MoeTiles) -> torch.Tensor:
    """out_pairs [T k, H]: each pair's expert output times its routing weight, at row t k + slot. ``scales``: the
    codes' (``bits`` 8 or 4; 16: none)."""
    rows, intermediate = inter.shape
    hidden_size = down.shape[1]
    out_pairs = torch.empty((num_pairs, hidden_size), dtype=inter.dtype, device=inter.device)
    t = tiles.down
    pdl = pdl_launch(inter.device)
    grid = (rows // tiles.block_m * triton.cdiv(hidden_size, t.block_n),)
    magic_bits, magic = MAGIC[inter.dtype]
    _down_kernel[grid](
        inter, down, down if scales is None else scales, aligned.sorted_pairs, aligned.block_experts, weights,
        out_pairs, rows, hidden_size, intermediate, 1 if bits != 4 else scales.shape[2], INT8=bits == 8,
        INT4=bits == 4, MAGIC_BITS=magic_bits, MAGIC=magic, BLOCK_M=tiles.block_m,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, EVEN_K=intermediate % t.block_k == 0, GROUP_M=GROUP_M, USE_PDL=pdl,
        num_warps=t.num_warps, num_stages=t.num_stages, launch_pdl=pdl,
    )
    return out_pairs


# The row count changes with the batch: not specialised on, only its tile BLOCK_M is.
@triton.jit(do_not_specialize=["num_rows"])
def _gate_up_kernel(hidden_ptr, gate_up_ptr, scales_ptr, sorted_pairs_ptr, block_experts_ptr, inter_ptr, num_rows, n,
                    k, stride_hidden, num_groups, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, INT8: tl.constexpr,
                    INT4: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
                    USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, n, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:  # past the last expert's rows
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs >= 0
    tokens = tl.where(valid, pairs, 0) // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = hidden_ptr + tokens.to(tl.int64)[:, None] * stride_hidden
    if INT4:
        acc_gate, acc_up = _gate_up_int4(x_rows, valid, gate_up_ptr, scales_ptr, expert, cols, col_mask, n, k,
                                         num_groups, MAGIC_BITS, MAGIC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc_gate, acc_up = _gate_up_dense(x_rows + offs_k[None, :], valid, offs_k, gate_up_ptr, scales_ptr, expert,
                                          cols, col_mask, n, k, INT8, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
    out = activate(acc_gate, ACTIVATION) * acc_up
    out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(out_ptrs, out.to(inter_ptr.dtype.element_ty), mask=col_mask[None, :])


@triton.jit
def _gate_up_dense(x_ptrs, valid, offs_k, gate_up_ptr, scales_ptr, expert, cols, col_mask, n, k, INT8: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(gate, up) float32 [BLOCK_M, BLOCK_N] of 16-bit weights, or of int8 codes times their rows' scales."""
    gate_ptrs = gate_up_ptr + expert.to(tl.int64) * 2 * n * k + cols.to(tl.int64)[:, None] * k + offs_k[None, :]
    up_ptrs = gate_ptrs + n * k  # the up rows follow the expert's n gate rows
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            gate = tl.load(gate_ptrs, mask=col_mask[:, None], other=0)
            up = tl.load(up_ptrs, mask=col_mask[:, None], other=0)
        else:
            in_k = (start + offs_k < k)[None, :]
            x = tl.load(x_ptrs, mask=valid[:, None] & in_k, other=0.0)
            gate = tl.load(gate_ptrs, mask=col_mask[:, None] & in_k, other=0)
            up = tl.load(up_ptrs, mask=col_mask[:, None] & in_k, other=0)
        if INT8:  # codes -> the activations' dtype, exactly
            gate = gate.to(x.dtype)
            up = up.to(x.dtype)
        acc_gate = tl.dot(x, tl.trans(gate), acc_gate)
        acc_up = tl.dot(x, tl.trans(up), acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if INT8:  # each output column's gate and up rows have their own scales
        scale_ptrs = scales_ptr + expert.to(tl.int64) * 2 * n + cols
        acc_gate *= tl.load(scale_ptrs, mask=col_mask, other=0.0)[None, :]
        acc_up *= tl.load(scale_ptrs + n, mask=col_mask, other=0.0)[None, :]
    return acc_gate, acc_up


@triton.jit
def _gate_up_int4(x_rows, valid, gate_up_ptr, scales_ptr, expert, cols, col_mask, n, k, num_groups,
                  MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(gate, up) float32 [BLOCK_M, BLOCK_N] of packed int4 codes with a scale per (row, group) (_int4_products);
    ``x_rows`` [BLOCK_M, 1]: the rows' first elements."""
    gate_codes = gate_up_ptr + expert.to(tl.int64) * 2 * n * (k // 2)
    up_codes = gate_codes + n * (k // 2)
    gate_scales = scales_ptr + expert.to(tl.int64) * 2 * n * num_groups + cols.to(tl.int64) * num_groups
    up_scales = gate_scales + n * num_groups
    group_size = k // num_groups
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, k, BLOCK_K):
        x = tl.load(x_rows + start + offs_k[None, :], mask=valid[:, None] & (start + offs_k < k)[None, :], other=0.0)
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        group = start // group_size
        acc_gate += _int4_products(x, x_sum, gate_codes, gate_scales + group, cols, col_mask, start, k, MAGIC_BITS,
                                   MAGIC, BLOCK_N, BLOCK_K)
        acc_up += _int4_products(x, x_sum, up_codes, up_scales + group, cols, col_mask, start, k, MAGIC_BITS, MAGIC,
                                 BLOCK_N, BLOCK_K)
    return acc_gate, acc_up


@triton.jit(do_not_specialize=["num_rows"])
def _down_kernel(inter_ptr, down_ptr, scales_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr, out_ptr,
                 num_rows, n, k, num_groups, INT8: tl.constexpr, INT4: tl.constexpr, MAGIC_BITS: tl.constexpr,
                 MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GROUP_M: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_rows, n, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    offs_k = tl.arange(0, BLOCK_K)
    # every row of a block in use was written by the gate|up kernel (padding rows as 0)
    a_rows = inter_ptr + rows.to(tl.int64)[:, None] * k
    if INT4:
        acc = _down_int4(a_rows, down_ptr, scales_ptr, expert, cols, col_mask, n, k, num_groups, MAGIC_BITS, MAGIC,
                         BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _down_dense(a_rows + offs_k[None, :], offs_k, down_ptr, scales_ptr, expert, cols, col_mask, n, k, INT8,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
    scale = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    out = acc * scale[:, None]
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_mask[None, :])


@triton.jit
def _down_dense(a_ptrs, offs_k, down_ptr, scales_ptr, expert, cols, col_mask, n, k, INT8: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N] of 16-bit down rows, or of int8 codes times their rows' scales."""
    w_ptrs = down_ptr + expert.to(tl.int64) * n * k + cols.to(tl.int64)[:, None] * k + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, mask=col_mask[:, None], other=0)
        else:
            in_k = (start + offs_k < k)[None, :]
            a = tl.load(a_ptrs, mask=in_k, other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[:, None] & in_k, other=0)
        if INT8:
            w = w.to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if INT8:  # the down rows' scales, before the routing weight
        acc *= tl.load(scales_ptr + expert.to(tl.int64) * n + cols, mask=col_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _down_int4(a_rows, down_ptr, scales_ptr, expert, cols, col_mask, n, k, num_groups, MAGIC_BITS: tl.constexpr,
               MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N] of packed int4 down codes with a scale per (row, group) (_int4_products);
    ``a_rows`` [BLOCK_M, 1]: the intermediate rows' first elements."""
    codes = down_ptr + expert.to(tl.int64) * n * (k // 2)
    row_scales = scales_ptr + expert.to(tl.int64) * n * num_groups + cols.to(tl.int64) * num_groups
    group_size = k // num_groups
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        # every row of a block in use was written by the gate|up kernel (padding rows as 0)
        a = tl.load(a_rows + start + offs_k[None, :], mask=(start + offs_k < k)[None, :], other=0.0)
        acc += _int4_products(a, tl.sum(a.to(tl.float32), axis=1), codes, row_scales + start // group_size, cols,
                              col_mask, start, k, MAGIC_BITS, MAGIC, BLOCK_N, BLOCK_K)
    return acc


@triton.jit
def _int4_products(x, x_sum, codes_ptr, scale_ptrs, cols, col_mask, k_start, k, MAGIC_BITS: tl.constexpr,
                   MAGIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] (and its row sums x_sum) times the int4 weight rows ``cols`` (packed codes from codes_ptr,
    rows of k / 2 bytes) over K elements k_start.., scaled by the rows' scales of this tile's group (scale_ptrs
    [BLOCK_N]): float32 [BLOCK_M, BLOCK_N]. The tile's bytes are loaded once and their nibbles joined back into K
    order in registers (quant_matmul's codes_tile). Codes stored q + 8 become the 16-bit floats MAGIC + q + 8 by
    bits (quant_matmul.MAGIC), so (MAGIC + 8) x_sum is taken off the products before the scale."""
    codes = codes_tile(codes_ptr, cols, col_mask, k_start, k, True, BLOCK_N, BLOCK_K)
    codes_t = tl.trans((codes.to(tl.int16) | MAGIC_BITS).to(x.dtype, bitcast=True))
    products = tl.dot(x, codes_t) - (MAGIC + _ZERO_POINT) * x_sum[:, None]
    return products * tl.load(scale_ptrs, mask=col_mask, other=0.0)[None, :]


@triton.jit
def _sum_kernel(pairs_ptr, out_ptr, n, TOP_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(pairs_ptr + (token * TOP_K + j) * n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * n + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
