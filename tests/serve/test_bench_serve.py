"""`trident bench serve` against the live test server: Poisson arrivals and fixed concurrency, exact output
lengths (ignore_eos), ordered percentiles, goodput consistent with the per-request records, JSON and PNG."""

from __future__ import annotations

import json

import pytest

from trident.bench.serve_client import RequestRecord
from trident.bench.serve_stats import Slo, bench_summary
from trident.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("load", [["--request-rate", "20"], ["--max-concurrency", "2"]], ids=["rate", "concurrency"])
def test_bench_serve_end_to_end(live_server, model_name, tmp_path, load: list[str]) -> None:
    json_path, png_path = tmp_path / "serve.json", tmp_path / "serve.png"
    assert main(["bench", "serve", "--base-url", f"{live_server.base_url}/v1", "--model", model_name,
                 "--num-prompts", "6", "--input-len-mean", "16", "--output-len-mean", "8", "--seed", "1",
                 "--slo-ttft-ms", "400", "--slo-tpot-ms", "60", "--request-timeout", "30",
                 "--json", str(json_path), "--plot", str(png_path), *load]) == 0
    record = json.loads(json_path.read_text())
    requests = record["requests"]
    assert record["completed"] == 6 and record["failed"] == 0 and len(requests) == 6
    assert [r["output_tokens"] for r in requests] == record["workload"]["output_lens"]
    assert all(r["output_tokens"] == r["output_len"] and r["prompt_tokens"] > 0 for r in requests)
    assert record["output_tokens"] == sum(record["workload"]["output_lens"])
    for name, stats in record["latency_ms"].items():
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], name
    assert record["request_throughput"] > 0 and record["output_token_throughput"] > 0
    slo = Slo(ttft_ms=400, tpot_ms=60)
    good = sum(slo.met_by(RequestRecord(**r)) for r in requests)
    good_by_hand = sum(r["ttft_ms"] <= 400 and r["tpot_ms"] <= 60 for r in requests)
    goodput = record["goodput"]
    assert good == good_by_hand == goodput["good_requests"]
    assert 0 <= goodput["fraction"] <= 1 and goodput["fraction"] == pytest.approx(good / 6)
    assert goodput["requests_per_s"] == pytest.approx(good / record["duration_s"])
    # a TTFT target at the median splits the requests: the recomputed goodput is strictly between 0 and 1
    records = [RequestRecord(**r) for r in requests]
    median_slo = Slo(ttft_ms=record["latency_ms"]["ttft"]["p50"])
    split = bench_summary(records, record["duration_s"], median_slo)["goodput"]
    assert split["good_requests"] == sum(r["ttft_ms"] <= median_slo.ttft_ms for r in requests)
    assert 0 < split["fraction"] < 1
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    live_server.wait_idle()


def test_bench_serve_counts_failures_and_needs_a_load_shape(live_server, tmp_path, capsys) -> None:
    json_path = tmp_path / "fail.json"
    assert main(["bench", "serve", "--base-url", f"{live_server.base_url}/v1", "--model", "no-such-model",
                 "--num-prompts", "2", "--output-len-mean", "4", "--max-concurrency", "2",
                 "--json", str(json_path)]) == 0
    record = json.loads(json_path.read_text())
    assert record["completed"] == 0 and record["failed"] == 2
    assert all(r["error"].startswith("HTTP 4") for r in record["requests"])
    assert main(["bench", "serve", "--base-url", f"{live_server.base_url}/v1", "--num-prompts", "2",
                 "--output-len-mean", "64", "--request-rate", "100", "--request-timeout", "0.05",
                 "--json", str(json_path)]) == 0  # the model name comes from GET /v1/models
    record = json.loads(json_path.read_text())
    assert record["failed"] == 2 and all("timed out" in r["error"] for r in record["requests"])
    live_server.wait_idle()  # the abandoned streams were aborted on the server
    assert main(["bench", "serve", "--base-url", f"{live_server.base_url}/v1"]) == 2
    assert "--request-rate" in capsys.readouterr().err
