"""The process group of a tensor-parallel model: set up, torn down, and the few collectives the model needs.

:class:`TensorParallel` is the one object the sharded layers and the runner hold: this rank, the group size, and
two process groups. ``group`` carries the tensors of the forward (gloo on the CPU, nccl on CUDA, where the
collectives can be captured in CUDA graphs once the communicator is up); ``control_group`` (always gloo) carries
Python objects from rank 0 to the others (step plans), so that sending them never waits for a GPU queue. Nothing
is global: a layer reduces over the group it was given.
"""

from __future__ import annotations

import datetime
import gc
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trident.distributed.config import ParallelConfig
from trident.errors import TridentError

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch.distributed's gather of equal tensors into one: all_gather_single from torch 2.13 on (which deprecates
all_gather_into_tensor), all_gather_into_tensor before it."""

DRIVER = 0
"""The rank (within the group) that schedules, samples and sends the step plans."""


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """This rank's view of its tensor-parallel group (see the module docstring)."""

    rank: int
    size: int
    group: Any
    """torch.distributed ProcessGroup of the forward's collectives (None only in tests that never communicate)."""
    control_group: Any
    """gloo ProcessGroup for Python objects (the same group as ``group`` on the CPU)."""
    expert_parallel: bool = False
    """Whether MoE layers split their routed experts whole over this group (ParallelConfig.expert_parallel), what
    :func:`~trident.distributed.shard.shard_model` reads."""

    @property
    def is_driver(self) -> bool:
        return self.rank == DRIVER

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (x is returned)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] from each rank -> [..., size * n], rank 0's columns first."""
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # ranks' x, stacked
        _all_gather_single(out, x, group=self.group)
        return out.view(self.size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x into every rank's x, in place (x is returned)."""
        dist.broadcast(x, group=self.group, group_src=DRIVER)
        return x

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable ``obj``, on every rank (through the control group)."""
        box = [obj]
        dist.broadcast_object_list(box, group=self.control_group, group_src=DRIVER)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (through the control group)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())


def init_tensor_parallel(config: ParallelConfig, device: torch.device, timeout: datetime.timedelta | None = None,
                         control_timeout: datetime.timedelta | None = None) -> TensorParallel:
    """Join the group ``config`` describes (blocks until every rank has joined). The backend must suit ``device``:
    gloo for the CPU, nccl for CUDA, whose ranks each hold one GPU. ``timeout`` bounds every collective of the
    forward (torch's default when None); ``control_timeout``, when given, gives the control group a timeout of its
    own (then always a separate gloo group): how long a following rank may wait for its next plan, which for a
    server is as long as it sits idle."""
    if dist.is_initialized():
        raise TridentError("torch.distributed is already initialised in this process; one engine per process with "
                           "--tensor-parallel")
    if (config.backend == "nccl") != (device.type == "cuda"):
        raise TridentError(f"backend {config.backend} does not run on {device.type}: use nccl with --device cuda and "
                           "gloo with --device cpu")
    if config.backend == "nccl" and not dist.is_nccl_available():
        raise TridentError("this torch has no NCCL support; tensor parallelism on CUDA needs it")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(config.backend, init_method=config.init_method, rank=config.rank,
                            world_size=config.tensor_parallel_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    control = group
    if config.backend != "gloo" or control_timeout is not None:
        control = dist.new_group(backend="gloo", timeout=control_timeout)
    return TensorParallel(rank=config.rank, size=config.tensor_parallel_size, group=group, control_group=control,
                          expert_parallel=config.expert_parallel)


LEAVE_TIMEOUT_S = 60.0
"""Seconds :func:`destroy_tensor_parallel` waits for torch.distributed to tear the group down."""


def destroy_tensor_parallel(timeout_s: float = LEAVE_TIMEOUT_S) -> bool:
    """Leave the group (after every rank is done with it); a no-op when none was set up. Whether it was left within
    ``timeout_s`` (else it is left behind, and the process should end without tearing down torch: os._exit).

    A CUDA graph that captured NCCL collectives holds a reference on the communicator, which NCCL's teardown waits
    for: the engine's graphs must be gone first. Whatever no longer references them is collected here (the engine
    and its runner form reference cycles); an engine still referenced (a caller's local, an exception's frames, see
    launch.joined) would make the teardown wait, hence the timeout."""
    if not dist.is_initialized():
        return True
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    leaving = threading.Thread(target=dist.destroy_process_group, name="leave-tensor-parallel", daemon=True)
    leaving.start()
    leaving.join(timeout_s)
    return not leaving.is_alive()
