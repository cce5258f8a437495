"""Asynchronous scheduling (step k planned and launched before step k-1's tokens are applied, its pending
tokens fed on the device) changes nothing a caller can see: the same tokens, logprobs, texts, finish reasons
and streamed deltas as synchronous steps, through preemption, prefix caching, chunked prefill, n > 1, aborts,
stop strings and the context length; all blocks come back. On the CPU the eager path feeds the tokens; the
CUDA-graph path is checked in tests/integration/test_cuda.py."""

from __future__ import annotations

import random

import pytest

from trident import LLM, SamplingParams
from trident.engine.engine import LLMEngine
from trident.engine.plan import PENDING_TOKEN


def _engine(tiny_llama_dir, async_scheduling: bool, **options) -> LLMEngine:
    options = {"dtype": "float32", "block_size": 4, **options}
    engine = LLM(str(tiny_llama_dir), async_scheduling=async_scheduling, **options).engine
    assert engine.async_scheduling is async_scheduling
    return engine


def _requests(seed: int, count: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    kinds = [
        lambda: SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 14), ignore_eos=True),
        lambda: SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 14)),  # may stop on EOS
        lambda: SamplingParams(temperature=0.9, top_p=0.8, seed=rng.randrange(1000), max_tokens=rng.randrange(1, 9),
                               ignore_eos=True, logprobs=2),
        lambda: SamplingParams(temperature=0.7, top_k=5, seed=rng.randrange(1000), n=2, max_tokens=6, ignore_eos=True),
        lambda: SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, stop_token_ids=(7, 9)),
    ]
    shared = [3 + i % 50 for i in range(12)]
    requests = []
    for i in range(count):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(2, 211) for _ in range(rng.randrange(1, 30))]
        requests.append((prompt, rng.choice(kinds)()))
    return requests


def _run(engine: LLMEngine, requests, only_finished: bool = False, abort_at: dict[int, int] | None = None) -> dict:
    """Per request: its streamed (token ids, delta text) in order and its final output, as plain values."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    streamed: dict[str, list] = {i: [] for i in ids}
    finals: dict[str, tuple] = {}
    steps = 0
    while engine.has_unfinished():
        for index, request_id in enumerate(ids):
            if abort_at and abort_at.get(index) == steps:
                engine.abort(request_id)
        steps += 1
        assert steps < 1000, "no progress"
        for out in engine.step(only_finished=only_finished):
            assert out.request_id not in finals, "an output after the final one"
            streamed[out.request_id].append(tuple((tuple(c.token_ids), c.delta_text) for c in out.outputs))
            if out.finished:
                finals[out.request_id] = tuple(
                    (c.index, tuple(c.token_ids), c.text, c.finish_reason, _logprobs(c.logprobs))
                    for c in out.outputs)
    assert engine.scheduler.block_manager.num_free_blocks == engine.num_blocks
    return {f"r{i}": (finals.get(request_id), _deltas(streamed[request_id])) for i, request_id in enumerate(ids)}


def _logprobs(logprobs) -> tuple | None:
    if logprobs is None:
        return None
    return tuple((t.token_id, t.logprob, tuple(t.top_logprobs)) for t in logprobs)


def assert_same(got, want, path: str = "") -> None:
    """Equal, floats (logprobs) within 1e-4: batches made of other chunks sum in another order (fp32
    differences ~1e-6); token ids, texts and finish reasons must be exactly the same."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _deltas(stream: list) -> tuple:
    """The streamed text of each sample joined, and its token ids as last seen: what a streaming client gets
    (how it is cut into steps may differ)."""
    if not stream:
        return ()
    return tuple(("".join(step[k][1] for step in stream), stream[-1][k][0]) for k in range(len(stream[-1])))


@pytest.mark.parametrize("only_finished", [False, True])
def test_async_steps_give_what_sync_steps_give(tiny_llama_dir, only_finished: bool) -> None:
    requests = _requests(seed=1, count=24)
    # A small cache and a small token budget: chunked prefill, prefix hits and preemption all happen.
    options = {"num_blocks": 48, "max_num_batched_tokens": 40, "max_num_seqs": 12}
    sync = _engine(tiny_llama_dir, False, **options)
    expected = _run(sync, requests, only_finished)
    engine = _engine(tiny_llama_dir, True, **options)
    assert_same(_run(engine, requests, only_finished), expected)
    assert engine.stats().num_preemptions > 0 and engine.stats().prefix_cache_hit_tokens > 0
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_steps_really_overlap_and_feed_pending_tokens(tiny_llama_dir) -> None:
    """Asynchronously, decode chunks are planned before their newest token is known (it is fed on the device),
    and a sequence whose pending token ends it by length is not planned once more."""
    engine = _engine(tiny_llama_dir, True)
    scheduler = engine.scheduler
    plans = []
    schedule = scheduler.schedule

    def recording_schedule():
        plan = schedule()
        plans.append(plan)
        return plan

    scheduler.schedule = recording_schedule
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request([5, 6, 7, 8, 9, 10], params)
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
    chunks = [c for p in plans for c in p.chunks]
    # the prompt, then 4 decodes, each fed the token sampled by the step before: none planned past max_tokens
    assert [c.token_ids for c in chunks[1:]] == [(PENDING_TOKEN,)] * 4
    assert len(chunks) == 5
    sync = _engine(tiny_llama_dir, False)
    request_id = sync.add_request([5, 6, 7, 8, 9, 10], params)
    final = None
    while sync.has_unfinished():
        for out in sync.step():
            if out.request_id == request_id and out.finished:
                final = out
    assert tuple(final.outputs[0].token_ids) == tuple(outputs[-1].outputs[0].token_ids)


def test_aborts_mid_flight(tiny_llama_dir) -> None:
    requests = _requests(seed=2, count=10)
    abort_at = {1: 2, 4: 3, 7: 0, 8: 5}
    sync = _run(_engine(tiny_llama_dir, False, max_num_batched_tokens=32), requests, abort_at=abort_at)
    got = _run(_engine(tiny_llama_dir, True, max_num_batched_tokens=32), requests, abort_at=abort_at)
    for key in sync:
        index = int(key[1:])
        if index in abort_at:
            assert got[key][0] is None or got[key][0][0][3] in ("abort", "length", "stop")
        else:
            assert_same(got[key], sync[key])


def test_the_context_length_ends_sequences_without_planning_past_it(tiny_llama_dir) -> None:
    """With max_model_len 24 a sequence may reach 24 tokens; asynchronously its pending last token is known to
    end it, so no step computes position 24 (which has no KV slot and no rotary position)."""
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    prompts = [[2 + i, 3, 4, 5, 6, 7, 8, 9, 10, 11][: 3 + i] for i in range(6)]
    results = []
    for async_scheduling in (False, True):
        engine = _engine(tiny_llama_dir, async_scheduling, max_model_len=24)
        outs = _run(engine, [(p, params) for p in prompts], only_finished=True)
        results.append(outs)
        for final, _ in outs.values():
            assert final[0][3] == "length"
    assert_same(results[1], results[0])
    assert all(len(p) + len(final[0][1]) == 24 for p, (final, _) in zip(prompts, results[1].values()))


def test_penalties_switch_to_synchronous_steps_and_back(tiny_llama_dir) -> None:
    penalized = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    requests = _requests(seed=3, count=8)
    requests[3] = (requests[3][0], penalized)
    sync = _run(_engine(tiny_llama_dir, False), requests)
    engine = _engine(tiny_llama_dir, True)
    assert_same(_run(engine, requests), sync)
    assert engine._num_history_seqs == 0


def test_stop_strings_end_on_the_same_text(default_llm) -> None:
    """A stop string is only seen once the token's text is decoded, a step later than the device planned: the
    extra token is dropped and the text and tokens are those of synchronous steps."""
    engine = default_llm.engine
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Count from one to twenty in words."}])
    base = SamplingParams(temperature=0.0, max_tokens=40)
    plain = default_llm.generate([prompt], base)[0].text
    stop = plain.split()[3]  # a word in the middle of the answer
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,))
    results = []
    for async_scheduling in (False, True):
        engine.async_scheduling = async_scheduling
        try:
            results.append(_run(engine, [(prompt, params)] * 3))
        finally:
            engine.async_scheduling = False
    assert_same(results[1], results[0])
    final = results[1]["r0"][0]
    assert final[0][3] == "stop" and stop not in final[0][2] and plain.startswith(final[0][2])
