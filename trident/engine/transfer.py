"""Host <-> device copies that never make the host wait for the device's queue.

A plain ``torch.tensor(values, device="cuda")`` or ``tensor.tolist()`` copies through pageable memory, and
torch then waits for the whole stream to finish: every queued kernel, not only the copy. With the
engine planning step k+1 while the device runs step k, that wait would undo the overlap. These helpers go
through pinned (page-locked) host memory with ``non_blocking`` copies instead: the copy joins the stream's
queue and the host goes on. Pinned buffers come from torch's caching host allocator, which keeps a buffer
from reuse until the copies that read or write it are done. Off CUDA they are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``values`` (a flat or nested list) on ``device``, queued without waiting."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor that will hold ``tensor``'s values once the device's queue reaches the copy (wait on an
    event recorded after it, e.g. :class:`HostCopies`, before reading it)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class HostCopies:
    """Marks the point in the device's queue after some :func:`to_host` copies; :meth:`wait` blocks until the
    device has done them (and everything queued before them)."""

    def __init__(self, device: torch.device) -> None:
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
