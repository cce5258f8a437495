"""Measure trident itself on a workload."""

from __future__ import annotations

import time

from rich.progress import Progress

from trident.bench.workloads import Workload
from trident.engine.engine import LLMEngine
from trident.engine.request import SamplingParams


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)


def warm_up(engine: LLMEngine) -> None:
    engine.add_request(list(range(1, 33)), _params(4))
    while engine.has_unfinished():
        engine.step()


def run_latency(engine: LLMEngine, workload: Workload) -> dict:
    """Batch 1: prefill tok/s of the prompt, decode tok/s of the rest."""
    warm_up(engine)
    prompt = list(workload.prompts[0])
    t0 = time.perf_counter()
    engine.add_request(prompt, _params(workload.output_len))
    t_first = None
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens = len(out.outputs[0].token_ids)
            if t_first is None and tokens:
                t_first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prompt_tokens": len(prompt), "output_tokens": tokens,
        "prefill_tok_s": len(prompt) / (t_first - t0),
        "decode_tok_s": (tokens - 1) / (end - t_first),
        "ttft_ms": (t_first - t0) * 1000,
    }


def run_offline(engine: LLMEngine, workload: Workload) -> dict:
    """All prompts at once, continuously batched: total generated tokens per second."""
    warm_up(engine)
    t0 = time.perf_counter()
    for prompt in workload.prompts:
        engine.add_request(list(prompt), _params(workload.output_len))
    tokens = 0
    with Progress(transient=True) as progress:
        task = progress.add_task("trident offline", total=len(workload.prompts) * workload.output_len)
        while engine.has_unfinished():
            for out in engine.step():
                progress.advance(task)  # one new token per request per step
                if out.finished:
                    tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    return {"requests": len(workload.prompts), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_s": tokens / elapsed}
