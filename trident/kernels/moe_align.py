"""Routing alignment for the fused experts kernels, on the GPU: the (token, slot) pairs of a step sorted by
expert and padded per expert to whole blocks of BLOCK_M rows (the layout: trident/moe/align.py, with the torch
reference :func:`~trident.moe.align.align_routing_reference`, triton-free so the CPU tests check it against a
construction of their own).

Nothing reads a value back on the host, so a decode step stays capturable in a CUDA graph: the kernel is one
program (the counts need every pair) that walks the pairs twice in chunks: first the per-expert counts (a
one-hot [CHUNK, E] sum), then each pair's rank among the earlier pairs of its expert (the chunk's one-hot
prefix sum plus the counts of the chunks before), which gives its row: the expert's first padded row plus the
rank. The rows are the torch reference's exactly (a stable sort by expert), so both lay the pairs out alike.
The reference is sync-free too (scatter_add / cumsum / a stable argsort / searchsorted), but a dozen launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.moe.align import AlignedRouting, max_sorted_rows

ONE_HOT_ELEMENTS = 8192
"""Elements of the kernel's [CHUNK, E] one-hot tile: CHUNK = this / E padded to a power of two (64 pairs a step
for 128 experts)."""
FILL_BLOCK = 1024
"""Rows the kernel sets to -1 per step."""


def align_routing(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """The Triton kernel: same contract as :func:`~trident.moe.align.align_routing_reference` (expert_ids
    contiguous)."""
    assert expert_ids.dim() == 2 and expert_ids.is_contiguous()
    assert block_m > 0 and block_m & (block_m - 1) == 0, "block_m must be a power of two"
    num_pairs = expert_ids.numel()
    rows = max_sorted_rows(num_pairs, num_experts, block_m)
    device = expert_ids.device
    sorted_pairs = torch.empty((rows,), dtype=torch.int32, device=device)
    block_experts = torch.empty((rows // block_m,), dtype=torch.int32, device=device)
    num_blocks = torch.empty((1,), dtype=torch.int32, device=device)
    experts_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, ONE_HOT_ELEMENTS // experts_pad)
    pdl = pdl_launch(device)
    _align_kernel[(1,)](expert_ids, sorted_pairs, block_experts, num_blocks, num_pairs, num_experts, rows,
                        BLOCK_M=block_m, EXPERTS_PAD=experts_pad, CHUNK=chunk, FILL=FILL_BLOCK, USE_PDL=pdl,
                        num_warps=4, launch_pdl=pdl)
    return AlignedRouting(sorted_pairs, block_experts, num_blocks, block_m)


# The pair and row counts change with the batch: not specialised on.
@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _align_kernel(ids_ptr, sorted_ptr, block_experts_ptr, num_blocks_ptr, num_pairs, num_experts, num_rows,
                  BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
                  USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    experts = tl.arange(0, EXPERTS_PAD)
    lanes = tl.arange(0, CHUNK)
    # 1. pairs per expert
    counts = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # 0 for the lanes past num_experts
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    total = tl.sum(padded, axis=0)
    # 2. every row a padding row until a pair is written there; each block's expert; the blocks in use
    for start in range(0, num_rows, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, tl.full((FILL,), -1, tl.int32), mask=offs < num_rows)
    for start in range(0, num_rows // BLOCK_M, CHUNK):
        blocks = start + lanes
        first_row = blocks * BLOCK_M
        # the expert whose padded rows hold first_row: the number of experts ending at or before it
        expert = tl.sum((padded_end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(block_experts_ptr + blocks, expert, mask=blocks < num_rows // BLOCK_M)
    tl.store(num_blocks_ptr, total // BLOCK_M)
    tl.debug_barrier()  # the -1 fill lands before any pair is written (other threads write the same rows)
    # 3. each pair's row: its expert's first row plus the pairs of that expert before it
    seen = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        in_range = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]  # per expert: its pairs before this one
        row = tl.sum((padded_start[None, :] + before) * hit, axis=1)
        tl.store(sorted_ptr + row, offs, mask=in_range)
        seen += tl.sum(hit, axis=0)
