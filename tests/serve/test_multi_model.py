"""Several models behind one live server: routing by name and alias, loading on demand under a memory
budget (least recently used idle model unloaded, busy ones never), per-model queue limits, the admin API.

The models are the embedded SmolLM2 under different names and dtypes (a float32 "alpha" and a bfloat16
"beta", the way one serves a model beside its lower-precision variant), each with a small KV cache.
Answers are checked against offline greedy generation of the same engine settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from test_metrics import scrape, value

from trident.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.sizing import estimate_memory, gguf_native
from trident.loader import load_checkpoint

KV = 16 << 20
CONTEXT = 256
"""A context 16 MiB of KV cache holds a sequence of (364 tokens in float32; a server refuses a cache shorter)."""
ALPHA = EngineConfig(model="", dtype="float32", max_model_len=CONTEXT, cache=CacheConfig(memory_budget_bytes=KV))
BETA = EngineConfig(model="", dtype="bfloat16", max_model_len=CONTEXT, cache=CacheConfig(memory_budget_bytes=KV))
ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "max_tokens": 12}


def _estimate(config: EngineConfig) -> int:
    """The pool's estimate: the checkpoint as the engine will load it (bf16 on the CPU keeps the GGUF's codes)."""
    checkpoint = load_checkpoint(None, gguf_native(config, torch.device(config.device)))
    return estimate_memory(checkpoint.config, config, checkpoint.quantization).total_bytes


@pytest.fixture(scope="module")
def budget() -> int:
    """Room for either model alone, not for both."""
    alpha, beta = _estimate(ALPHA), _estimate(BETA)
    return max(alpha, beta) + min(alpha, beta) // 2


@pytest.fixture(scope="module")
def budget_server(start_server, budget) -> Iterator:
    from trident.serve import ModelPool, ModelSpec, PoolConfig, ServeConfig, build_app

    pool = ModelPool(PoolConfig(models=(ModelSpec("alpha", ALPHA), ModelSpec("beta", BETA, aliases=("beta-fast",))),
                                memory_budget_bytes=budget), ServeConfig(admin_key=ADMIN_KEY))
    assert pool.preload() == ["alpha"]  # beta does not fit beside it
    with start_server(build_app(pool), None) as live:
        live.pool = pool
        yield live


@pytest.fixture(scope="module")
def references() -> dict[str, str]:
    """Offline greedy completions of PROMPT with each model's engine settings."""
    from trident import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=GREEDY["max_tokens"])
    return {name: LLM(dtype=dtype, memory_budget_bytes=KV, max_model_len=CONTEXT).generate(PROMPT, params)[0]
            .outputs[0].text for name, dtype in (("alpha", "float32"), ("beta", "bfloat16"))}


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _loaded(live) -> dict[str, bool]:
    return {c["id"]: c["loaded"] for c in httpx.get(f"{live.base_url}/v1/models").json()["data"]}


def _wait_idle(live, name: str, timeout_s: float = 30) -> None:
    """Wait until model ``name`` has no request in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = next(s for s in live.pool.statuses() if s.name == name)
        engine = live.pool.loaded_engines().get(name)
        if status.active_requests == 0 and (engine is None or not engine.engine.has_unfinished()):
            return
        assert time.monotonic() < deadline, f"{name} still busy: {status}"
        time.sleep(0.05)


def test_models_and_aliases_listed(budget_server):
    cards = httpx.get(f"{budget_server.base_url}/v1/models").json()["data"]
    assert [(c["id"], c["root"], c["loaded"]) for c in cards] == [
        ("alpha", "alpha", True), ("beta", "beta", False), ("beta-fast", "beta", False)]
    assert all(c["max_model_len"] == CONTEXT for c in cards)  # beta's known from its estimate before loading


def test_request_for_unloaded_model_evicts_the_lru_one(budget_server, references, budget):
    client = _client(budget_server)
    before, _ = scrape(budget_server.base_url)
    a = client.completions.create(model="alpha", prompt=PROMPT, **GREEDY)
    assert a.model == "alpha" and a.choices[0].text == references["alpha"]
    b = client.completions.create(model="beta-fast", prompt=PROMPT, **GREEDY)  # through the alias
    assert b.model == "beta" and b.choices[0].text == references["beta"]
    assert _loaded(budget_server) == {"alpha": False, "beta": True, "beta-fast": True}
    again = client.completions.create(model="alpha", prompt=PROMPT, **GREEDY)  # and back: beta goes
    assert again.choices[0].text == references["alpha"]
    assert _loaded(budget_server)["beta"] is False
    after, _ = scrape(budget_server.base_url)
    for name, loads, unloads in (("alpha", 1, 1), ("beta", 1, 1)):
        assert value(after, "trident_model_loads_total", name) - value(before, "trident_model_loads_total", name) \
            == loads
        assert value(after, "trident_model_unloads_total", name) - value(before, "trident_model_unloads_total",
                                                                          name) == unloads
    assert value(after, "trident_model_loaded", "alpha") == 1 and value(after, "trident_model_loaded", "beta") == 0
    held = value(after, "trident_model_memory_bytes", "alpha")
    assert 0 < held <= budget and value(after, "trident_model_memory_bytes", "beta") == 0
    assert after[("trident_memory_budget_bytes", frozenset())] == budget
    requests = [("alpha", "length"), ("beta", "length")]
    assert all(value(after, "trident_requests_total", m, status=s) >= 1 for m, s in requests)


def test_busy_model_is_never_unloaded(budget_server):
    url = budget_server.base_url
    _client(budget_server).completions.create(model="beta", prompt=PROMPT, max_tokens=1)  # beta in, alpha out
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": CONTEXT - 16, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # beta is generating
        refused = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        error = refused.json()["error"]
        assert error["code"] == "model_capacity" and "beta (1 requests)" in error["message"]
        busy = httpx.post(f"{url}/admin/models/unload", json={"model": "beta"}, headers=ADMIN)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"
        assert _loaded(budget_server)["beta"] is True
    _wait_idle(budget_server, "beta")  # the client left: its request is aborted, beta is idle again
    ok = _client(budget_server).completions.create(model="alpha", prompt=PROMPT, **GREEDY)
    assert ok.model == "alpha" and _loaded(budget_server) == {"alpha": True, "beta": False, "beta-fast": False}
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_admin_api(budget_server, references):
    url = budget_server.base_url
    assert httpx.get(f"{url}/admin/models").status_code == 401
    wrong = httpx.get(f"{url}/admin/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    listing = httpx.get(f"{url}/admin/models", headers=ADMIN).json()
    assert [m["name"] for m in listing["models"]] == ["alpha", "beta"] and listing["aliases"] == {"beta-fast": "beta"}
    assert listing["loaded_bytes"] == sum(m["memory_bytes"] for m in listing["models"] if m["loaded"])

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{url}/admin/models/{path}", json=body, headers=ADMIN, timeout=120)

    assert post("unload", {"model": "nope"}).status_code == 404
    unloaded = post("unload", {"model": "alpha"})
    assert unloaded.status_code == 200 and unloaded.json()["loaded"] is False
    loaded = post("load", {"model": "beta-fast"})
    assert loaded.status_code == 200 and loaded.json()["loaded"] is True and loaded.json()["name"] == "beta"
    # register a new model at run time: the embedded one again, bf16, a 16 MiB KV cache
    gamma = post("load", {"model": "gamma", "path": "default", "dtype": "bfloat16", "kv_cache_memory": KV,
                          "max_model_len": CONTEXT})
    assert gamma.status_code == 200 and gamma.json()["loaded"] is True
    answer = _client(budget_server).completions.create(model="gamma", prompt=PROMPT, **GREEDY)
    assert answer.choices[0].text == references["beta"]  # same weights and settings as beta
    conflict = post("load", {"model": "gamma", "path": "default", "dtype": "float32"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "model_conflict"
    unknown = post("load", {"model": "delta", "path": "default", "colour": "blue"})
    assert unknown.status_code == 400 and "colour" in unknown.json()["error"]["message"]
    missing = post("load", {"model": "delta", "path": "/nonexistent/model.gguf"})
    assert missing.status_code == 400
    too_big = post("load", {"model": "huge", "path": "default", "dtype": "float32", "kv_cache_memory": "4GiB"})
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "model_too_large"
    assert "delta" not in _loaded(budget_server)  # a model that failed to load is not served
    assert 'model="delta"' not in httpx.get(f"{url}/metrics").text
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def pair_server(start_server) -> Iterator:
    """Both models loaded at once (no budget); alpha may run one sequence and queue one more."""
    from trident.serve import ModelPool, ModelSpec, PoolConfig, build_app

    tight = EngineConfig(model="", dtype="float32", max_model_len=CONTEXT, cache=CacheConfig(memory_budget_bytes=KV),
                         scheduler=SchedulerConfig(max_num_seqs=1))
    pool = ModelPool(PoolConfig(models=(ModelSpec("alpha", tight, max_queued_requests=1), ModelSpec("beta", BETA))))
    assert pool.preload() == ["alpha", "beta"]
    with start_server(build_app(pool), None) as live:
        live.pool = pool
        yield live


def test_two_models_answer_at_once(pair_server, references):
    client = _client(pair_server)
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        answers[name] = client.completions.create(model=name, prompt=PROMPT, **GREEDY).choices[0].text

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == references
    assert httpx.get(f"{pair_server.base_url}/admin/models").status_code == 403  # no admin key: admin API off


def test_per_model_queue_limit(pair_server):
    """alpha runs one sequence and queues one: a burst to alpha gets 429s while beta keeps answering."""
    url = pair_server.base_url
    statuses: list[int] = []

    def flood() -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 24},
                       timeout=120)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for t in threads:
        t.start()
    beta = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 4}, timeout=120)
    for t in threads:
        t.join()
    assert beta.status_code == 200
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2 and set(statuses) <= {200, 429}
