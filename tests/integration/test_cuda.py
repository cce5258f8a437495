"""The engine on a CUDA device gives the CPU's greedy tokens (fp32), with the reference torch attention
and with the Triton kernels (auto's choice there)."""

from __future__ import annotations

import pytest
from test_batching import GREEDY, _prompts

from trident import LLM, SamplingParams


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_greedy(tiny_llama_dir) -> None:
    prompts = _prompts(16, seed=7)
    cpu = [o.token_ids for o in LLM(str(tiny_llama_dir), dtype="float32", block_size=4).generate(prompts, GREEDY)]
    cuda = LLM(str(tiny_llama_dir), block_size=4, device="cuda", dtype="float32", num_blocks=64,
               attention_backend="torch")
    assert [o.token_ids for o in cuda.generate(prompts, GREEDY)] == cpu
    assert cuda.engine.stats().num_preemptions > 0  # a small cache, so preemption ran on the device too
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, n=2, ignore_eos=True)
    out = cuda.generate(prompts[:2], sampled)
    assert all(len(o.token_ids) == 8 for r in out for o in r.outputs)
    again = cuda.generate(prompts[:2], sampled)  # seeded: the same samples again
    assert [[o.token_ids for o in r.outputs] for r in again] == [[o.token_ids for o in r.outputs] for r in out]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_backend_matches_cpu_greedy(tiny_llama_dir, block_size: int) -> None:
    """Chunked prefill, prefix-cache hits, preemption and mixed prefill/decode steps through the kernels."""
    system = [5 + i % 100 for i in range(2 * block_size + 3)]
    prompts = _prompts(16, seed=7) + _prompts(8, seed=8, prefix=system)
    options = dict(block_size=block_size, dtype="float32", max_num_batched_tokens=48)
    cpu = [o.token_ids for o in LLM(str(tiny_llama_dir), **options).generate(prompts, GREEDY)]
    cuda = LLM(str(tiny_llama_dir), device="cuda", num_blocks=256 // block_size, attention_backend="triton",
               **options)
    assert cuda.engine.attention_backend == "triton"
    assert [o.token_ids for o in cuda.generate(prompts, GREEDY)] == cpu
    stats = cuda.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    graphs = cuda.engine.runner.graphs
    assert graphs is not None and graphs.replays > 0  # decode-only steps replayed CUDA graphs


@pytest.mark.gpu
def test_cuda_graphs_match_eager(tiny_llama_dir) -> None:
    """Batches that fill a bucket exactly and ones padded up to the next (3 -> 4, 11 -> 16, 20 -> 24)."""
    options = dict(device="cuda", dtype="float32", num_blocks=512, max_num_seqs=24)
    graphed = LLM(str(tiny_llama_dir), **options)
    eager = LLM(str(tiny_llama_dir), enforce_eager=True, **options)
    assert graphed.engine.runner.graphs.batch_sizes == (1, 2, 4, 8, 16, 24) and eager.engine.runner.graphs is None
    for n in (1, 3, 8, 11, 20):
        prompts = _prompts(n, seed=n)
        want = [o.token_ids for o in eager.generate(prompts, GREEDY)]
        before = graphed.engine.runner.graphs.replays
        assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == want
        assert graphed.engine.runner.graphs.replays > before


@pytest.mark.gpu
def test_default_model_gpu_greedy_equals_cpu(default_llm) -> None:
    """The real SmolLM2 on CUDA (Triton kernels, CUDA graphs, float32) gives the CPU reference's 64 greedy
    tokens; bf16 with graphs gives bf16 eager's."""
    chats = [[{"role": "user", "content": c}] for c in
             ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
              "Explain what a CPU cache is.")]
    params = SamplingParams(temperature=0, max_tokens=64)
    cpu = [o.token_ids for o in default_llm.chat(chats, params)]
    gpu = LLM(device="cuda", dtype="float32")
    assert gpu.engine.runner.graphs is not None
    assert [o.token_ids for o in gpu.chat(chats, params)] == cpu
    bf16 = [o.token_ids for o in LLM(device="cuda").chat(chats, params)]
    assert [o.token_ids for o in LLM(device="cuda", enforce_eager=True).chat(chats, params)] == bf16


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda(tiny_llama_dir) -> None:
    assert LLM(str(tiny_llama_dir), device="cuda", num_blocks=16).engine.attention_backend == "triton"


@pytest.mark.gpu
def test_async_scheduling_with_cuda_graphs_equals_sync(tiny_llama_dir) -> None:
    """Pending tokens fed inside CUDA-graph replays (and in eager mixed steps) give what synchronous steps give:
    tokens, texts, finish reasons, logprobs (within 1e-4), streamed outputs; through preemption and prefix hits."""
    from test_async_scheduling import _requests, _run, assert_same

    requests = _requests(seed=4, count=24)
    options = dict(device="cuda", dtype="float32", block_size=4, num_blocks=32, max_num_batched_tokens=40,
                   max_num_seqs=12)
    sync = LLM(str(tiny_llama_dir), async_scheduling=False, **options).engine
    engine = LLM(str(tiny_llama_dir), **options).engine
    assert engine.async_scheduling and engine.runner.graphs is not None  # both on by default on CUDA
    assert_same(_run(engine, requests), _run(sync, requests))
    assert engine.runner.graphs.replays > 0 and engine.stats().num_preemptions > 0


@pytest.mark.gpu
def test_greedy_argmax_on_cuda_picks_the_first_maximum() -> None:
    import torch

    from trident.engine.sampler import ARGMAX_GROUPS, argmax

    gen = torch.Generator().manual_seed(1)
    for vocab in (ARGMAX_GROUPS * 2004, ARGMAX_GROUPS * 3 + 1):  # two passes; torch's own (no even split)
        logits = torch.randint(-4, 5, (16, vocab), generator=gen).to(torch.bfloat16)  # ties everywhere
        logits[3, 5] = logits[3, vocab - 7] = 9  # the maximum twice, in different slices
        assert torch.equal(argmax(logits.cuda()).cpu(), logits.argmax(dim=-1))
