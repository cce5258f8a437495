"""The torch reference of the fused experts' routing alignment (trident/moe/align.py) against a construction of its
own, pair by pair in Python: each expert's pairs in increasing pair index, padded with -1 to whole row blocks,
experts in id order, each block's expert, the blocks in use; the row bound holds whatever the routing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trident.moe.align import align_routing_reference, max_sorted_rows


def _layout(ids: list[list[int]], num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """(rows, block experts) of the used part, built by hand."""
    flat = [e for token in ids for e in token]
    rows, blocks = [], []
    for expert in range(num_experts):
        pairs = [p for p, e in enumerate(flat) if e == expert]
        if not pairs:
            continue
        padding = -len(pairs) % block_m
        rows += pairs + [-1] * padding
        blocks += [expert] * ((len(pairs) + padding) // block_m)
    return rows, blocks


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_tokens=st.integers(0, 40), num_experts=st.sampled_from([1, 3, 4, 8, 64]),
       block_m=st.sampled_from([1, 2, 16, 64]))
def test_alignment_reference_by_hand(data, num_tokens, num_experts, block_m) -> None:
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    ids = [data.draw(st.permutations(range(num_experts)))[:top_k] for _ in range(num_tokens)]
    tensor = torch.tensor(ids, dtype=torch.long).view(num_tokens, top_k)
    out = align_routing_reference(tensor, num_experts, block_m)
    rows, blocks = _layout(ids, num_experts, block_m)
    total = max_sorted_rows(num_tokens * top_k, num_experts, block_m)
    assert len(rows) <= total and total % block_m == 0
    assert out.sorted_pairs.dtype == out.block_experts.dtype == torch.int32
    assert out.sorted_pairs.tolist() == rows + [-1] * (total - len(rows))
    assert out.block_experts.tolist() == blocks + [-1] * (total // block_m - len(blocks))
    assert out.num_blocks.tolist() == [len(blocks)]


def test_row_bound_counts_only_experts_in_use() -> None:
    """Batch 1, top-8 of 128 experts, 16-row blocks: 8 blocks, not 128 (E (BLOCK_M - 1) would give 121)."""
    assert max_sorted_rows(8, 128, 16) == 128
    assert max_sorted_rows(4096, 128, 64) == 4096 + 128 * 63
