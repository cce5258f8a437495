"""What the native MoE kernels (moe_gemv_cuda, moe_batched_cuda) ask of their tensors, checked alike by both."""

from __future__ import annotations

import torch


def aligned(*tensors: torch.Tensor) -> bool:
    """Every tensor contiguous and starting on a 16-byte boundary (the kernels' vector loads)."""
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)


def groups_fit(k: int, num_groups: int, block: int) -> bool:
    """Whether a kernel that steps through K in blocks of ``block`` elements takes num_groups scales per row of k
    elements: one, or groups of a power-of-two number of blocks (a block never straddles two groups)."""
    if num_groups == 1:
        return True
    blocks, rest = divmod(k // num_groups, block) if k % num_groups == 0 else (0, 1)
    return rest == 0 and blocks > 0 and blocks & (blocks - 1) == 0
