"""The aligned layout of a step's routing that the fused experts kernels (trident/kernels/moe_experts.py) run
over, and its torch reference; trident/kernels/moe_align.py computes it on the GPU in one launch.

The (token, slot) pairs are sorted by expert and padded per expert to whole blocks of BLOCK_M rows, so that every
row block of the grouped GEMMs belongs to one expert. For expert ids [T, k], pair p = t * k + slot is routed to
``expert_ids.flatten()[p]``. The layout:

- ``sorted_pairs`` int32 [rows]: expert 0's pairs in increasing p, then -1 up to a multiple of BLOCK_M, then
  expert 1's, ... (experts without pairs take no rows); -1 also fills every row after the last expert's.
- ``block_experts`` int32 [rows / BLOCK_M]: the expert of each row block, -1 for the blocks after the last
  expert's (the GEMM programs of those blocks return at once).
- ``num_blocks`` int32 [1]: the row blocks in use (those with an expert; they come first).

``rows`` is a bound fixed by the shapes, never by the ids (:func:`max_sorted_rows`): T k pairs plus at most
BLOCK_M - 1 padding rows for each expert in use, of which there are at most min(T k, E); rounded up to a multiple
of BLOCK_M. (The looser T k + E (BLOCK_M - 1) would launch the GEMMs over E row blocks at batch 1, nearly all of
them empty.) Expert ids must be in [0, E): the layout does not check them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedRouting(NamedTuple):
    """Pairs sorted by expert and padded per expert to whole row blocks (see the module docstring)."""

    sorted_pairs: torch.Tensor
    """int32 [rows]: pair index t * k + slot, or -1 for a padding row."""
    block_experts: torch.Tensor
    """int32 [rows / block_m]: each row block's expert, -1 for the unused blocks at the end."""
    num_blocks: torch.Tensor
    """int32 [1]: the row blocks in use."""
    block_m: int


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The rows the aligned layout may take: num_pairs plus block_m - 1 padding rows for each of the at most
    min(num_pairs, num_experts) experts in use, rounded up to a multiple of block_m."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_routing_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """The layout in torch (any device, no host synchronisation): expert_ids int [T, k] with values in
    [0, num_experts)."""
    flat = expert_ids.reshape(-1).long()
    device = flat.device
    rows = max_sorted_rows(flat.numel(), num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pairs by expert, in increasing pair index within an expert
    sorted_ids = flat[order]
    rank = torch.arange(flat.numel(), device=device) - (counts.cumsum(0) - counts)[sorted_ids]
    sorted_pairs = torch.full((rows,), -1, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, padded_start[sorted_ids] + rank, order.int())
    block_rows = torch.arange(0, rows, block_m, device=device)
    total = padded_end[-1:]
    block_experts = torch.where(block_rows < total, torch.searchsorted(padded_end, block_rows, right=True), -1)
    return AlignedRouting(sorted_pairs, block_experts.int(), (total // block_m).int(), block_m)
