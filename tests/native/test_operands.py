"""The operand checks the native MoE kernels share (trident/native/operands.py), against known answers."""

from __future__ import annotations

import pytest
import torch

from trident.native.operands import aligned, groups_fit


@pytest.mark.parametrize(("k", "num_groups", "block", "fits"), [
    (2048, 1, 128, True),     # per channel: any K
    (2048, 16, 128, True),    # groups of 128: one block each
    (2048, 8, 128, True),     # groups of 256: two blocks
    (2048, 32, 128, False),   # groups of 64: half a block
    (768, 2, 128, False),     # groups of 384: three blocks, not a power of two
    (2048, 64, 32, True),     # groups of 32 for 32-element blocks (moe_gemv_cuda)
    (2048, 3, 32, False),     # K not a multiple of the groups
])
def test_groups_fit_whole_power_of_two_blocks(k: int, num_groups: int, block: int, fits: bool) -> None:
    assert groups_fit(k, num_groups, block) is fits


def test_aligned_asks_contiguous_16_byte_starts() -> None:
    base = torch.zeros(64, dtype=torch.uint8)
    assert base.data_ptr() % 16 == 0, "torch's CPU allocations start on 64-byte boundaries"
    assert aligned(base, base[16:])
    assert not aligned(base[8:]), "starts 8 bytes in"
    assert not aligned(base.view(8, 8).t()), "not contiguous"
