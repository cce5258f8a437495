"""GET /dashboard, the built-in live metrics page, checked in headless Debian chromium over DevTools.

The page must be self-contained (no external resource), read only metrics that /metrics serves, render
without script errors, keep scraping (its sample counter grows), follow real requests (its totals reach
what /metrics says), draw one line per model (also for a model that appears later), estimate quantiles
as PromQL's histogram_quantile does, and show a banner, not break, while /metrics fails. The rendering
test saves a screenshot to artifacts/dashboard.png.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from headless_chromium import HeadlessChromium, Page, find_chromium
from matplotlib.image import imread
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response

from trident.serve.dashboard import install_dashboard
from trident.serve.metrics import METRICS_CONTENT_TYPE, ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
WIDTH, HEIGHT = 1280, 900
CHART_IDS = ["requests", "tokens", "queue", "kv-cache", "ttft", "tpot", "e2e", "prefix-cache", "preemptions", "loads",
             "memory", "load-time"]

COLOURED_PIXELS = """[...document.querySelectorAll("main canvas")].map((c) => {
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;  // opaque pixels of a saturated colour: the lines, not the grey grid and labels
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 128 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
  }
  return n;
})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[HeadlessChromium]:
    binary = find_chromium()
    if binary is None:
        pytest.fail("no chromium on PATH: run `make test`, which installs Debian's chromium package")
    chromium = HeadlessChromium.start(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.close()


def exposed(base_url: str) -> tuple[str, set[str]]:
    """/metrics as text, and every family and sample name in it."""
    text = httpx.get(f"{base_url}/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name} | {s.name for s in family.samples}
    return text, names


def metric_sum(text: str, sample_name: str) -> float:
    """The sum of one sample name's values over all label sets (all models, all statuses)."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == sample_name)


def declared_metrics(script: str) -> list[str]:
    """The metric names the page's script declares in its one ``const METRICS = {...};`` table."""
    table = re.search(r"const METRICS = \{(.*?)\};", script, re.DOTALL)
    assert table is not None, "dashboard.js must declare the metrics it reads in `const METRICS = {...};`"
    return re.findall(r'"(trident_[a-z0-9_]+)"', table.group(1))


def chart(page: Page, chart_id: str) -> dict[str, dict]:
    """One chart's lines as the page last drew them, by legend label: {label: {points, last}}."""
    charts = {c["id"]: c for c in page.evaluate("tridentDashboard.charts()")}
    return {s["label"]: s for s in charts[chart_id]["series"]}


def test_dashboard_page_is_self_contained(live_server):
    page = httpx.get(f"{live_server.base_url}/dashboard")
    script = httpx.get(f"{live_server.base_url}/dashboard.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for text in (page.text, script.text):
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE)  # nothing from the web
        assert "@import" not in text and "url(" not in text
    assert re.findall(r'(?:src|href)="([^"]*)"', page.text) == ["data:,", "/dashboard.js"]


def test_dashboard_reads_only_exposed_metrics(live_server):
    script = httpx.get(f"{live_server.base_url}/dashboard.js").text
    declared = declared_metrics(script)
    assert len(declared) == len(set(declared)) >= 10
    assert set(re.findall(r"trident_[a-z0-9_]+", script)) == set(declared)  # no name read outside the table
    _, names = exposed(live_server.base_url)
    # a family without series yet (MoE counters on a dense model) is exposed by its name, without the _total sample
    assert {d for d in declared if d not in names and re.sub(r"_total$", "", d) not in names} == set()
    families = text_string_to_metric_families(ServerMetrics(["m"]).render().decode())
    defined = {f.name for f in families if not f.name.endswith("_created")}  # prometheus_client's timestamps
    assert {re.sub(r"_total$", "", name) for name in declared} == defined  # every metric is on the page


def test_dashboard_renders_and_follows_requests(live_server, client, model_name, browser):
    page = browser.open_page(f"{live_server.base_url}/dashboard?interval_ms=300", WIDTH, HEIGHT)
    try:
        page.wait_for("window.tridentDashboard && tridentDashboard.samples >= 3")
        assert [c["id"] for c in page.evaluate("tridentDashboard.charts()")] == CHART_IDS
        sizes = page.evaluate('[...document.querySelectorAll("main canvas")].map((c) => [c.width, c.height])')
        assert len(sizes) == len(CHART_IDS) and all(w >= 200 and h >= 100 for w, h in sizes), sizes

        before = page.evaluate("[tridentDashboard.samples, tridentDashboard.renders]")
        time.sleep(1.2)
        after = page.evaluate("[tridentDashboard.samples, tridentDashboard.renders]")
        assert after[0] >= before[0] + 2 and after[1] >= before[1] + 2, (before, after)  # it keeps updating

        live_server.wait_idle()
        text, _ = exposed(live_server.base_url)
        shown_before = page.wait_for(f"""(() => {{
            const sum = (name) => tridentDashboard.series(name).reduce((a, s) => a + s.value, 0);
            const g = sum("trident_generation_tokens_total");
            return g === {metric_sum(text, "trident_generation_tokens_total")} ? {{g}} : null; }})()""")["g"]
        generated = 0
        for prompt in ("The capital of France is", "One, two, three,", "Water boils at"):
            r = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=8)
            generated += r.usage.completion_tokens
        live_server.wait_idle()
        text, _ = exposed(live_server.base_url)
        expected = {"g": metric_sum(text, "trident_generation_tokens_total"),
                    "r": metric_sum(text, "trident_requests_total")}
        shown = page.wait_for(f"""(() => {{
            const sum = (name) => tridentDashboard.series(name).reduce((a, s) => a + s.value, 0);
            const dom = (id) => Number(document.querySelector(`#stat-${{id}} b`).dataset.value);
            const shown = {{g: sum("trident_generation_tokens_total"), r: sum("trident_requests_total"),
                           domG: dom("generation-tokens"), domR: dom("requests")}};
            return shown.g === {expected['g']} && shown.domG === shown.g ? shown : null; }})()""")
        assert shown == {"g": expected["g"], "r": expected["r"], "domG": expected["g"], "domR": expected["r"]}
        assert shown["g"] - shown_before == generated > 0

        # the rate and latency charts now have lines with the new requests in them
        page.wait_for('tridentDashboard.charts().every((c) => c.series.some((s) => s.points >= 2))')
        assert max(s["last"] for s in chart(page, "requests").values()) > 0
        assert chart(page, "tokens")["generation"]["last"] > 0
        for latency in ("ttft", "tpot", "e2e"):
            assert set(chart(page, latency)) == {"p50", "p90"}
            assert 0 < chart(page, latency)["p50"]["last"] <= chart(page, latency)["p90"]["last"]
        assert set(chart(page, "kv-cache")) == {model_name}
        # a line of two points is a few pixels long at the right edge: wait until each line is long enough to see
        deadline = time.monotonic() + 10
        coloured = page.evaluate(COLOURED_PIXELS)
        while min(coloured) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
            coloured = page.evaluate(COLOURED_PIXELS)
        assert all(n >= 20 for n in coloured), dict(zip(CHART_IDS, coloured))

        assert page.script_errors() == [] and page.log_errors() == []
        assert page.evaluate("tridentDashboard.errors") == []
        assert page.evaluate('document.getElementById("banner").hidden') is True

        png = page.screenshot(SCREENSHOT)
    finally:
        page.close()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(SCREENSHOT)
    assert image.shape[:2] == (HEIGHT, WIDTH)
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 200  # not one flat colour


def _moe_snapshot(extra: int):
    """Expert load of two MoE layers (0 and 2) of four experts, ``extra`` more tokens on the first expert."""
    from trident.moe.stats import MoeLayerLoad, MoeStats

    layers = tuple(MoeLayerLoad(layer=layer, token_counts=(10 + extra, 5, 3, 2), mean_probs=(0.4, 0.3, 0.2, 0.1),
                                imbalance=1.5 + layer / 2, entropy_term=-1.0 + layer / 4) for layer in (0, 2))
    return MoeStats(num_experts=4, top_k=1, num_tokens=20 + extra, alpha=1.0, layers=layers)


def test_dashboard_follows_several_models_and_survives_a_failing_scrape(browser, start_server):
    metrics = ServerMetrics(["alpha", "beta"], memory_budget_bytes=4 * 2**30)
    failing = threading.Event()
    app = FastAPI()
    install_dashboard(app)

    @app.get("/metrics")
    def scrape() -> Response:
        if failing.is_set():
            return Response("down for a moment", status_code=503)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    with start_server(app, None) as server:
        page = browser.open_page(f"{server.base_url}/dashboard?interval_ms=200&rate_window_s=60")
        try:
            page.wait_for("tridentDashboard.samples >= 2")
            assert list(chart(page, "kv-cache")) == ["alpha", "beta"]
            assert list(chart(page, "queue")) == ["alpha running", "beta running", "alpha waiting", "beta waiting"]
            assert list(chart(page, "requests")) == [f"{m} {s}" for m in ("alpha", "beta")
                                                     for s in ("stop", "length", "abort", "error")]

            # ten first tokens at 0.3 s: all in the (0.25, 0.5] bucket, so PromQL's histogram_quantile gives
            # 0.25 + 0.25 * q for quantile q. A model loaded later gets lines of its own; a request refused
            # before it reached a model shows as "unrouted".
            for _ in range(10):
                metrics.ttft.labels(model="alpha").observe(0.3)
            metrics.model_loaded("gamma", memory_bytes=2**30, load_seconds=1.5)
            metrics.request_refused()
            page.wait_for('tridentDashboard.charts().find((c) => c.id === "ttft").series'
                          '.some((s) => s.label === "alpha p90" && s.last !== null)')
            page.wait_for('tridentDashboard.charts().find((c) => c.id === "loads").series.length === 6')
            ttft = chart(page, "ttft")
            assert ttft["alpha p50"]["last"] == pytest.approx(0.375)
            assert ttft["alpha p90"]["last"] == pytest.approx(0.475)
            assert ttft["beta p50"]["points"] == 0  # no request, no latency
            loads = chart(page, "loads")
            assert loads["gamma loads"]["last"] == 1 and loads["alpha loads"]["last"] == 0
            assert list(chart(page, "kv-cache")) == ["alpha", "beta", "gamma"]
            memory = chart(page, "memory")
            assert memory["gamma"]["last"] == 2**30 and memory["budget"]["last"] == 4 * 2**30
            assert chart(page, "requests")["unrouted error"]["last"] > 0
            chips = page.evaluate('[...document.querySelectorAll("#models .chip")].map((c) => [c.textContent, '
                                  'c.classList.contains("unloaded")])')
            assert chips == [["alpha", True], ["beta", True], ["gamma", False]]

            # the MoE charts appear once a model reports expert load, one line per layer
            assert not any(c["id"].startswith("moe") for c in page.evaluate("tridentDashboard.charts()"))
            metrics.moe_stats("gamma", _moe_snapshot(0))
            page.wait_for('tridentDashboard.charts().some((c) => c.id === "moe-imbalance")')
            metrics.moe_stats("gamma", _moe_snapshot(600))
            page.wait_for('tridentDashboard.charts().find((c) => c.id === "moe-tokens").series'
                          '.some((s) => s.last > 0)')
            assert {k: v["last"] for k, v in chart(page, "moe-imbalance").items()} == {"gamma layer 0": 1.5,
                                                                                      "gamma layer 2": 2.5}
            assert {k: v["last"] for k, v in chart(page, "moe-entropy").items()} == {"gamma layer 0": -1.0,
                                                                                    "gamma layer 2": -0.5}
            assert set(chart(page, "moe-tokens")) == {"gamma layer 0", "gamma layer 2"}

            samples = page.evaluate("tridentDashboard.samples")
            failing.set()
            message = page.wait_for('!document.getElementById("banner").hidden && '
                                    'document.getElementById("banner").textContent')
            assert "Cannot read /metrics: HTTP 503" in message
            assert page.evaluate("tridentDashboard.errors")[-1].startswith("scrape: HTTP 503")
            assert page.evaluate("tridentDashboard.samples") <= samples + 1
            failing.clear()
            page.wait_for(f'document.getElementById("banner").hidden && tridentDashboard.samples > {samples + 1}')
            assert list(chart(page, "kv-cache")) == ["alpha", "beta", "gamma"]  # the data kept through the outage
            assert page.script_errors() == []
            assert all("503" in e for e in page.log_errors())  # the browser logs the failed loads, nothing else
        finally:
            page.close()
