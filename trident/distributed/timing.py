"""How much of a tensor-parallel run rank 0 spends inside the collectives (``bench --collective-timing``).

:class:`TimedTensorParallel` is a :class:`TensorParallel` whose collectives add their wall time to a
:class:`CollectiveTimer` while it runs. Each tensor collective is timed between two device synchronisations (on
CUDA; gloo on the CPU returns when done), so the time is that of the collective itself, waiting for the slower ranks
to reach it included, and none of the compute queued before it. The synchronisations stall the pipeline a little, so
a timed run's speed is not the plain run's: the share is what the collectives take of a step, not of the plain
run's step time to the millisecond. CUDA graphs replay their collectives without Python: steps must run eagerly
(``--enforce-eager``) for them to be seen. The plain :class:`TensorParallel` has none of this: nothing is added to
the forward unless asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from trident.distributed.group import TensorParallel

KINDS = ("all_reduce", "all_gather", "broadcast", "plan")
"""What is timed: the row-parallel and embedding all-reduces, the logits' all-gather, the sampled tokens'
broadcast, and the step plans sent over the control group."""


class CollectiveTimer:
    """Seconds and calls per kind of collective while :attr:`active` (between :meth:`start` and :meth:`stop`)."""

    def __init__(self) -> None:
        self.active = False
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)

    def start(self) -> None:
        """Zero the counts and time from now."""
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)
        self.active = True

    def stop(self, elapsed_s: float) -> dict:
        """Stop timing; the figures of the timed run that took ``elapsed_s`` seconds: per kind its seconds, calls and
        share of ``elapsed_s``, and ``all_reduce_share`` (the all-reduces' share) for the table."""
        self.active = False
        kinds = {k: {"seconds": self.seconds[k], "calls": self.calls[k],
                     "share": self.seconds[k] / elapsed_s if elapsed_s > 0 else 0.0} for k in KINDS}
        return {"collectives": kinds, "all_reduce_share": kinds["all_reduce"]["share"],
                "collectives_share": sum(k["share"] for k in kinds.values())}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.calls[kind] += 1


@dataclass(frozen=True, eq=False)
class TimedTensorParallel(TensorParallel):
    """A TensorParallel whose collectives are timed while ``timer`` is active (module docstring)."""

    timer: CollectiveTimer = field(default_factory=CollectiveTimer)

    @classmethod
    def of(cls, parallel: TensorParallel, timer: CollectiveTimer) -> TimedTensorParallel:
        """``parallel`` (every field of it), timed by ``timer``."""
        return cls(**{f.name: getattr(parallel, f.name) for f in fields(parallel)}, timer=timer)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed("all_reduce", x, super().all_reduce)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed("all_gather", x, super().gather_last_dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed("broadcast", x, super().broadcast)

    def broadcast_object(self, obj: Any = None) -> Any:
        if not self.timer.active:
            return super().broadcast_object(obj)
        t0 = time.perf_counter()
        out = super().broadcast_object(obj)
        self.timer.add("plan", time.perf_counter() - t0)
        return out

    def _timed(self, kind: str, x: torch.Tensor, collective) -> torch.Tensor:
        if not self.timer.active:
            return collective(x)
        cuda = x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = collective(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        self.timer.add(kind, time.perf_counter() - t0)
        return out
