"""The engine on a CUDA device (reference torch attention) gives the CPU's greedy tokens (fp32)."""

from __future__ import annotations

import pytest
from test_batching import GREEDY, _prompts

from trident import LLM, SamplingParams


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_greedy(tiny_llama_dir) -> None:
    prompts = _prompts(16, seed=7)
    cpu = [o.token_ids for o in LLM(str(tiny_llama_dir), dtype="float32", block_size=4).generate(prompts, GREEDY)]
    cuda = LLM(str(tiny_llama_dir), block_size=4, device="cuda", dtype="float32", num_blocks=64)
    assert [o.token_ids for o in cuda.generate(prompts, GREEDY)] == cpu
    assert cuda.engine.stats().num_preemptions > 0  # a small cache, so preemption ran on the device too
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, n=2, ignore_eos=True)
    out = cuda.generate(prompts[:2], sampled)
    assert all(len(o.token_ids) == 8 for r in out for o in r.outputs)
    again = cuda.generate(prompts[:2], sampled)  # seeded: the same samples again
    assert [[o.token_ids for o in r.outputs] for r in again] == [[o.token_ids for o in r.outputs] for r in out]
