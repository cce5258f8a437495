"""Routing alignment for the fused experts kernels, on the GPU: the (token, slot) pairs of a step sorted by
expert and padded per expert to whole blocks of BLOCK_M rows (the layout: trident/moe/align.py, with the torch
reference :func:`~trident.moe.align.align_routing_reference`, triton-free so the CPU tests check it against a
construction of their own).

Nothing reads a value back on the host, so a decode step stays capturable in a CUDA graph. One launch of one
program per expert; each program
1. counts every expert's pairs (``tl.histogram`` over the ids, chunk by chunk: the counts need every pair, and
   reading the step's ids again in each program is cheaper than a second launch), hence every expert's padded
   rows and so its own first row (the padded counts of the experts before it);
2. writes its own pairs' rows, in increasing pair index: the expert's first row plus the pair's rank among the
   earlier pairs of the expert (a one-dimensional prefix sum over each chunk of ids equal to its expert, plus
   the pairs of the chunks before); -1 in the padding rows of its last block; its blocks' expert;
3. with the others, -1 in every row and block after the last expert's (a stride of the experts over them), and
   program 0 the number of blocks in use.
The rows are the torch reference's exactly (a stable sort by expert), so both lay the pairs out alike. The
reference is sync-free too (scatter_add / cumsum / a stable argsort / searchsorted), but a dozen launches.

(The previous kernel, one program walking a [pairs, experts] one-hot twice with a prefix sum down the pairs, took
22 us a layer at 64 tokens x top-8 of 128 experts on an H200: 1.07 of a 12.2 ms Qwen3-30B-A3B step.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.moe.align import AlignedRouting, max_sorted_rows

CHUNK = 1024
"""Expert ids a program reads at once (8 a thread at 4 warps)."""
FILL_BLOCK = 1024
"""Rows a program sets to -1 at once after the last expert's."""


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
    pdl = pdl_launch(device)
    _align_kernel[(num_experts,)](expert_ids, sorted_pairs, block_experts, num_blocks, num_pairs, num_experts, rows,
                                  BLOCK_M=block_m, EXPERTS_PAD=triton.next_power_of_2(num_experts), CHUNK=CHUNK,
                                  FILL=FILL_BLOCK, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return AlignedRouting(sorted_pairs, block_experts, num_blocks, block_m)


# The pair and row counts change with the batch: not specialised on.
@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _align_kernel(ids_ptr, sorted_ptr, block_experts_ptr, num_blocks_ptr, num_pairs, num_experts, num_rows,
                  BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
                  USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    expert = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PAD)
    lanes = tl.arange(0, CHUNK)
    # 1. pairs per expert (lanes past the pairs read as expert 0 and are taken off its count), hence the rows
    counts = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0).to(tl.int32)
        counts += tl.histogram(ids, EXPERTS_PAD)
    counts -= tl.where(experts == 0, tl.cdiv(num_pairs, CHUNK) * CHUNK - num_pairs, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # 0 for the lanes past num_experts
    padded_start = tl.cumsum(padded, axis=0) - padded
    total = tl.sum(padded, axis=0)
    mine = experts == expert
    first = tl.sum(tl.where(mine, padded_start, 0), axis=0)
    count = tl.sum(tl.where(mine, counts, 0), axis=0)
    end = first + tl.sum(tl.where(mine, padded, 0), axis=0)  # past this expert's last block
    # 2. this expert's pairs at its first row plus their rank; -1 after them up to its last block's end
    seen = 0
    for start in range(0, num_pairs, CHUNK):
        offs = start + lanes
        in_range = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
        hit = (ids == expert).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit + seen
        tl.store(sorted_ptr + first + rank, offs, mask=hit != 0)
        seen += tl.sum(hit, axis=0)
    pad_rows = first + count + tl.arange(0, BLOCK_M)  # fewer than BLOCK_M padding rows
    tl.store(sorted_ptr + pad_rows, tl.full((BLOCK_M,), -1, tl.int32), mask=pad_rows < end)
    first_block = first // BLOCK_M
    num_mine = (end - first) // BLOCK_M
    for start in range(0, num_mine, CHUNK):
        blocks = start + lanes
        tl.store(block_experts_ptr + first_block + blocks, tl.full((CHUNK,), 0, tl.int32) + expert,
                 mask=blocks < num_mine)
    # 3. the rows and blocks after the last expert's, strided over the programs
    fill = tl.arange(0, FILL)
    for start in range(total + expert * FILL, num_rows, num_experts * FILL):
        offs = start + fill
        tl.store(sorted_ptr + offs, tl.full((FILL,), -1, tl.int32), mask=offs < num_rows)
    num_blocks = num_rows // BLOCK_M
    for start in range(total // BLOCK_M + expert * FILL, num_blocks, num_experts * FILL):
        offs = start + fill
        tl.store(block_experts_ptr + offs, tl.full((FILL,), -1, tl.int32), mask=offs < num_blocks)
    if expert == 0:
        tl.store(num_blocks_ptr, total // BLOCK_M)
