"""Where a decode step's time goes on CUDA: graph replay (GPU only) vs a whole engine step, for a few shapes and
batch sizes (random weights). Run on the GPU machine: python scripts/gpu_step_time.py [SHAPE:BATCH ...]"""
import sys
import time

import torch

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams

CASES = [(a, int(b)) for a, b in (arg.split(":") for arg in sys.argv[1:])] or [
    ("llama3-8b", 1), ("qwen3-0.6b", 1), ("qwen3-0.6b", 128), ("qwen3-0.6b", 256)]
for name, batch in CASES:
    shape = resolve_shape(name)
    ck = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16)
    eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=max(batch, 1),
                                  max_num_batched_tokens=16384, max_model_len=4096,
                                  memory_budget_bytes=16 << 30), ck)
    p = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(batch):
        eng.add_request([1 + (i * 7 + j) % 1000 for j in range(512)], p)
    for _ in range(20):
        eng.step()  # prefill + warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 50
    for _ in range(n):
        eng.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / n * 1000
    g = eng.runner.graphs
    bucket = g.bucket(batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        g.replay(bucket)
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / n
    hidden = g.replay(bucket)
    start.record()
    for _ in range(n):
        logits = eng.model.compute_logits(hidden)
        logits.argmax(-1)
    end.record()
    torch.cuda.synchronize()
    logits_ms = start.elapsed_time(end) / n
    print(f"{name} batch {batch}: engine step {step_ms:.2f} ms, graph replay {replay_ms:.2f} ms, "
          f"logits+argmax {logits_ms:.2f} ms -> host/other {step_ms - replay_ms - logits_ms:.2f} ms")
    del eng, ck, g, hidden
    torch.cuda.empty_cache()
