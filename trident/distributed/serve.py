"""``trident serve --tensor-parallel N``: one model split over N ranks behind the OpenAI-compatible server.

Rank 0 runs everything ``trident serve`` runs for one model (uvicorn, the FastAPI app, the pool, the AsyncEngine
and its scheduler); the other ranks only follow its step plans (trident/distributed/runner.py). Started by torchrun
(one process per rank, on one host or several), this process is one rank; otherwise :func:`serve_tensor_parallel`
spawns the N ranks on this host (trident/distributed/launch.py).

Threads: every plan rank 0 broadcasts comes from one thread, :class:`EngineThread`, which steps the engine for the
AsyncEngine and, at shutdown, sends the stop message after the last step (never beside one). On CUDA that thread
uses rank 0's GPU.

Shutdown: Ctrl-C or SIGTERM stops uvicorn as usual, then rank 0 stops the followers and leaves the group. A failed
step (a rank exited, a collective timed out) fails the requests in flight, stops the server and exits with an error
line. A follower waits for plans without a time limit (the server may idle for hours); it ends when rank 0 stops it
or when rank 0's process ends (gloo notices the closed connection at once).

Not supported with ``--tensor-parallel`` (refused before anything starts): several models (``--model``, a config
file), ``--memory-budget`` and the admin API (both load and unload models at run time), ``--adaptive-fallback``
(a second model).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import queue
import signal
import socket
import sys
import threading
from concurrent.futures import Executor, Future

import torch

from trident.config import EngineConfig
from trident.distributed.config import ParallelConfig
from trident.errors import TridentError
from trident.serve.config import ServeConfig

FOLLOWER_WAIT = datetime.timedelta(days=365)
"""How long a follower waits for rank 0's next plan: no limit in practice (an idle server sends none)."""
STOP_TIMEOUT_S = 60.0
"""Seconds rank 0 waits for the engine thread's last step before it leaves without stopping the followers (they
then end as rank 0's process does)."""


class EngineThread(Executor):
    """One daemon thread that runs what is submitted to it, in order: a tensor-parallel engine's steps and, last,
    its stop message, so that the collectives of rank 0 all come from one thread. On CUDA it uses ``device``
    (the current device is per thread)."""

    def __init__(self, device: torch.device) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, args=(device,), name="trident-engine", daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("the engine thread is shut down")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if wait:
            self._thread.join()

    def _work(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What rank 0 serves: the model's engine settings, its name and aliases, and the server's settings."""

    engine: EngineConfig
    name: str
    aliases: dict[str, str]
    serve_config: ServeConfig
    host: str
    port: int
    log_level: str


def check_serve_options(args: argparse.Namespace, pool_config, serve_config: ServeConfig) -> None:
    """TridentError for what ``serve --tensor-parallel`` does not support (module docstring)."""
    flag = f"--tensor-parallel {args.tensor_parallel}"
    if len(pool_config.models) != 1 or args.config is not None:
        raise TridentError(f"{flag} serves one model: give one MODEL (or --model NAME=PATH once), not several or a "
                           "--config file")
    if pool_config.memory_budget_bytes is not None:
        raise TridentError(f"--memory-budget is not supported with {flag}: the split model stays loaded")
    if serve_config.admin_key is not None:
        raise TridentError(f"the admin API (--admin-key or $TRIDENT_ADMIN_KEY) is not supported with {flag}: it "
                           "loads and unloads models at run time")
    if pool_config.fallbacks:
        raise TridentError(f"--adaptive-fallback is not supported with {flag}: it needs a second model")


def check_port_free(host: str, port: int) -> None:
    """TridentError when ``host:port`` cannot be listened on now (before N ranks load the model for nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise TridentError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host / --port") \
                from None


def serve_tensor_parallel(parallel: ParallelConfig, served: ServedModel) -> int:
    """Spawn the ranks of ``parallel`` (its size and expert_parallel) on this host, or run this process's rank under
    torchrun; the exit code."""
    from trident.distributed.launch import launch_ranks, threads_per_rank
    from trident.distributed.shard import check_shardable
    from trident.loader.describe import describe_model

    size = parallel.tensor_parallel_size
    config = served.engine
    if config.device == "cpu" and config.num_threads is None:  # the ranks of a host share its cores
        config = dataclasses.replace(config, num_threads=threads_per_rank(size))
    served = dataclasses.replace(served, engine=config)
    described = describe_model(config.model or None, config.gguf_weights == "native")
    check_shardable(described.config, size, parallel.expert_parallel,  # one clear error before any rank starts
                    quantization=described.quantization)
    if int(os.environ.get("RANK", 0)) == 0:  # the serving rank: spawned here, or global rank 0 under torchrun
        check_port_free(served.host, served.port)
    return launch_ranks(parallel, config.device, serve_rank, (served,))


def serve_rank(local_rank: int, parallel_config: ParallelConfig, served: ServedModel) -> int:
    """One rank of ``serve --tensor-parallel`` (spawned, hence a module-level function): rank 0 serves, the others
    follow (and ignore Ctrl-C: rank 0 stops them)."""
    from trident.distributed.launch import report_errors, run_rank

    if parallel_config.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return report_errors(parallel_config.rank, lambda: run_rank(
        parallel_config, served.engine, lambda engine: _serve(engine, served), local_rank=local_rank,
        control_timeout=FOLLOWER_WAIT))


def _serve(engine, served: ServedModel) -> int:
    """Rank 0: serve ``engine`` until interrupted or until its group fails."""
    from trident.distributed.launch import raise_interrupt
    from trident.serve.async_engine import AsyncEngine
    from trident.serve.pool import ModelPool
    from trident.serve.server import serve

    # uvicorn handles SIGINT / SIGTERM while it serves, then raises them again: SIGTERM must then unwind as Ctrl-C
    # does (so that the followers are stopped), not end the process on the spot
    signal.signal(signal.SIGTERM, raise_interrupt)
    runner = engine.runner
    thread = EngineThread(engine.device)
    try:
        pool = ModelPool.of_engine(AsyncEngine(engine, executor=thread), served.name, served.serve_config,
                                   served.aliases)
        print(f"loaded {served.name!r} from {served.engine.model or 'the default model'} split over "
              f"{engine.parallel.size} ranks in {engine.load_seconds:.2f} s ({engine.kv_cache_summary()}; "
              f"{engine.decode_summary()})", file=sys.stderr)
        serve(pool, host=served.host, port=served.port, log_level=served.log_level, config=served.serve_config,
              stop=runner.failed)
    finally:
        _stop_followers(thread, runner)
    if runner.failure is not None:
        raise runner.failure
    return 0


def _stop_followers(thread: EngineThread, runner) -> None:
    """Send the stop message from the engine thread, after any step still running there; give up (the followers
    then end with rank 0's process) when that step does not end within STOP_TIMEOUT_S."""
    stopped = thread.submit(runner.stop_followers)
    thread.shutdown(wait=False)
    try:
        stopped.result(timeout=STOP_TIMEOUT_S)
    except TimeoutError:
        print(f"error: the engine's last step did not end within {STOP_TIMEOUT_S:g} s; leaving without stopping the "
              "other ranks (they stop when this process ends)", file=sys.stderr)
    except Exception as e:  # the followers are gone already: nothing to stop
        print(f"error: could not stop the other ranks: {e}", file=sys.stderr)
    finally:
        runner.detach()  # run_rank's own stop_followers does nothing now
