"""Which kernels a decode step spends its GPU time in (eager steps under torch.profiler; a graph replays the same
kernels back to back). Random weights. Run on the GPU machine:
python scripts/gpu_kernel_profile.py [SHAPE:BATCH:CTX ...]"""
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

CASES = [(a, int(b), int(c)) for a, b, c in (arg.split(":") for arg in sys.argv[1:])] or [
    ("qwen3-0.6b", 256, 600), ("qwen3-0.6b", 1, 600), ("llama3-8b", 1, 200)]
for name, batch, ctx in CASES:
    shape = resolve_shape(name)
    ck = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16)
    eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=batch, enforce_eager=True,
                                  max_num_batched_tokens=16384, max_model_len=4096,
                                  memory_budget_bytes=16 << 30), ck)
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
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values()) / n
    launches = sum(v[1] for v in per_kernel.values()) / n
    print(f"\n{name} batch {batch} ctx ~{ctx}: {total / 1000:.3f} ms GPU per step in {launches:.0f} kernels")
    for k, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:24]:
        print(f"  {us / n:9.1f} us  {count / n:5.0f}x  {us / count:7.2f} us each  {k}")
    del eng, ck
    torch.cuda.empty_cache()
