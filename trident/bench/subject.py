"""What `trident bench latency|offline` measures: a model (a file or folder, or a named shape with random
weights), the workload it runs, and trident's engine for both, sized so that the KV cache never limits the
batch unless asked (--max-num-seqs, --kv-cache-memory)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn

from trident.bench.quantized_weights import (
    bench_experts_config,
    bench_quant_config,
    quant_method_of,
    quantize_checkpoint,
)
from trident.bench.shapes import Shape, resolve_shape
from trident.bench.workloads import Workload, latency_workload, moe64_workload, nano_workload, offline_workload
from trident.engine.engine import LLMEngine
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.progress import progress_bar

KV_HEADROOM_BLOCKS = 4
"""Blocks beyond what the workload's sequences need at full length (the warm-up request takes one or two)."""


@dataclass
class Subject:
    """A built engine and the workload it runs."""

    name: str
    """The shape name, or the model path."""
    shape: Shape | None
    checkpoint: Checkpoint
    engine: LLMEngine
    workload: Workload
    load_s: float
    """Seconds to load or generate the weights and build the engine."""
    engine_options: dict
    """The engine options the run used (the JSON record keeps them)."""
    float_checkpoint: Checkpoint | None = None
    """With --weights quantized and --compare hf: the float weights before quantization, which the peer runs."""


def prepare(args: argparse.Namespace, parallel=None, device: str | None = None) -> Subject:
    """The subject of ``args``. With ``parallel`` (a TensorParallel), this rank's: the engine holds its shard, on
    ``device`` (its own GPU; default --device); every rank builds the same weights (a shape's are seeded)."""
    from trident.engine.sizing import resolve_dtype
    from trident.loader import default_model_path, load_checkpoint

    if args.shape and args.model:
        raise TridentError("pass either a MODEL path or --shape, not both")
    weights = getattr(args, "weights", "float")  # the flags checked before any weight is read or drawn
    quant_config = bench_quant_config(weights, getattr(args, "group_size", None))
    experts_config = bench_experts_config(weights, getattr(args, "expert_weights", None),
                                          getattr(args, "group_size", None))
    if getattr(args, "lm_head", "float") != "float" and weights not in ("int8", "int4"):
        raise TridentError("--lm-head int8 applies to --weights int8 or int4")
    device = torch.device(device or args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TridentError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    t0 = time.perf_counter()
    shape = None
    if args.shape:
        shape = resolve_shape(args.shape)
        checkpoint = _random_checkpoint(shape, device, resolve_dtype(args.dtype, device), args.weights_seed)
        name = shape.name
    else:
        name = args.model or default_model_path()
        from trident.config import EngineConfig
        from trident.engine.sizing import gguf_native

        native = gguf_native(EngineConfig(name, device=args.device, dtype=args.dtype,
                                          gguf_weights=args.gguf_weights), device)
        checkpoint = load_checkpoint(name, native)
    float_checkpoint = None
    if quant_config is not None:
        if getattr(args, "compare", None) == "hf":  # the peer runs the float original: keep it
            float_checkpoint = checkpoint
        checkpoint = quantize_checkpoint(checkpoint, quant_config, quant_method_of(weights),
                                         lm_head=getattr(args, "lm_head", "float") == "int8",
                                         experts_config=experts_config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    workload = make_workload(args, checkpoint)
    options = engine_options(args, checkpoint, workload)
    from trident.engine.llm import engine_config

    config = engine_config(None if shape else name, **{**options, "device": str(device)})
    engine = LLMEngine(config, checkpoint, parallel=parallel)
    return Subject(name=name, shape=shape, checkpoint=checkpoint, engine=engine, workload=workload,
                   load_s=time.perf_counter() - t0, engine_options=options, float_checkpoint=float_checkpoint)


def make_workload(args: argparse.Namespace, checkpoint: Checkpoint) -> Workload:
    tokenizer, vocab = checkpoint.tokenizer, checkpoint.config.vocab_size
    if args.workload in ("nano", "moe64"):
        if args.kind != "offline":
            raise TridentError(f"the {args.workload} workload is an offline one: use `trident bench offline "
                               f"--workload {args.workload}`")
        draw = nano_workload if args.workload == "nano" else moe64_workload
        return draw(args.num_prompts, args.prompt_len, args.output_len, vocab)
    if args.kind == "latency":
        return latency_workload(tokenizer, args.prompt_len or 241, args.output_len or 128, vocab)
    return offline_workload(tokenizer, args.num_prompts, args.prompt_len or 128, args.output_len or 128, vocab)


def engine_options(args: argparse.Namespace, checkpoint: Checkpoint, workload: Workload) -> dict:
    """EngineConfig keywords from the engine flags. Offline, --max-num-seqs defaults to every request at once;
    the KV cache (unless --kv-cache-memory) to what all of them need at full length."""
    from trident.engine.sizing import kv_bytes_per_block, resolve_dtype
    from trident.quant.kv import kv_cache_format

    options = dict(device=args.device, dtype=args.dtype, num_threads=args.threads,
                   attention_backend=args.attention_backend, experts_backend=args.experts_backend,
                   max_model_len=args.max_model_len,
                   block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                   enable_prefix_caching=args.prefix_caching, enforce_eager=args.enforce_eager,
                   async_scheduling=args.async_scheduling, gguf_weights=args.gguf_weights,
                   kv_cache_dtype=args.kv_cache_dtype, sparse_kernel=getattr(args, "sparse_kernel", False),
                   max_num_seqs=args.max_num_seqs or (len(workload.prompts) if args.kind == "offline" else 64))
    if args.kv_cache_memory is not None:
        from trident.serve.model_spec import parse_size

        options["memory_budget_bytes"] = parse_size(args.kv_cache_memory, "--kv-cache-memory")
    else:
        dtype = resolve_dtype(args.dtype, torch.device(args.device))
        blocks = sum(-(-(p + o) // args.block_size) for p, o in zip(workload.prompt_lens, workload.output_lens))
        options["memory_budget_bytes"] = (blocks + KV_HEADROOM_BLOCKS) * kv_bytes_per_block(
            checkpoint.config, args.block_size, kv_cache_format(args.kv_cache_dtype, dtype))
    return options


def _random_checkpoint(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> Checkpoint:
    from trident.bench.random_weights import checkpoint_bytes, random_checkpoint

    columns = (TextColumn("random weights"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with progress_bar(*columns, transient=True) as progress:
        task = progress.add_task("weights", total=checkpoint_bytes(shape, dtype))
        checkpoint = random_checkpoint(shape, device=device, dtype=dtype, seed=seed,
                                       on_tensor=lambda n: progress.advance(task, n))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return checkpoint
