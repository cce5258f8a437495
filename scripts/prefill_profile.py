"""Where a nano prefill step's GPU time goes: random Qwen3-0.6B weights, the nano workload's first prompts up to
16,384 tokens in one eager prefill step under torch.profiler (after a warm-up on later prompts, which compiles the
kernels), kernels by GPU time. NO_PDL=1 launches without programmatic dependent launch. Run on the GPU machine:
python scripts/prefill_profile.py [KV_DTYPE]   (auto, int8 or fp8; default int8)"""
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

if os.environ.get("NO_PDL") == "1":
    import trident.kernels.pdl as pdl
    pdl._capable = lambda index: False
kv = sys.argv[1] if len(sys.argv) > 1 else "int8"
ck = random_checkpoint(resolve_shape("qwen3-0.6b"), device="cuda", dtype=torch.bfloat16)
wl = nano_workload(256, None, None, ck.config.vocab_size)
eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=256, enforce_eager=True,
                              max_num_batched_tokens=16384, max_model_len=4096, memory_budget_bytes=24 << 30,
                              kv_cache_dtype=kv), ck)
p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def batch(start):
    prompts, total = [], 0
    for pr in wl.prompts[start:]:
        if total + len(pr) > 16384:
            break
        prompts.append(list(pr))
        total += len(pr)
    return prompts, total


for warm in (100, 0):
    prompts, total = batch(warm)
    for pr in prompts:
        eng.add_request(pr, p)
    torch.cuda.synchronize()
    if warm:
        while eng.has_unfinished():
            eng.step()
        torch.cuda.synchronize()
        continue
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished():
        eng.step()
per = defaultdict(lambda: [0.0, 0])
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        k = per[e.name[:100]]
        k[0] += e.device_time_total
        k[1] += 1
tot = sum(v[0] for v in per.values())
print(f"prefill step KV {kv}: {len(prompts)} prompts, {total} tokens: {tot / 1000:.2f} ms GPU in "
      f"{sum(v[1] for v in per.values())} kernels")
for k, (us, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"  {us / 1000:8.3f} ms {c:5d}x {us / c:9.1f} us  {k}")
