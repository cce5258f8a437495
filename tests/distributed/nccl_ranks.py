"""What the two-GPU tests (test_nccl.py) run: tp_ranks' tiny models split over two NCCL ranks, one GPU each, with
the engine's CUDA graphs on (its decode steps replay captured all-reduces), against the same models unsplit on one
GPU in the test's process."""

from __future__ import annotations

import dataclasses

import torch
from tp_ranks import BLOCK_SIZE, generate, shape_checkpoint, step_logits

from trident.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.engine import LLMEngine

SIZE = 2
CASES: dict[str, tuple[str, str, bool]] = {
    # dense models in float32: the split changes the order of the row-parallel sums only
    "llama-gqa-bias": ("llama-gqa-bias", "float32", False),
    "gemma2": ("gemma2", "float32", False),
    "llama-mqa": ("llama-mqa", "float32", False),
    "llama-uneven-heads": ("llama-uneven-heads", "float32", False),
    # MoE models in bfloat16, where the Triton experts (capturable; masked expert-parallel dispatch) run
    "qwen2-moe-shared": ("qwen2-moe-shared", "bfloat16", False),
    "expert-parallel-qwen2-moe-shared": ("qwen2-moe-shared", "bfloat16", True),
    "expert-parallel-mixtral": ("mixtral", "bfloat16", True),
    # weight-only quantized models in bfloat16 (the quantized Triton kernels and the batch-1 CUDA products, which
    # take the norm with the column-parallel projections; offsets derived on the device after the split on the CPU)
    "int8-llama-gqa-bias": ("int8/llama-gqa-bias", "bfloat16", False),
    "int4-g32-llama-gqa-bias": ("int4-g32/llama-gqa-bias", "bfloat16", False),
    "int4-g32-qwen2-moe-shared": ("int4-g32/qwen2-moe-shared", "bfloat16", False),
    "expert-parallel-int8-qwen2-moe-shared": ("int8/qwen2-moe-shared", "bfloat16", True),
}
"""Case -> (tp_ranks shape or quantized model, dtype, expert parallelism)."""
ASYNC_CASES = ("llama-gqa-bias", "expert-parallel-mixtral")
"""Cases generated with asynchronous scheduling (each step's tokens read from the broadcast samples)."""
MAX_TOKENS = 24


def engine_config(device: str, dtype: str, async_scheduling: bool = False) -> EngineConfig:
    """A small CUDA engine: decode batches of up to 4 sequences replay CUDA graphs (buckets 1, 2, 4)."""
    return EngineConfig(model="", device=device, dtype=dtype, max_model_len=64,
                        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=48, enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8),
                        async_scheduling=async_scheduling)


def case_run(case: str, device: str, parallel=None) -> dict:
    """One case's step logits (float32, on the CPU), greedy outputs (rank 0 or unsplit) and decode-graph replays,
    split over ``parallel`` or unsplit."""
    name, dtype, expert_parallel = CASES[case]
    if parallel is not None:
        parallel = dataclasses.replace(parallel, expert_parallel=expert_parallel)
    ckpt = shape_checkpoint(name)
    seen = {"logits": [t.cpu() for t in step_logits(LLMEngine(engine_config(device, dtype), ckpt,
                                                                        parallel=parallel))]}
    engine = LLMEngine(engine_config(device, dtype, case in ASYNC_CASES), ckpt, parallel=parallel)
    if parallel is None or parallel.is_driver:
        try:
            seen["outputs"] = generate(engine, MAX_TOKENS, logprobs=2)
        finally:
            if parallel is not None:
                engine.runner.stop_followers()
    else:
        engine.runner.follow()
    seen["replays"] = engine.runner.graphs.replays if engine.runner.graphs is not None else 0
    return seen


def run_rank(rank: int, init_method: str, out_dir: str) -> None:
    """One spawned rank on GPU ``rank``: every case of :data:`CASES`; saves what it saw to ``out_dir``/rank{rank}.pt
    (case -> case_run's dict)."""
    from trident.distributed.config import ParallelConfig
    from trident.distributed.launch import joined

    device = f"cuda:{rank}"
    seen = {}
    try:
        with joined(ParallelConfig(tensor_parallel_size=SIZE, rank=rank, backend="nccl", init_method=init_method),
                    torch.device(device)) as parallel:
            for case in CASES:
                seen[case] = case_run(case, device, parallel)
    finally:
        torch.save(seen, f"{out_dir}/rank{rank}.pt")
