"""GET /metrics on the live server: parses, counts every request exactly once, and serves every metric the
Grafana dashboard queries. The server is shared by the session, so each test compares before/after."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trident.serve.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
CHAT = [{"role": "user", "content": "Name a colour."}]

Samples = dict[tuple[str, frozenset], float]


def scrape(base_url: str) -> tuple[Samples, set[str]]:
    """The /metrics samples by (name, labels), and every family and sample name exposed."""
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(response.text):
        names.add(family.name)
        for s in family.samples:
            names.add(s.name)
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, names


def value(samples: Samples, name: str, model: str, **labels: str) -> float:
    return samples[(name, frozenset({"model": model, **labels}.items()))]


def delta(before: Samples, after: Samples, name: str, model: str, **labels: str) -> float:
    return value(after, name, model, **labels) - value(before, name, model, **labels)


def test_metrics_parse_and_start_at_zero():
    """Two apps in one process keep separate registries; every series exists before its first event."""
    a, b = ServerMetrics(["a"]), ServerMetrics(["b"])
    a.model_loaded("a", memory_bytes=123, load_seconds=0.5)
    text = a.render().decode()
    assert 'trident_model_loads_total{model="a"} 1.0' in text
    assert 'trident_model_unloads_total{model="a"} 0.0' in text
    assert 'trident_requests_total{model="a",status="abort"} 0.0' in text
    assert 'trident_model_loaded{model="a"} 1.0' in text and 'trident_model_memory_bytes{model="a"} 123.0' in text
    assert 'trident_requests_total{model="",status="error"} 0.0' in text  # refused before routing
    assert 'model="a"' not in b.render().decode()


def test_model_load_counted_once(live_server, model_name):
    samples, _ = scrape(live_server.base_url)
    assert value(samples, "trident_model_loads_total", model_name) == 1
    assert value(samples, "trident_model_unloads_total", model_name) == 0


def test_counters_match_the_requests_made(live_server, client, model_name):
    live_server.wait_idle()
    before, _ = scrape(live_server.base_url)
    finished = []  # (finish reasons, prompt tokens, completion tokens, longest sample)
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0, max_tokens=6)
    finished.append(([c.finish_reason for c in r.choices], r.usage.prompt_tokens, r.usage.completion_tokens))
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0.8, max_tokens=5, n=2, seed=1)
    finished.append(([c.finish_reason for c in r.choices], r.usage.prompt_tokens, r.usage.completion_tokens))
    r = client.completions.create(model=model_name, prompt="One, two,", temperature=0, max_tokens=1)
    finished.append(([c.finish_reason for c in r.choices], r.usage.prompt_tokens, r.usage.completion_tokens))
    chunks = list(client.completions.create(model=model_name, prompt="One, two,", temperature=0, max_tokens=7,
                                            stream=True, stream_options={"include_usage": True}))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    finished.append((reasons, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))
    refused = httpx.post(f"{live_server.base_url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert refused.status_code == 404
    malformed = httpx.post(f"{live_server.base_url}/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    too_long = httpx.post(f"{live_server.base_url}/v1/completions",
                          json={"model": model_name, "prompt": "x", "max_tokens": 10**7})
    assert too_long.status_code == 400  # routed to the model, then refused
    live_server.wait_idle()
    after, _ = scrape(live_server.base_url)

    def status(reasons: list[str]) -> str:
        return "length" if "length" in reasons else "stop"

    num_length = sum(status(reasons) == "length" for reasons, _, _ in finished)
    assert delta(before, after, "trident_requests_total", model_name, status="length") == num_length
    assert delta(before, after, "trident_requests_total", model_name, status="stop") == len(finished) - num_length
    assert delta(before, after, "trident_requests_total", model_name, status="abort") == 0
    assert delta(before, after, "trident_requests_total", model_name, status="error") == 1
    assert delta(before, after, "trident_requests_total", "", status="error") == 2  # unknown model, bad JSON
    assert delta(before, after, "trident_prompt_tokens_total", model_name) == sum(p for _, p, _ in finished)
    assert delta(before, after, "trident_generation_tokens_total", model_name) == sum(g for _, _, g in finished)
    for histogram in ("trident_time_to_first_token_seconds", "trident_e2e_request_latency_seconds"):
        assert delta(before, after, f"{histogram}_count", model_name) == len(finished)
        assert delta(before, after, f"{histogram}_sum", model_name) > 0
        assert delta(before, after, f"{histogram}_bucket", model_name, le="+Inf") == len(finished)
    # every request but the one-token completion has a time per output token
    assert delta(before, after, "trident_time_per_output_token_seconds_count", model_name) == len(finished) - 1

    stats = live_server.async_engine.engine.stats()
    expected_ratio = stats.prefix_cache_hit_tokens / max(stats.prefix_cache_queried_tokens, 1)
    assert value(after, "trident_prefix_cache_hit_ratio", model_name) == pytest.approx(expected_ratio)
    assert value(after, "trident_num_preemptions_total", model_name) == stats.num_preemptions


def _stream_then_disconnect(base_url: str, model_name: str) -> None:
    body = {"model": model_name, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines: Iterator[str] = response.iter_lines()
            events = 0
            for line in lines:
                events += line.startswith("data: ")
                if events == 4:
                    break


def test_disconnects_count_as_abort_and_free_the_kv_cache(live_server, model_name):
    live_server.wait_idle()
    before, _ = scrape(live_server.base_url)
    _stream_then_disconnect(live_server.base_url, model_name)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up: also an abort
        httpx.post(f"{live_server.base_url}/v1/completions", timeout=0.5,
                   json={"model": model_name, "prompt": "Once", "max_tokens": 2000, "ignore_eos": True})
    live_server.wait_idle()
    after, _ = scrape(live_server.base_url)
    assert delta(before, after, "trident_requests_total", model_name, status="abort") == 2
    for status in ("stop", "length", "error"):
        assert delta(before, after, "trident_requests_total", model_name, status=status) == 0
    assert delta(before, after, "trident_generation_tokens_total", model_name) > 0  # the streamed tokens
    assert delta(before, after, "trident_e2e_request_latency_seconds_count", model_name) == 0
    assert value(after, "trident_kv_cache_usage_ratio", model_name) == 0
    assert value(after, "trident_num_requests_running", model_name) == 0
    assert value(after, "trident_num_requests_waiting", model_name) == 0


def _exprs(node: object) -> Iterator[str]:
    """Every PromQL expression in a dashboard: ``expr`` fields, and the template variables' queries."""
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "definition") and isinstance(item, str):
                yield item
            else:
                yield from _exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboard_queries_only_exposed_metrics(live_server):
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
    queried = set()
    for expr in _exprs(dashboard):
        for name in re.findall(r"trident_[a-z0-9_]+", expr):
            queried.add(re.sub(r"_(bucket|sum|count)$", "", name))
    _, exposed = scrape(live_server.base_url)
    # a family without series yet (MoE counters on a dense model) is exposed by its name, without the _total sample
    assert {q for q in queried if q not in exposed and re.sub(r"_total$", "", q) not in exposed} == set()
    families = text_string_to_metric_families(ServerMetrics(["m"]).render().decode())
    defined = {f.name for f in families if not f.name.endswith("_created")}  # prometheus_client's timestamps
    on_panels = {re.sub(r"_total$", "", name) for name in queried}
    assert on_panels == defined  # and every metric the server defines is on a panel


def test_prometheus_config_scrapes_trident():
    text = PROMETHEUS_CONFIG.read_text()
    assert "localhost:8000" in text and "scrape_interval: 5s" in text and "/metrics" in text


def test_moe_expert_load_series():
    """Per (layer, expert) counters grow by the engine's new counts (by the whole count after a reset of the engine's
    statistics); per-layer gauges mirror the snapshot; removing the model drops every series."""
    from trident.moe.stats import MoeLayerLoad, MoeStats

    def snapshot(counts: list[tuple[int, ...]]) -> MoeStats:
        layers = tuple(MoeLayerLoad(layer=2 * i + 1, token_counts=c, mean_probs=(0.5, 0.5), imbalance=1.0 + i,
                                    entropy_term=-0.5 - i) for i, c in enumerate(counts))
        return MoeStats(num_experts=2, top_k=1, num_tokens=sum(counts[0]), alpha=1.0, layers=layers)

    metrics = ServerMetrics(["moe"])

    def read() -> Samples:
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}

    metrics.moe_stats("moe", snapshot([(3, 1), (0, 4)]))
    metrics.moe_stats("moe", snapshot([(5, 2), (1, 6)]))
    samples = read()
    assert value(samples, "trident_moe_expert_tokens_total", "moe", layer="1", expert="0") == 5
    assert value(samples, "trident_moe_expert_tokens_total", "moe", layer="3", expert="1") == 6
    assert value(samples, "trident_moe_layer_imbalance_ratio", "moe", layer="3") == 2.0
    assert value(samples, "trident_moe_layer_entropy_term", "moe", layer="1") == -0.5
    metrics.moe_stats("moe", snapshot([(1, 0), (0, 1)]))  # the engine's statistics were reset in between
    samples = read()
    assert value(samples, "trident_moe_expert_tokens_total", "moe", layer="1", expert="0") == 6
    assert value(samples, "trident_moe_expert_tokens_total", "moe", layer="1", expert="1") == 2
    metrics.remove_model("moe")
    assert not any(name.startswith("trident_moe") for name, _ in read())
