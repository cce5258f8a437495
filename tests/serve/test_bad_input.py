"""Bad requests get a 4xx OpenAI-style JSON error, never a 500, and the server stays healthy."""

from __future__ import annotations

import httpx
import openai
import pytest

M = "smollm2-test"  # the conftest's served model name
CHAT = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * 9000  # more tokens than the 8192-token context

CASES = [
    # (route, raw body or JSON object, expected status, expected param or None)
    ("completions", b"{not json", 400, None),
    ("completions", b"", 400, None),
    ("completions", [1, 2, 3], 400, None),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": M}, 400, "prompt"),
    ("completions", {"model": M, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": M, "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("completions", {"model": M, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": M, "prompt": 42}, 400, "prompt"),
    ("completions", {"model": M, "prompt": "hi", "max_tokens": -1}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "max_tokens": 0}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "temperature": -0.5}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "top_p": 2}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "n": 0}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "logprobs": 50}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "stop": [""]}, 400, None),
    ("completions", {"model": M, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": M, "prompt": ""}, 400, None),
    ("completions", {"model": M, "prompt": [10**9]}, 400, None),
    ("completions", {"model": M, "prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": M, "prompt": LONG_PROMPT}, 400, "prompt"),
    ("completions", {"model": M, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("chat/completions", {"model": M, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": M, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": M, "messages": CHAT, "temperature": -1}, 400, None),
    ("chat/completions", {"model": M, "messages": CHAT, "max_completion_tokens": -5}, 400, None),
    ("chat/completions", {"model": M, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"model": M, "messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400, None),
    ("chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("chat/completions", {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404, "model"),
]


@pytest.mark.parametrize("route,body,status,param", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_request_is_a_json_4xx(live_server, route, body, status, param):
    url = f"{live_server.base_url}/v1/{route}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_unknown_route_and_method(live_server):
    r = httpx.get(f"{live_server.base_url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{live_server.base_url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="hi", temperature=-1)
    assert "temperature" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_server_healthy_after_bad_input(live_server, client):
    assert httpx.get(f"{live_server.base_url}/health").status_code == 200
    r = client.completions.create(model=M, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert r.choices[0].text
    live_server.wait_idle()
    engine = live_server.async_engine.engine
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
