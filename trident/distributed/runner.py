"""The model runner of a tensor-parallel engine: one scheduler (rank 0), every rank running the same steps.

Rank 0's engine plans each step as usual; its :class:`TensorParallelRunner` first sends the StepPlan (a plain
dataclass) to the other ranks over the control group, then runs it. The other ranks wait in :meth:`follow`,
run every plan they receive through the same ModelRunner code on their shard, and stop at :data:`STOP`. Each
forward meets the others' in its collectives (the row-parallel all-reduces, the logits' all-gather), in the same
order since every rank runs the same plan.

Sampling happens on rank 0 alone, from the full logits; it broadcasts the sampled token ids (a device tensor) to
the other ranks, whose runners keep them as the step's samples: a later step's pending tokens (asynchronous
scheduling, trident/engine/plan.py's PENDING_TOKEN) then read the same tokens on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trident.distributed.group import TensorParallel
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SampledToken
from trident.engine.runner import LaunchedStep, ModelRunner
from trident.engine.sampler import DeviceSamples, Sampler
from trident.engine.transfer import HostCopies

STOP = None
"""What rank 0 sends instead of a plan when the engine shuts down."""


class _SendSamples:
    """Rank 0's sampler: the engine's sampler, its tokens then broadcast to the other ranks."""

    def __init__(self, sampler: Sampler, parallel: TensorParallel) -> None:
        self.sampler = sampler
        self.parallel = parallel

    def sample(self, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> DeviceSamples:
        samples = self.sampler.sample(logits, chunks)
        self.parallel.broadcast(samples.token_ids)
        return samples

    def resolve(self, samples: DeviceSamples, chunks: Sequence[ScheduledChunk]) -> list[SampledToken]:
        return self.sampler.resolve(samples, chunks)


class _ReceiveSamples:
    """The other ranks' sampler: rank 0's tokens, received (the logits are not looked at)."""

    def __init__(self, parallel: TensorParallel) -> None:
        self.parallel = parallel

    def sample(self, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> DeviceSamples:
        tokens = self.parallel.broadcast(torch.empty(len(chunks), dtype=torch.long, device=logits.device))
        return DeviceSamples(tokens, tokens, HostCopies(logits.device))

    def resolve(self, samples: DeviceSamples, chunks: Sequence[ScheduledChunk]) -> list[SampledToken]:
        raise RuntimeError("only rank 0 reads sampled tokens")


class TensorParallelRunner(ModelRunner):
    """A ModelRunner over this rank's shard of the model (trident/distributed/shard.py). Rank 0 sends every plan it
    launches to the other ranks (warm-up apart: every rank warms up by itself), which :meth:`follow` it. The lean
    CPU decode step is off (it runs the layers without their collectives)."""

    def __init__(self, model: torch.nn.Module, *, parallel: TensorParallel, sampler: Sampler, **kwargs) -> None:
        shard_sampler = _SendSamples(sampler, parallel) if parallel.is_driver else _ReceiveSamples(parallel)
        kwargs["cpu_decode"] = False
        super().__init__(model, sampler=shard_sampler, **kwargs)
        self.parallel = parallel
        self._sends_plans = parallel.is_driver

    def warm_up(self) -> None:
        sends, self._sends_plans = self._sends_plans, False
        try:
            super().warm_up()
        finally:
            self._sends_plans = sends

    def launch(self, plan: StepPlan) -> LaunchedStep:
        if self._sends_plans:
            self.parallel.broadcast_object(plan)
        return super().launch(plan)

    def follow(self) -> None:
        """Ranks other than 0: run each plan rank 0 sends, until it sends :data:`STOP`."""
        if self.parallel.is_driver:
            raise RuntimeError("rank 0 drives the engine; only the other ranks follow it")
        while (plan := self.parallel.broadcast_object()) is not STOP:
            self.launch(plan)

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' :meth:`follow` (when the engine is done)."""
        if self._sends_plans:
            self.parallel.broadcast_object(STOP)
            self._sends_plans = False
