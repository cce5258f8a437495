"""Starting the ranks of a tensor-parallel engine: one process per rank, on one host or under torchrun.

:func:`run_rank` is what every rank runs: join the group (:func:`joined`), build this rank's engine (its shard of the
model), then (:func:`lead_or_follow`) rank 0 calls ``drive(engine)`` (generate, serve, bench) and stops the others
when it returns, while they follow its plans. :func:`launch_ranks` starts them (``trident generate|serve|bench
--tensor-parallel N``): :func:`spawn_local` N processes on this host, or under torchrun this process's rank, whose
:class:`ParallelConfig` :func:`torchrun_config` builds.

Stopping spawned ranks: rank 0 is the one to stop, the others follow it. Ctrl-C (SIGINT to the whole foreground
process group) or SIGTERM to the parent makes the parent send SIGTERM to rank 0, which treats it as Ctrl-C (a server
shuts down, then rank 0 sends the stop message); the other ranks ignore SIGINT. Ranks still alive
:data:`STOP_GRACE_S` later are terminated, then killed. When a rank exits with an error or is killed, the parent
sends SIGTERM to the others at once (rank 0 stops as on Ctrl-C, the others end) and kills those left 30 s later
(torch.multiprocessing's join).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp

from trident.config import EngineConfig
from trident.distributed.config import ParallelConfig, backend_for
from trident.distributed.group import (
    LEAVE_TIMEOUT_S,
    TensorParallel,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from trident.errors import TridentError

STOP_GRACE_S = 30.0
"""Seconds spawned ranks get to end by themselves once asked to stop (or once one of them failed) before they are
terminated, and again before they are killed."""


def rank_engine_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """``config`` for the rank ``local_rank`` of its host: on CUDA, that rank's GPU (cuda:LOCAL_RANK)."""
    if config.device.split(":")[0] != "cuda":
        return config
    if local_rank >= torch.cuda.device_count():
        raise TridentError(f"rank {local_rank} of this host has no GPU: torch sees {torch.cuda.device_count()}; use "
                           "--tensor-parallel at most the number of GPUs")
    return dataclasses.replace(config, device=f"cuda:{local_rank}")


def run_rank(parallel_config: ParallelConfig, config: EngineConfig, drive: Callable[..., int], local_rank: int = 0,
             checkpoint=None, control_timeout: datetime.timedelta | None = None) -> int:
    """Run this process's rank (see the module docstring); returns ``drive``'s exit code on rank 0, 0 elsewhere.
    ``control_timeout``: how long the other ranks may wait for rank 0's next plan (a server's idle time; torch's
    default otherwise)."""
    from trident.engine.engine import LLMEngine

    config = rank_engine_config(config, local_rank)
    with joined(parallel_config, torch.device(config.device), control_timeout) as parallel:
        return lead_or_follow(LLMEngine(config, checkpoint, parallel=parallel), drive)


@contextmanager
def joined(parallel_config: ParallelConfig, device: torch.device,
           control_timeout: datetime.timedelta | None = None) -> Iterator[TensorParallel]:
    """This process's place in its group, joined for the block (left after it)."""
    parallel = init_tensor_parallel(parallel_config, device, control_timeout=control_timeout)
    failure = None
    try:
        yield parallel
    except BaseException as e:
        # the failed frames' locals (an engine half built, its CUDA graphs) must not outlive the group: NCCL's
        # teardown waits for every graph that captured its collectives (group.destroy_tensor_parallel)
        failure = e
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if not destroy_tensor_parallel():  # (another rank may be waiting in a collective for this one)
            if failure is not None:  # os._exit skips the report the exception would get
                traceback.print_exception(failure)
            print(f"warning: rank {parallel.rank} could not leave its tensor-parallel group within "
                  f"{LEAVE_TIMEOUT_S:.0f} s; it exits without tearing torch down", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)


def lead_or_follow(engine, drive: Callable[..., int]) -> int:
    """Rank 0: ``drive(engine)``'s exit code, the other ranks stopped when it returns (or raises). The others:
    follow rank 0's plans until it stops them; 0."""
    if not engine.parallel.is_driver:
        engine.runner.follow()
        return 0
    try:
        return drive(engine)
    finally:
        engine.runner.stop_followers()


def launch_ranks(parallel: ParallelConfig, device: str, target: Callable[..., int], args: tuple = ()) -> int:
    """``target(local_rank, rank's ParallelConfig, *args)`` for every rank of ``parallel`` (its size and
    expert_parallel; rank, backend and meeting place are filled in): spawned on this host (:func:`spawn_local`), or,
    under torchrun, this process's rank, whose world must be that size. The exit code."""
    if not started_by_torchrun(os.environ):
        return spawn_local(parallel, device, target, args)
    rank_config, local_rank = torchrun_config(os.environ, device, parallel.expert_parallel)
    size = parallel.tensor_parallel_size
    if rank_config.tensor_parallel_size != size:
        raise TridentError(f"torchrun started {rank_config.tensor_parallel_size} processes for --tensor-parallel "
                           f"{size}; start --nnodes x --nproc-per-node = {size} processes")
    return target(local_rank, rank_config, *args)


def threads_per_rank(size: int) -> int:
    """CPU threads for each rank when the ranks of this host share its cores: ``size`` spawned ranks, or torchrun's
    LOCAL_WORLD_SIZE."""
    per_host = local_world_size(os.environ) if started_by_torchrun(os.environ) else size
    return max(1, (os.cpu_count() or 1) // per_host)


def torchrun_config(environ: Mapping[str, str] = os.environ, device: str = "cpu",
                    expert_parallel: bool = False) -> tuple[ParallelConfig, int]:
    """(ParallelConfig, local rank) of a process torchrun started: RANK, WORLD_SIZE and LOCAL_RANK from its
    environment (torchrun's own variables; it also sets MASTER_ADDR / MASTER_PORT for env://)."""
    try:
        rank, size, local_rank = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as e:
        raise TridentError(f"{e.args[0]} is not set: start the ranks with torchrun") from None
    return ParallelConfig(tensor_parallel_size=size, rank=rank, backend=backend_for(device.split(":")[0]),
                          init_method="env://", expert_parallel=expert_parallel), local_rank


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


def spawn_local(parallel: ParallelConfig, device: str, target: Callable[..., int], args: tuple = ()) -> int:
    """Run ``target(rank, parallel_config, *args)`` in ``parallel.tensor_parallel_size`` new processes of this host
    (ranks on ``device``'s type: gloo for cpu, nccl for cuda; ``parallel``'s expert_parallel), meeting on a free
    loopback port. Returns 0 when every rank returns 0, else the exit code of the first to fail (the others are then
    stopped), 130 when interrupted (module docstring). ``target`` must be importable by name (a module-level
    function); it returns its exit code."""
    size = parallel.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    configs = [dataclasses.replace(parallel, rank=rank, backend=backend_for(device.split(":")[0]),
                                   init_method=init_method) for rank in range(size)]
    context = mp.start_processes(_spawned, args=(target, configs, args), nprocs=size, join=False,
                                 start_method="spawn")
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        _stop_ranks(context.processes)
        return 130
    except mp.ProcessExitedException as e:
        if e.exit_code < 0:
            print(f"error: rank {e.error_index} was ended by {e.signal_name}; the other ranks were stopped",
                  file=sys.stderr)
            return 1
        return e.exit_code
    except mp.ProcessRaisedException as e:
        print(f"error: a rank failed:\n{e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _stop_ranks(processes: list) -> None:
    """Ask rank 0 to stop (SIGTERM, which it treats as Ctrl-C), wait up to STOP_GRACE_S for every rank, then
    terminate, then kill what is left. Further Ctrl-C / SIGTERM to this process are ignored meanwhile (a second
    Ctrl-C in the terminal still reaches rank 0, which then stops a server without waiting for its connections)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C is enough: the ranks are being stopped
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if processes[0].is_alive():
            processes[0].terminate()
        for stop in (None, "terminate", "kill"):
            for p in processes:
                if stop is not None and p.is_alive():
                    getattr(p, stop)()
            deadline = time.monotonic() + STOP_GRACE_S
            for p in processes:
                p.join(max(0.0, deadline - time.monotonic()))
            if not any(p.is_alive() for p in processes):
                return
    finally:
        signal.signal(signal.SIGINT, previous if previous is not signal.SIG_IGN else signal.default_int_handler)


def raise_interrupt(signum, frame) -> None:
    """A signal handler: stop as Ctrl-C does, once (later SIGINT / SIGTERM are ignored while stopping)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _spawned(rank: int, target: Callable[..., int], configs: list[ParallelConfig], args: tuple) -> None:
    if rank == 0:  # the parent stops rank 0 with SIGTERM; rank 0 stops the others
        signal.signal(signal.SIGINT, raise_interrupt)
        signal.signal(signal.SIGTERM, raise_interrupt)
    else:  # Ctrl-C reaches every process of the terminal: the followers wait for rank 0 to stop them
        signal.signal(signal.SIGINT, signal.SIG_IGN)
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
