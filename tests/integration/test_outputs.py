"""What LLMEngine.step hands out: outputs are values that never change afterwards (they share the
sequences' token lists), and step(only_finished=True), what LLM.generate uses, gives the same final
outputs as following every step."""

from __future__ import annotations

import random

from trident import LLM, SamplingParams
from trident.engine.engine import LLMEngine
from trident.engine.results import RequestOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
REQUESTS = [
    ([5, 6, 7, 8, 9], GREEDY),
    ([11, 12], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)),
    ([20, 21, 22, 23, 24, 25, 26], SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=6, ignore_eos=True)),
    ([30, 31, 32], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)),
]


def _tiny(tiny_llama_dir) -> LLMEngine:
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=4).engine


def _state(out: RequestOutput) -> tuple:
    """Everything a caller can read from an output, copied into plain values."""
    return (out.finished, out.metrics, tuple(
        (c.index, c.text, c.delta_text, tuple(c.token_ids), None if c.logprobs is None else tuple(c.logprobs),
         c.finish_reason) for c in out.outputs))


def _run(engine: LLMEngine, requests, only_finished: bool) -> tuple[dict[str, RequestOutput], list]:
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    finals: dict[str, RequestOutput] = {}
    seen = []
    while engine.has_unfinished():
        for out in engine.step(only_finished=only_finished):
            seen.append((out, _state(out)))
            assert out.request_id not in finals
            if out.finished:
                finals[out.request_id] = out
            else:
                assert not only_finished, "only finished requests are reported"
    assert sorted(finals) == sorted(ids)
    return {f"r{i}": finals[request_id] for i, request_id in enumerate(ids)}, seen


def test_outputs_handed_out_never_change(tiny_llama_dir) -> None:
    engine = _tiny(tiny_llama_dir)
    finals, seen = _run(engine, REQUESTS, only_finished=False)
    assert len(seen) > len(finals)  # intermediate outputs came too
    for out, state in seen:
        assert _state(out) == state  # unchanged by all the steps after it was handed out
        final = finals[next(k for k, v in finals.items() if v.request_id == out.request_id)]
        for c, f in zip(out.outputs, final.outputs, strict=True):
            assert tuple(f.token_ids[:len(c.token_ids)]) == tuple(c.token_ids)
            if c.logprobs is not None:
                assert f.logprobs[:len(c.logprobs)] == tuple(c.logprobs)
    by_request: dict[str, list[int]] = {}
    for out, _ in seen:
        by_request.setdefault(out.request_id, []).append(sum(len(c.token_ids) for c in out.outputs))
    assert all(lengths == sorted(set(lengths)) for lengths in by_request.values())  # one step, more tokens


def test_only_finished_steps_give_the_same_final_outputs(tiny_llama_dir) -> None:
    every_step, _ = _run(_tiny(tiny_llama_dir), REQUESTS, only_finished=False)
    only_finished, seen = _run(_tiny(tiny_llama_dir), REQUESTS, only_finished=True)
    assert len(seen) == len(REQUESTS)
    for key, a in every_step.items():
        b = only_finished[key]
        assert b.prompt_token_ids == a.prompt_token_ids and b.num_cached_tokens == a.num_cached_tokens
        assert [(c.index, c.token_ids, c.logprobs, c.finish_reason) for c in b.outputs] == \
               [(c.index, c.token_ids, c.logprobs, c.finish_reason) for c in a.outputs]
        m = b.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time and m.num_preemptions == 0
    assert [len(o.outputs[0].logprobs) for o in (only_finished["r1"], only_finished["r3"])] == [4, 12]
    assert only_finished["r0"].outputs[0].logprobs is None


def test_generated_text_is_the_streamed_text(default_llm) -> None:
    """With a real tokenizer: LLM.generate (only final outputs; text of samples without stop strings
    decoded once at the end) gives exactly the text that streaming every step gives."""
    engine = default_llm.engine
    tokenizer = default_llm.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": c}]) for c in (
        "Tell me a short story about a brave cat.", "What is the capital of France?", "Count to ten.")]
    params = [SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=20),
              SamplingParams(temperature=0.0, max_tokens=20, stop=[" of Fr", "is"]),
              SamplingParams(temperature=0.7, seed=11, max_tokens=20, stop=["you"], skip_special_tokens=False)]
    generated = default_llm.generate(prompts, params)

    rng = random.Random(0)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    streamed: dict[str, dict[int, str]] = {i: {} for i in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step(only_finished=rng.random() < 0.5):  # both kinds of step, mixed
            for c in out.outputs:
                streamed[out.request_id][c.index] = streamed[out.request_id].get(c.index, "") + c.delta_text
            if out.finished:
                finals[out.request_id] = out
    for request_id, gen, sp in zip(ids, generated, params):
        final = finals[request_id]
        for g, f in zip(gen.outputs, final.outputs, strict=True):
            assert g.token_ids == f.token_ids and g.finish_reason == f.finish_reason
            assert g.text == f.text == streamed[request_id][f.index]
            if not sp.stop:
                assert g.text == tokenizer.decode(list(g.token_ids))
    assert generated[1].text == "The capital" and [g.finish_reason for g in generated[1:]] == ["stop", "stop"]
    assert [o.finish_reason for o in generated[0].outputs] == ["length", "length"]
