"""``trident bench latency|offline --tensor-parallel N [--expert-parallel]``: trident's side split over N ranks.

Every rank prepares the same subject (trident/bench/subject.py: the same file, or the same seeded random weights of
a ``--shape``, checked alike on every rank before anything is timed) and builds its shard of the engine; rank 0 then
runs the benchmark as ``trident bench`` does (trident/bench/run.py's ``measure``: warm-ups, repetitions, table,
JSON), the other ranks following its steps. Spawned on this host, or one rank per process under torchrun.

``--compare`` is refused: the peer runs in the measuring process beside trident's engine, which here is a group of
processes; run the same command without ``--tensor-parallel`` for the peer's figures. ``--weights int8|int4``
(and ``--expert-weights``) quantizes the whole model on every rank, before its engine splits it (the unsplit model's
codes, cut exactly: trident/distributed/quantized.py); ``--weights w8a8`` and ``--lm-head int8`` are refused (W8A8
layers and quantized LM heads are not split yet).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from trident.distributed.config import ParallelConfig
from trident.errors import TridentError


def bench_tensor_parallel(args: argparse.Namespace) -> int:
    """Spawn the ranks on this host, or run this process's rank under torchrun; the exit code."""
    from trident.distributed.launch import launch_ranks, threads_per_rank

    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel, expert_parallel=args.expert_parallel)
    size = parallel.tensor_parallel_size
    flag = f"--tensor-parallel {size}"
    if args.compare is not None:
        raise TridentError(f"--compare is not supported with {flag}: the peer would run beside one rank of the "
                           f"split engine; run the same command without {flag} for the peer's figures")
    if args.weights == "w8a8":
        raise TridentError(f"--weights w8a8 is not supported with {flag} yet: W8A8 layers are not split; use "
                           "--weights int8 or int4")
    if getattr(args, "lm_head", "float") != "float":
        raise TridentError(f"--lm-head {args.lm_head} is not supported with {flag} yet: the LM head splits by "
                           "vocabulary in float only")
    if args.collective_timing and args.device.startswith("cuda") and not args.enforce_eager:
        raise TridentError("--collective-timing on CUDA needs --enforce-eager: CUDA graphs replay their collectives "
                           "without Python seeing them")
    if args.gguf_weights == "auto":
        args.gguf_weights = "dequantize"
    if args.device == "cpu" and args.threads is None:  # the ranks of a host share its cores
        args.threads = threads_per_rank(size)
    _check_shardable(args, size)
    return launch_ranks(parallel, args.device, bench_rank, (args,))


def bench_rank(local_rank: int, parallel_config: ParallelConfig, args: argparse.Namespace) -> int:
    """One rank of ``bench --tensor-parallel`` (spawned, hence a module-level function)."""
    from trident.distributed.launch import report_errors

    return report_errors(parallel_config.rank, lambda: _bench_rank(local_rank, parallel_config, args))


def _bench_rank(local_rank: int, parallel_config: ParallelConfig, args: argparse.Namespace) -> int:
    from trident.config import EngineConfig
    from trident.distributed.launch import joined, rank_engine_config
    from trident.distributed.timing import CollectiveTimer, TimedTensorParallel

    device = rank_engine_config(EngineConfig("", device=args.device), local_rank).device
    driver = parallel_config.rank == 0
    with joined(parallel_config, torch.device(device)) as parallel:
        timer = CollectiveTimer() if args.collective_timing and driver else None
        if timer is not None:
            parallel = TimedTensorParallel.of(parallel, timer)
        with contextlib.ExitStack() as quiet:
            if not driver:  # one table, one set of progress bars: rank 0's (errors still reach stderr)
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return _measure(args, parallel, device, timer)


def _measure(args: argparse.Namespace, parallel, device: str, timer) -> int:
    """This rank's subject, built and measured (rank 0) or followed; gone when this returns, before the group is
    left (its engine's CUDA graphs hold the communicator)."""
    from trident.bench.run import measure
    from trident.bench.subject import prepare
    from trident.distributed.launch import lead_or_follow

    subject = prepare(args, parallel=parallel, device=device)
    if subject.shape is not None:
        check_same_weights(subject.checkpoint.tensors, parallel)
    return lead_or_follow(subject.engine, lambda engine: measure(args, subject, timer))


def check_same_weights(tensors: dict[str, torch.Tensor], parallel) -> None:
    """TridentError unless every rank holds the same tensors as rank 0 (compared by their float64 sums, name by
    name): random weights are seeded, so they must be, whatever device each rank draws them on."""
    sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors.values()]).cpu()
    reference = parallel.broadcast_object(sums if parallel.is_driver else None)
    same = torch.equal(sums, reference)
    if parallel.min_over_ranks(int(same)) == 0:
        raise TridentError(f"the ranks' random weights differ{'' if same else f' (rank {parallel.rank})'}: every "
                           "rank must draw the same --shape weights (same --weights-seed, --dtype and device type)")


def _check_shardable(args: argparse.Namespace, size: int) -> None:
    """One clear error before any rank starts when the model's heads or features do not split over ``size``, or its
    quantized layers (the checkpoint's, or those --weights makes) do not cut into whole groups."""
    from trident.bench.quantized_weights import (
        bench_experts_config,
        bench_quant_config,
        quant_method_of,
        quantization_plan,
    )
    from trident.bench.shapes import resolve_shape
    from trident.config import ModelConfig
    from trident.distributed.shard import check_shardable
    from trident.loader.describe import describe_model
    from trident.models.build import meta_model

    quantization = None
    if args.shape:
        config = ModelConfig.from_hf_dict(resolve_shape(args.shape).hf_config)
    else:
        described = describe_model(args.model, args.gguf_weights == "native")
        config, quantization = described.config, described.quantization
    quant_config = bench_quant_config(args.weights, getattr(args, "group_size", None))
    experts_config = bench_experts_config(args.weights, getattr(args, "expert_weights", None),
                                          getattr(args, "group_size", None))
    if quant_config is not None and quantization is None:
        quantization = quantization_plan(meta_model(config), quant_config, quant_method_of(args.weights),
                                         experts_config=experts_config)
    check_shardable(config, size, args.expert_parallel, quantization)
