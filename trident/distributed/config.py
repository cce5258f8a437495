"""How a model is split over processes: the frozen configuration one rank is started with (torch-free).

Tensor parallelism runs one process (a *rank*) per device. Every rank builds the whole model from the checkpoint,
then keeps its slice of each weight (trident/distributed/shard.py); rank 0 also runs the scheduler and samples
(trident/distributed/runner.py). The ranks meet through ``torch.distributed`` at ``init_method``. With expert
parallelism on, the same ranks split each MoE layer's routed experts whole (rank r holds E / N of them) instead of
by their intermediate features (trident/distributed/experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from trident.errors import TridentError

BACKENDS = ("gloo", "nccl")
"""torch.distributed backends: gloo for CPU tensors, nccl for CUDA tensors (one GPU per rank)."""


class TensorParallelError(TridentError):
    """A tensor-parallel engine cannot run further steps: a step failed on rank 0 once its plan may have gone out
    (a rank exited, a collective timed out), so the ranks are out of step. Not the request's fault: a server answers
    it with 503 and stops."""


@dataclass(frozen=True)
class ParallelConfig:
    """One rank's place in a tensor-parallel group."""

    tensor_parallel_size: int = 1
    """Ranks the model is split over (each holds 1 / tensor_parallel_size of the attention heads, MLP and expert
    intermediate features, and vocabulary)."""
    rank: int = 0
    """This process's rank in [0, tensor_parallel_size); rank 0 schedules and samples, the others follow it."""
    backend: str = "gloo"
    """gloo (CPU) or nccl (CUDA; rank r uses the device the engine config names, one GPU per rank)."""
    init_method: str = "env://"
    """Where the ranks meet (torch.distributed's init_method): env:// (MASTER_ADDR and MASTER_PORT set, as torchrun
    sets them), tcp://HOST:PORT, or file:///PATH (a file the ranks share, absent before they start)."""
    expert_parallel: bool = False
    """Split each MoE layer's routed experts over the ranks whole (rank r: experts [r E / N, (r + 1) E / N)) rather
    than by their intermediate features; attention, dense MLPs, shared experts and the vocabulary stay split as
    without it. Needs tensor_parallel_size > 1."""

    def __post_init__(self) -> None:
        size = self.tensor_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TridentError(f"--tensor-parallel must be a positive integer, got {size!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < size:
            raise TridentError(f"rank {self.rank!r} is outside [0, {size}) for --tensor-parallel {size}")
        if self.backend not in BACKENDS:
            raise TridentError(f"unknown torch.distributed backend {self.backend!r}; supported: {', '.join(BACKENDS)}")
        if not self.init_method.startswith(("env://", "tcp://", "file://")):
            raise TridentError(f"init_method must be env://, tcp://HOST:PORT or file:///PATH, got {self.init_method!r}")
        if not isinstance(self.expert_parallel, bool):
            raise TridentError(f"expert_parallel must be True or False, got {self.expert_parallel!r}")
        if self.expert_parallel and size == 1:
            raise TridentError("--expert-parallel splits experts over the ranks of --tensor-parallel N; add "
                               "--tensor-parallel N with N > 1 (a divisor of the number of experts)")

    @property
    def is_driver(self) -> bool:
        """Whether this rank runs the scheduler and the sampler (rank 0)."""
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """The backend of a device type: nccl for cuda, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"
