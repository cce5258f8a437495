"""Which kernels an engine step spends its GPU time in (eager steps under torch.profiler; a graph replays the same
kernels back to back), by kernel.

- ``SHAPE:BATCH:CTX[:WEIGHTS[:KV[:LM_HEAD]]]``: decode steps of BATCH sequences at ~CTX tokens. Random weights,
  bfloat16 or quantized (WEIGHTS: int8 / int4 / w8a8, as `trident bench --weights`; int8+int4: int8 weights with
  int4 routed experts, as `--weights int8 --expert-weights int4`), a KV cache in the compute dtype
  or another (KV: auto / int8 / fp8 / bfloat16 ..., as `--kv-cache-dtype`), and the LM head in the model dtype or
  int8 (LM_HEAD: float / int8, as `--lm-head`).
- ``prefill[:KV[:SHAPE[:WEIGHTS]]]``: one prefill step of Qwen3-0.6B (or SHAPE, its weights as WEIGHTS above)
  over the nano workload's first prompts up to 16,384 tokens (after a warm-up step on later prompts, which compiles
  the kernels); KV int8 by default.

NO_PDL=1 launches without programmatic dependent launch, so that a kernel's time is its own and not also the wait
for the one before it. Run on the GPU machine:
python scripts/gpu_kernel_profile.py [SHAPE:BATCH:CTX[:WEIGHTS[:KV[:LM_HEAD]]] | prefill[:KV] ...]"""
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.bench.workloads import nano_workload
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

PREFILL_TOKENS = 16384
DEFAULT_CASES = ("qwen3-0.6b:256:600", "qwen3-0.6b:1:600", "llama3-8b:1:200")


def print_kernels(title: str, prof: profile, steps: int) -> None:
    """The profiled CUDA kernels by GPU time per step, the 24 longest."""
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values()) / steps
    launches = sum(v[1] for v in per_kernel.values()) / steps
    print(f"\n{title}: {total / 1000:.3f} ms GPU per step in {launches:.0f} kernels")
    for k, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:24]:
        print(f"  {us / steps:9.1f} us  {count / steps:5.0f}x  {us / count:7.2f} us each  {k}")


def checkpoint(name: str, weights: str, lm_head: str):
    """Random bfloat16 weights of shape ``name`` on the GPU, quantized as WEIGHTS (int8+int4: int4 experts)."""
    ck = random_checkpoint(resolve_shape(name), device="cuda", dtype=torch.bfloat16)
    if weights != "float":
        from trident.bench.quantized_weights import (
            bench_experts_config,
            bench_quant_config,
            quant_method_of,
            quantize_checkpoint,
        )

        weights, _, experts = weights.partition("+")
        ck = quantize_checkpoint(ck, bench_quant_config(weights, None), quant_method_of(weights),
                                 lm_head=lm_head == "int8",
                                 experts_config=bench_experts_config(weights, experts or None, None))
    return ck


def decode_case(name: str, batch: int, ctx: int, weights: str, kv: str, lm_head: str) -> None:
    ck = checkpoint(name, weights, lm_head)
    eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=batch, enforce_eager=True,
                                  max_num_batched_tokens=16384, max_model_len=4096,
                                  memory_budget_bytes=16 << 30, kv_cache_dtype=kv), ck)
    p = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i in range(batch):
        eng.add_request([1 + (i * 7 + j) % 1000 for j in range(ctx)], p)
    for _ in range(15):
        eng.step()
    torch.cuda.synchronize()
    n = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eng.step()
        torch.cuda.synchronize()
    print_kernels(f"{name} {weights} KV {kv} LM head {lm_head} batch {batch} ctx ~{ctx}", prof, n)


def prefill_case(kv: str, name: str = "qwen3-0.6b", weights: str = "float") -> None:
    ck = checkpoint(name, weights, "float")
    prompts = [list(p) for p in nano_workload(256, None, None, ck.config.vocab_size).prompts]
    eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=256, enforce_eager=True,
                                  max_num_batched_tokens=PREFILL_TOKENS, max_model_len=4096,
                                  memory_budget_bytes=24 << 30, kv_cache_dtype=kv), ck)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def one_step_of_prompts(start: int) -> tuple[int, int]:  # queue prompts from ``start`` filling one step
        count = total = 0
        for prompt in prompts[start:]:
            if total + len(prompt) > PREFILL_TOKENS:
                break
            eng.add_request(prompt, params)
            count, total = count + 1, total + len(prompt)
        return count, total

    one_step_of_prompts(100)  # the warm-up: other prompts, the same kernels
    while eng.has_unfinished():
        eng.step()
    count, total = one_step_of_prompts(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished():
        eng.step()
    print_kernels(f"{name} {weights} prefill, KV {kv}: {count} prompts, {total} tokens", prof, 1)


def main() -> None:
    if os.environ.get("NO_PDL") == "1":
        import trident.kernels.pdl as pdl

        pdl._capable = lambda index: False
    for case in sys.argv[1:] or DEFAULT_CASES:
        f = case.split(":")
        if f[0] == "prefill":
            prefill_case(*(f[1:] or ["int8"]))
        else:
            decode_case(f[0], int(f[1]), int(f[2]), *(f[3:] + ["float", "auto", "float"][len(f) - 3:]))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
