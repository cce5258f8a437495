"""The model runner of a tensor-parallel engine: one scheduler (rank 0), every rank running the same steps.

Rank 0's engine plans each step as usual; its :class:`TensorParallelRunner` first sends the StepPlan (a plain
dataclass) to the other ranks over the control group, then runs it. The other ranks wait in :meth:`follow`,
run every plan they receive through the same ModelRunner code on their shard, and stop at :data:`STOP`. Each
forward meets the others' in its collectives (the row-parallel all-reduces, the logits' all-gather), in the same
order since every rank runs the same plan.

Sampling happens on rank 0 alone, from the full logits; it broadcasts the sampled token ids (a device tensor) to
the other ranks, whose runners keep them as the step's samples: a later step's pending tokens (asynchronous
scheduling, trident/engine/plan.py's PENDING_TOKEN) then read the same tokens on every rank.

A step that fails on rank 0 once its plan may have gone out (a rank exited, a collective timed out, an interrupt)
leaves the ranks out of step: the runner then refuses every later step with the same :class:`TensorParallelError`, sets
:attr:`TensorParallelRunner.failed` (a server watches it to stop) and sends no stop message; the other ranks end
when rank 0's process does (their next collective fails: gloo notices a closed connection at once).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from trident.distributed.config import TensorParallelError
from trident.distributed.group import TensorParallel
from trident.engine.plan import ScheduledChunk, StepPlan, StepResult
from trident.engine.request import SampledToken
from trident.engine.runner import LaunchedStep, ModelRunner
from trident.engine.sampler import DeviceSamples, Sampler
from trident.engine.transfer import HostCopies
from trident.errors import TridentError

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
        self.failed = threading.Event()
        """Set once a step failed on rank 0 (module docstring); :attr:`failure` then says why."""
        self.failure: TensorParallelError | None = None

    def warm_up(self) -> None:
        sends, self._sends_plans = self._sends_plans, False
        try:
            super().warm_up()
        finally:
            self._sends_plans = sends

    def execute(self, plan: StepPlan) -> StepResult:
        if self.parallel.is_driver:
            return super().execute(plan)
        self.launch(plan)  # the other ranks read no tokens (rank 0 samples; theirs stay on the device for later steps)
        return StepResult(sampled={})

    def launch(self, plan: StepPlan) -> LaunchedStep:
        if not self._sends_plans:
            return super().launch(plan)
        if self.failure is not None:
            raise self.failure
        try:
            self.parallel.broadcast_object(plan)
            return super().launch(plan)
        except BaseException as e:  # the others may be inside this step's collectives: the group is out of step
            self.failure = TensorParallelError(
                f"a tensor-parallel step failed on rank 0 ({_first_line(e)}); the {self.parallel.size} ranks are "
                "out of step and this engine runs no further step: restart it (another rank may have exited or "
                "a collective timed out: see the other ranks' errors)")
            self._sends_plans = False
            self.failed.set()
            if isinstance(e, Exception):
                raise self.failure from e
            raise

    def follow(self) -> None:
        """Ranks other than 0: run each plan rank 0 sends, until it sends :data:`STOP`. A failed collective (rank 0
        gone, a timeout) ends it with a TridentError."""
        if self.parallel.is_driver:
            raise RuntimeError("rank 0 drives the engine; only the other ranks follow it")
        rank = self.parallel.rank
        while True:
            try:
                plan = self.parallel.broadcast_object()
            except RuntimeError as e:  # torch.distributed's errors (gloo: "Connection closed by peer", timeouts)
                raise TridentError(f"rank {rank} lost rank 0 while waiting for its next step ({_first_line(e)}); "
                                   "it stops") from e
            if plan is STOP:
                return
            try:
                self.launch(plan)
            except RuntimeError as e:
                raise TridentError(f"a tensor-parallel step failed on rank {rank} ({_first_line(e)}); it stops "
                                   "(rank 0 or another rank may have exited: see their errors)") from e

    def detach(self) -> None:
        """Rank 0: send nothing more to the other ranks (stop_followers then does nothing; they end when this
        process does)."""
        self._sends_plans = False

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' :meth:`follow` (when the engine is done; not after a failed step)."""
        if self._sends_plans:
            self._sends_plans = False
            self.parallel.broadcast_object(STOP)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch.distributed's run long), with its type."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
