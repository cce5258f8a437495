"""Many streaming clients at once join one batch and each gets exactly its offline greedy text; a client
that goes away has its request aborted and its KV blocks freed."""

from __future__ import annotations

import json
import threading
import time

import httpx

from trident.engine.request import SamplingParams

TOPICS = ["the sea", "a red fox", "old computers", "mountains", "a quiet library", "rain", "chess", "bread"]
TEMPLATES = ["Write one sentence about {}.", "Describe {} in a few words.", "What do you like about {}?",
             "Give me a fact about {}."]


def test_concurrent_streams_match_offline(live_server, client, offline_llm, model_name):
    prompts = [template.format(topic) for template in TEMPLATES for topic in TOPICS]  # 32 clients
    refs = offline_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    texts: list[str | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            start.wait()
            stream = client.completions.create(model=model_name, prompt=prompts[i], temperature=0, max_tokens=24,
                                               stream=True)
            texts[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    engine = live_server.async_engine.engine
    peak = 0
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, engine.stats().num_running)
        time.sleep(0.005)
    assert not errors, errors
    assert texts == [r.text for r in refs]
    assert peak > 1  # the clients really shared the running batch
    live_server.wait_idle()


def _assert_engine_clean(live_server) -> None:
    live_server.wait_idle()
    engine = live_server.async_engine.engine
    assert not engine.has_unfinished()
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_stream_disconnect_aborts_and_frees_blocks(live_server, model_name):
    before = live_server.async_engine.stats().num_aborted
    body = {"model": model_name, "prompt": "Count slowly:", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{live_server.base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    json.loads(line[len("data: "):])
                    events += 1
                if events == 3:
                    break
        # leaving the block closes the connection mid-stream
    _assert_engine_clean(live_server)
    assert live_server.async_engine.stats().num_aborted == before + 1


def test_non_streaming_disconnect_aborts(live_server, model_name):
    before = live_server.async_engine.stats().num_aborted
    body = {"model": model_name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "ignore_eos": True}
    try:
        httpx.post(f"{live_server.base_url}/v1/chat/completions", json=body, timeout=0.5)
        raise AssertionError("the request should have outlived the client's timeout")
    except httpx.ReadTimeout:
        pass
    _assert_engine_clean(live_server)
    assert live_server.async_engine.stats().num_aborted == before + 1
