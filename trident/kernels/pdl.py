"""Programmatic dependent launch (Hopper and later): a kernel's programs start while the kernel before it in the
stream is still finishing, and wait only where it matters.

A decode step at batch 1 is a chain of a few hundred short kernels (per layer: norm, projections, rotary, KV
write, attention, activation); each boundary costs the next grid's launch and ramp-up, a microsecond or more,
with the chip idle in between. Launched with the programmatic-stream-serialization attribute, a kernel may be
scheduled as soon as every program of the kernel before it has signalled ``griddepcontrol.launch_dependents``;
its programs then block in ``griddepcontrol.wait`` until that kernel has completed and its writes are visible.
Every kernel of ours calls :func:`wait_for_previous_grid` before it reads anything the kernel before it writes and
before it writes anything (so it never overwrites what that kernel still reads), then signals its own dependents.
Since every kernel signals only after its own wait, a kernel that starts has every kernel but the one just before
it completed: what those wrote, and the weights, may be read before the wait (the batch-1 products request their
first weights, the MoE down product its expert ids and first weights, the decode attention its context's older keys
and values). A kernel from elsewhere (cuBLAS, torch) never signals, so the next one simply waits for its completion
as without PDL.
CUDA graphs capture the dependencies as programmatic edges.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents: CUDA devices of compute capability 9.0
    or later (not under Triton's CPU interpreter)."""
    return device.type == "cuda" and _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def wait_for_previous_grid(USE_PDL: tl.constexpr):
    """First statement of every kernel: wait for the kernel before this one (a no-op unless launched with
    PDL), then let the next one launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
