"""Measure trident itself on a workload."""

from __future__ import annotations

import time

from trident.bench.workloads import Workload
from trident.engine.engine import LLMEngine
from trident.engine.request import SamplingParams
from trident.progress import progress_bar


def fixed_length_params(output_len: int) -> SamplingParams:
    """Greedy, exactly ``output_len`` tokens (EOS ignored): what every bench request asks for."""
    return SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)


WARM_UP_PROMPT_LEN = 32
"""Tokens of each warm-up prompt where a bench has no single prompt length to match."""


def warm_up(engine: LLMEngine, num_requests: int = 1, prompt_len: int = WARM_UP_PROMPT_LEN) -> None:
    """A few steps of ``num_requests`` requests of ``prompt_len`` tokens at once (capped at the engine's batch), so
    that one-time work (kernel compilation, allocator growth) for batched prefill and decode falls outside the
    timing. Kernels compiled per tile shape choose their tiles by the prefill's row count, so the latency bench
    warms up with a prompt as long as the one it times: after 32-token warm-ups, the first Llama-3-8B int4 run on a
    fresh H200 reported a 128-token TTFT of 510-645 ms (two repetitions' median, i.e. their mean) against 36 ms once
    the machine had run it before (docs/benchmarks.md, session 13)."""
    vocab = min(engine.model_config.vocab_size, 1000)
    for i in range(min(num_requests, engine.config.scheduler.max_num_seqs)):
        engine.add_request([(1 + i + j) % vocab for j in range(prompt_len)], fixed_length_params(4))
    while engine.has_unfinished():
        engine.step()


def run_latency(engine: LLMEngine, workload: Workload, collectives=None) -> dict:
    """Batch 1: prefill tok/s of the prompt, decode tok/s of the rest (after a warm-up of the prompt's length).
    ``collectives``: a tensor-parallel engine's CollectiveTimer (trident/distributed/timing.py), whose figures over
    the timed request join the result."""
    prompt = list(workload.prompts[0])
    warm_up(engine, prompt_len=len(prompt))
    if collectives is not None:
        collectives.start()
    t0 = time.perf_counter()
    engine.add_request(prompt, fixed_length_params(workload.output_lens[0]))
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
        **(collectives.stop(end - t0) if collectives is not None else {}),
    }


def run_offline(engine: LLMEngine, workload: Workload, collectives=None) -> dict:
    """All prompts at once, continuously batched: total generated tokens per second. ``steps`` counts engine
    steps, ``mean_batch`` the tokens one step generated on average. ``collectives`` as for :func:`run_latency`."""
    warm_up(engine, len(workload.prompts))
    if collectives is not None:
        collectives.start()
    t0 = time.perf_counter()
    for prompt, output_len in zip(workload.prompts, workload.output_lens):
        engine.add_request(list(prompt), fixed_length_params(output_len))
    tokens = steps = 0
    with progress_bar(transient=True) as progress:
        task = progress.add_task("trident offline", total=workload.output_tokens)
        while engine.has_unfinished():
            finished = engine.step(only_finished=True)  # as LLM.generate: no per-step outputs to build
            steps += 1
            done = sum(len(out.outputs[0].token_ids) for out in finished)
            progress.advance(task, done)
            tokens += done
    elapsed = time.perf_counter() - t0
    return {"requests": len(workload.prompts), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_s": tokens / elapsed, "steps": steps, "mean_batch": tokens / steps,
            **(collectives.stop(elapsed) if collectives is not None else {})}
