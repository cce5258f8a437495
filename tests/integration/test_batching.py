"""Continuous batching is invisible in the results: greedy tokens are the same alone and together,
with preemption, and with a shared prefix served from the prefix cache; blocks all come back."""

from __future__ import annotations

import random

import torch

from trident import LLM, SamplingParams


def _prompts(n: int, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(2, 211) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_generate_equals_hf_greedy(tiny_llama_dir, tiny_llama_hf) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4)
    prompts = _prompts(4, seed=1)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == _hf_greedy(tiny_llama_hf, prompt, 10)
        assert out.finish_reason == "length"


def test_batch_invariance_alone_together_preempted_prefix(tiny_llama_dir) -> None:
    prompts = _prompts(16, seed=2)
    alone_llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4)
    alone = [alone_llm.generate([p], GREEDY)[0].token_ids for p in prompts]

    together = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, max_num_batched_tokens=64)
    assert [o.token_ids for o in together.generate(prompts, GREEDY)] == alone
    assert together.engine.stats().num_preemptions == 0

    # A cache of 40 blocks of 4 tokens cannot hold 16 sequences of up to 50 tokens: preemption happens.
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=40, max_num_batched_tokens=64)
    assert [o.token_ids for o in small.generate(prompts, GREEDY)] == alone
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    assert small.engine.scheduler.block_manager.num_free_blocks == 40


def test_shared_prefix_hits_the_cache(tiny_llama_dir) -> None:
    system = [5 + i % 100 for i in range(24)]  # 6 full blocks of 4 tokens
    prompts = _prompts(16, seed=3, prefix=system)
    reference = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, enable_prefix_caching=False)
    expected = [o.token_ids for o in reference.generate(prompts, GREEDY)]
    assert reference.engine.stats().prefix_cache_hit_tokens == 0

    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4)
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    outs = llm.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + [o.token_ids for o in outs] == expected
    assert all(o.num_cached_tokens >= 24 for o in outs)
    assert llm.engine.stats().prefix_cache_hit_tokens >= 24 * 15


def test_abort_mid_generation_frees_blocks_and_spares_the_others(tiny_llama_dir) -> None:
    prompts = _prompts(4, seed=5)
    alone = [o.token_ids for o in LLM(str(tiny_llama_dir), dtype="float32", block_size=4).generate(prompts, GREEDY)]
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    engine.abort("no-such-request")  # unknown ids are ignored
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != ids[1]
            if out.finished:
                finished[out.request_id] = out.token_ids
    assert [finished[i] for i in (ids[0], ids[2], ids[3])] == [alone[0], alone[2], alone[3]]
    assert engine.scheduler.block_manager.num_free_blocks == engine.num_blocks
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
