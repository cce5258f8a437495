"""The OpenAI routes through the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import httpx
import pytest

from trident.engine.request import SamplingParams

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def test_health_and_models(live_server, client, model_name):
    assert httpx.get(f"{live_server.base_url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_chat_greedy_matches_offline(client, offline_llm, model_name):
    ref = offline_llm.chat(CHAT, greedy(40))[0]
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=40)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    prompt_ids = offline_llm.tokenizer.encode_chat(CHAT)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(ref.token_ids)

    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_greedy_matches_offline(client, offline_llm, model_name):
    ref = offline_llm.generate(PROMPT, greedy(24))[0]
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=24)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(offline_llm.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 24

    stream = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=24, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"

    # token ids as the prompt give the same text
    ids = offline_llm.tokenizer.encode(PROMPT)
    r = client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=24)
    assert r.choices[0].text == ref.text


def test_stop_strings(client, offline_llm, model_name):
    full = offline_llm.generate(PROMPT, greedy(24))[0].text
    stop = full.strip().split()[2]  # a word from the middle of the greedy continuation
    ref = offline_llm.generate(PROMPT, greedy(24, stop=(stop,)))[0]
    assert stop not in ref.text and ref.finish_reason == "stop"
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=24, stop=stop)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=24,
                                            stop=[stop, "zzzz"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=40, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content


def test_n2_gives_two_choices(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, n=2, temperature=1.0, seed=7, max_tokens=12,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, n=2, temperature=1.0, seed=7,
                                                 max_tokens=12, stream=True))
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert all(by_index.values())


def test_completion_logprobs(client, offline_llm, model_name):
    ref = offline_llm.generate(PROMPT, greedy(10, logprobs=3))[0]
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=10, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 10
    assert "".join(lp.tokens) == r.choices[0].text
    for token, logprob, top, sampled in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref.outputs[0].logprobs):
        assert logprob <= 0 and len(top) <= 3
        assert top[token] == max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the most likely
        assert logprob == pytest.approx(sampled.logprob, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # the end-of-turn token counts and has a logprob, but no text
        assert content[-1].token == "<|im_end|>"
        content = content[:-1]
    assert "".join(t.token for t in content) == text
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert bytes(t.bytes).decode() == t.token
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None


def test_cached_tokens_reported(client, model_name):
    prompt = "Here is a long shared preamble that several requests repeat word for word. " * 4
    first = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=2)
    second = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_sampling_options_accepted(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0.7, top_p=0.9, presence_penalty=0.5,
                                  frequency_penalty=0.5, seed=3, max_tokens=8,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    again = client.completions.create(model=model_name, prompt=PROMPT, temperature=0.7, top_p=0.9,
                                      presence_penalty=0.5, frequency_penalty=0.5, seed=3, max_tokens=8,
                                      extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].text == again.choices[0].text  # same seed, same text
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
