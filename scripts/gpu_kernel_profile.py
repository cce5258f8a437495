"""Which kernels a decode step spends its GPU time in (eager steps under torch.profiler; a graph replays the same
kernels back to back). Random weights, bfloat16 or quantized (an optional fourth field: int8 / int4 / w8a8, as
`trident bench --weights`), and a KV cache in the compute dtype or another (an optional fifth field: int8 / fp8 /
bfloat16 ..., as `--kv-cache-dtype`). NO_PDL=1 launches without programmatic dependent launch, so that a kernel's
time is its own and not also the wait for the one before it. Run on the GPU machine:
python scripts/gpu_kernel_profile.py [SHAPE:BATCH:CTX[:WEIGHTS[:KV]] ...]"""
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

if os.environ.get("NO_PDL") == "1":
    import trident.kernels.pdl as pdl

    pdl._capable = lambda index: False
FIELDS = [a.split(":") for a in sys.argv[1:]]
CASES = [(f[0], int(f[1]), int(f[2]), f[3] if len(f) > 3 else "float", f[4] if len(f) > 4 else "auto")
         for f in FIELDS] or [("qwen3-0.6b", 256, 600, "float", "auto"), ("qwen3-0.6b", 1, 600, "float", "auto"),
                              ("llama3-8b", 1, 200, "float", "auto")]
for name, batch, ctx, weights, kv in CASES:
    shape = resolve_shape(name)
    ck = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16)
    if weights != "float":
        from trident.bench.quantized_weights import bench_quant_config, quant_method_of, quantize_checkpoint

        ck = quantize_checkpoint(ck, bench_quant_config(weights, None), quant_method_of(weights))
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
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values()) / n
    launches = sum(v[1] for v in per_kernel.values()) / n
    print(f"\n{name} {weights} KV {kv} batch {batch} ctx ~{ctx}: {total / 1000:.3f} ms GPU per step in "
          f"{launches:.0f} kernels")
    for k, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:24]:
        print(f"  {us / n:9.1f} us  {count / n:5.0f}x  {us / count:7.2f} us each  {k}")
    del eng, ck
    torch.cuda.empty_cache()
