"""Limits and safety on a second live server built with a ServeConfig: API key, queue limit, request time
limit, body size limit and CORS; each refusal is an OpenAI-style error counted as status="error", and the
server stays healthy. The server has its own small engine (2 sequences at a time), so it may run beside the
session's default server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from test_metrics import delta, scrape

MODEL = "limited"
KEY = "test-secret-key"
ORIGIN = "https://allowed.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUED = 2
TIMEOUT_S = 2.0
MAX_BODY = 4096
PROMPT = "The capital of France is"
FLOOD_TOKENS = 8
FLOOD_SIZE = 16


@pytest.fixture(scope="module")
def limited(start_server) -> Iterator:
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.serve import AsyncEngine, ModelPool, ServeConfig, build_app

    config = ServeConfig(api_key=KEY, max_queued_requests=MAX_QUEUED, request_timeout_s=TIMEOUT_S,
                         max_body_bytes=MAX_BODY, allowed_origins=(ORIGIN,))
    async_engine = AsyncEngine(LLMEngine(engine_config(None, dtype="float32", max_num_seqs=2)))
    with start_server(build_app(ModelPool.of_engine(async_engine, MODEL, config)), async_engine) as live:
        yield live


def _client(live, api_key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def _errors(live, model: str = MODEL) -> float:
    """Requests counted as errors of ``model`` ("": refused before they were routed to a model)."""
    samples, _ = scrape(live.base_url)
    return samples[("trident_requests_total", frozenset({"model": model, "status": "error"}.items()))]


def _assert_all_blocks_free(live) -> None:
    live.wait_idle()
    blocks = live.async_engine.engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


def test_api_key_required(limited):
    before, _ = scrape(limited.base_url)  # /metrics and /health stay open
    assert httpx.get(f"{limited.base_url}/health").json() == {"status": "ok"}
    url = f"{limited.base_url}/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{limited.base_url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(limited, "wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    after, _ = scrape(limited.base_url)
    assert delta(before, after, "trident_requests_total", "", status="error") == 4  # refused before routing
    assert _client(limited).models.list().data[0].id == MODEL
    reply = _client(limited).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=3, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 3


async def _flood(base_url: str) -> list[httpx.Response]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": FLOOD_TOKENS, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=FLOOD_SIZE)
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(FLOOD_SIZE)))


def test_full_queue_answers_429(limited):
    reference = _client(limited).completions.create(model=MODEL, prompt=PROMPT, max_tokens=FLOOD_TOKENS,
                                                    temperature=0, extra_body={"ignore_eos": True})
    errors_before = _errors(limited)
    responses = asyncio.run(_flood(limited.base_url))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            choice = r.json()["choices"][0]
            assert choice["text"] == reference.choices[0].text and choice["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == FLOOD_TOKENS
    assert _errors(limited) - errors_before == statuses.count(429)
    _assert_all_blocks_free(limited)


def test_request_over_time_limit_is_aborted(limited):
    errors_before = _errors(limited)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}
    r = httpx.post(f"{limited.base_url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    _assert_all_blocks_free(limited)
    with httpx.stream("POST", f"{limited.base_url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"request_timeout"' in events[-2] and len(events) > 3
    _assert_all_blocks_free(limited)
    assert _errors(limited) - errors_before == 2


def test_oversized_body_is_413(limited):
    errors_before = _errors(limited, "")  # refused before the body was read, so before routing
    url = f"{limited.base_url}/v1/completions"
    big = {"model": MODEL, "prompt": "x" * (MAX_BODY + 100), "max_tokens": 2}
    r = httpx.post(url, json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what arrives
        yield b'{"model": "limited", "prompt": "'
        for _ in range(8):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(url, content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert _errors(limited, "") - errors_before == 2


def test_cors_only_for_the_allowed_origin(limited, live_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    url = f"{limited.base_url}/v1/chat/completions"
    r = httpx.options(url, headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{limited.base_url}/health", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{live_server.base_url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert "access-control-allow-origin" not in r.headers  # CORS is off by default


def test_healthy_after_all_of_it(limited):
    assert httpx.get(f"{limited.base_url}/health").json() == {"status": "ok"}
    r = _client(limited).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text and 1 <= r.usage.completion_tokens <= 4
    _assert_all_blocks_free(limited)
