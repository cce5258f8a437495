"""Starting the ranks of a tensor-parallel engine: one process per rank, on one host or under torchrun.

:func:`run_rank` is what every rank runs: join the group, build this rank's engine (its shard of the model), then
rank 0 calls ``drive(engine)`` (generate, serve...) and stops the others when it returns, while they follow its
plans. :func:`spawn_local` starts N such processes on this host (``trident generate --tensor-parallel N``);
under torchrun, each process builds its :class:`ParallelConfig` with :func:`torchrun_config`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Callable, Mapping

import torch
import torch.multiprocessing as mp

from trident.config import EngineConfig
from trident.distributed.config import ParallelConfig, backend_for
from trident.distributed.group import destroy_tensor_parallel, init_tensor_parallel
from trident.errors import TridentError


def rank_engine_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """``config`` for the rank ``local_rank`` of its host: on CUDA, that rank's GPU (cuda:LOCAL_RANK)."""
    if config.device.split(":")[0] != "cuda":
        return config
    if local_rank >= torch.cuda.device_count():
        raise TridentError(f"rank {local_rank} of this host has no GPU: torch sees {torch.cuda.device_count()}; use "
                           "--tensor-parallel at most the number of GPUs")
    return dataclasses.replace(config, device=f"cuda:{local_rank}")


def run_rank(parallel_config: ParallelConfig, config: EngineConfig, drive: Callable[..., int], local_rank: int = 0,
             checkpoint=None) -> int:
    """Run this process's rank (see the module docstring); returns ``drive``'s exit code on rank 0, 0 elsewhere."""
    from trident.engine.engine import LLMEngine

    config = rank_engine_config(config, local_rank)
    parallel = init_tensor_parallel(parallel_config, torch.device(config.device))
    try:
        engine = LLMEngine(config, checkpoint, parallel=parallel)
        if not parallel.is_driver:
            engine.runner.follow()
            return 0
        try:
            return drive(engine)
        finally:
            engine.runner.stop_followers()
    finally:
        destroy_tensor_parallel()


def torchrun_config(environ: Mapping[str, str] = os.environ, device: str = "cpu") -> tuple[ParallelConfig, int]:
    """(ParallelConfig, local rank) of a process torchrun started: RANK, WORLD_SIZE and LOCAL_RANK from its
    environment (torchrun's own variables; it also sets MASTER_ADDR / MASTER_PORT for env://)."""
    try:
        rank, size, local_rank = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as e:
        raise TridentError(f"{e.args[0]} is not set: start the ranks with torchrun") from None
    return ParallelConfig(tensor_parallel_size=size, rank=rank, backend=backend_for(device.split(":")[0]),
                          init_method="env://"), local_rank


def started_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun started this process (it sets LOCAL_RANK and WORLD_SIZE for each process it starts)."""
    return "LOCAL_RANK" in environ and "WORLD_SIZE" in environ


def local_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Ranks on this host under torchrun (LOCAL_WORLD_SIZE), else 1."""
    return int(environ.get("LOCAL_WORLD_SIZE", 1))


def free_port() -> int:
    """A TCP port nobody listens on at this moment, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(size: int, device: str, target: Callable[..., int], args: tuple = ()) -> int:
    """Run ``target(rank, parallel_config, *args)`` in ``size`` new processes of this host (ranks on ``device``'s
    type: gloo for cpu, nccl for cuda), meeting on a free loopback port. Returns 0 when every rank returns 0, else
    the exit code of the first to fail (the others are then ended). ``target`` must be importable by name (a
    module-level function); it returns its exit code."""
    ParallelConfig(tensor_parallel_size=size)  # a bad size is a TridentError here, before any process starts
    init_method = f"tcp://127.0.0.1:{free_port()}"
    configs = [ParallelConfig(tensor_parallel_size=size, rank=rank, backend=backend_for(device.split(":")[0]),
                              init_method=init_method) for rank in range(size)]
    try:
        mp.spawn(_spawned, args=(target, configs, args), nprocs=size)
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    except mp.ProcessRaisedException as e:
        print(f"error: a rank failed:\n{e}", file=sys.stderr)
        return 1
    return 0


def _spawned(rank: int, target: Callable[..., int], configs: list[ParallelConfig], args: tuple) -> None:
    code = target(rank, configs[rank], *args)
    if code:
        sys.exit(code)


def report_errors(rank: int, run: Callable[[], int]) -> int:
    """``run()``'s exit code, a TridentError printed as one line (by rank 0; by another rank with its number) and
    exit code 2, as the command line does."""
    try:
        return run()
    except TridentError as e:
        prefix = "error" if rank == 0 else f"error (rank {rank})"
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
