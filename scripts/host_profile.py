"""Host-side profile (cProfile) of engine steps on CUDA: a small decode batch (the nano workload's tail) and
large prefill steps, asynchronous scheduling on. Run on the GPU machine: python scripts/host_profile.py"""
import cProfile
import pstats
import time

import torch

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

ck = random_checkpoint(resolve_shape("qwen3-0.6b"), device="cuda", dtype=torch.bfloat16)
eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=16384,
                              max_model_len=4096, memory_budget_bytes=16 << 30), ck)


def run(batch: int, prompt_len: int, steps: int, label: str) -> None:
    p = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for i in range(batch):
        eng.add_request([1 + (i * 7 + j) % 9000 for j in range(prompt_len)], p)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        eng.step(only_finished=True)
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n=== {label}: {(time.perf_counter() - t) / steps * 1000:.2f} ms per step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    for r in list(eng._requests):
        eng.abort(r)
    for _ in range(2):  # apply the step still in flight
        eng.step()


run(4, 300, 5, "warm-up")
run(4, 300, 60, "decode batch 4")
run(64, 1000, 8, "prefill 64 x 1000 tokens (16384 per step)")
run(200, 300, 60, "decode batch 200 (after 4 prefill steps)")
