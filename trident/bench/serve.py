"""`trident bench serve`: an online load generator against a running OpenAI-compatible server.

Requests arrive as a Poisson process (``--request-rate``) or from a fixed number of concurrent clients
(``--max-concurrency``; both together: paced arrivals, capped in flight). Each is a streamed completion of
synthetic ShareGPT-like length; TTFT, TPOT, inter-token latency, end-to-end latency, throughput and goodput
under the SLOs are printed as tables, written as JSON with every request's record, and plotted to a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from trident.bench.serve_stats import Slo, bench_summary
from trident.errors import TridentError

if TYPE_CHECKING:  # httpx and numpy are imported when a run starts, not when the CLI builds its parser
    from trident.bench.serve_client import RequestRecord
    from trident.bench.serve_workload import PlannedRequest


@dataclass(frozen=True)
class ServeBenchConfig:
    """Everything one `trident bench serve` run needs, validated at construction."""

    base_url: str
    """The server's OpenAI root, e.g. http://127.0.0.1:8000/v1"""
    model: str | None
    """The "model" of the requests; None: the first one GET /models lists."""
    api_key: str | None
    num_prompts: int
    request_rate: float | None
    max_concurrency: int | None
    seed: int
    input_len_mean: int
    output_len_mean: int
    slo: Slo
    request_timeout_s: float
    json_path: str | None
    plot_path: str | None

    def __post_init__(self) -> None:
        if self.request_rate is None and self.max_concurrency is None:
            raise TridentError("bench serve needs --request-rate R (Poisson arrivals) or --max-concurrency C")
        checks = [(self.num_prompts >= 1, "--num-prompts must be >= 1"),
                  (self.request_rate is None or self.request_rate > 0, "--request-rate must be > 0"),
                  (self.max_concurrency is None or self.max_concurrency >= 1, "--max-concurrency must be >= 1"),
                  (self.input_len_mean >= 1, "--input-len-mean must be >= 1"),
                  (self.output_len_mean >= 2, "--output-len-mean must be >= 2"),
                  (self.request_timeout_s > 0, "--request-timeout must be > 0")]
        for ok, message in checks:
            if not ok:
                raise TridentError(message)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `trident bench serve` (--num-prompts and --json are the bench parser's own)."""
    g = p.add_argument_group("serve (online load against a running OpenAI-compatible server)")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 root")
    g.add_argument("--model", dest="served_model", default=None,
                   help="model name in the requests (default: the positional MODEL, else the server's first)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests per second")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrival times")
    g.add_argument("--input-len-mean", type=int, default=128, help="mean prompt length in tokens (lognormal)")
    g.add_argument("--output-len-mean", type=int, default=128, help="mean output length in tokens (lognormal)")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: time-to-first-token target")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: time-per-output-token target")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as failed")
    g.add_argument("--plot", default=None, help="write a PNG of the TTFT and TPOT distributions here")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(
        base_url=args.base_url, model=args.served_model or args.model, api_key=args.api_key,
        num_prompts=args.num_prompts, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
        seed=args.seed, input_len_mean=args.input_len_mean, output_len_mean=args.output_len_mean,
        slo=Slo(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms), request_timeout_s=args.request_timeout,
        json_path=args.json, plot_path=args.plot,
    )


def run_serve_bench(args: argparse.Namespace) -> int:
    """The `trident bench serve` command: run, print, write JSON (and the PNG with --plot)."""
    return run_serve(config_from_args(args))


def run_serve(config: ServeBenchConfig, console: Console | None = None) -> int:
    """Run the load of ``config``, print the tables, write the JSON (and the PNG); 0 on completion, failed
    requests included (they are counted, not fatal)."""
    from trident.bench.serve_workload import plan_requests

    console = console or Console()
    model = config.model or _first_model(config)
    planned = plan_requests(config.seed, config.num_prompts, config.input_len_mean, config.output_len_mean,
                            config.request_rate)
    console.print(f"sending {len(planned)} requests to {config.base_url} (model {model!r})")
    records, duration_s = asyncio.run(_run_load(config, model, planned))
    summary = bench_summary(records, duration_s, config.slo)
    _print_tables(console, summary)
    record = {
        "kind": "serve", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": config.base_url, "model": model,
        "config": {k: v for k, v in asdict(config).items() if k not in ("api_key", "slo")},
        "workload": {"input_lens": [p.input_len for p in planned], "output_lens": [p.output_len for p in planned],
                     "arrivals_s": [p.arrival_s for p in planned]},
        **summary,
        "requests": [asdict(r) for r in records],
    }
    path = config.json_path or os.path.join("bench-results", f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _write_json(path, record)
    console.print(f"results written to {path}")
    if config.plot_path:
        from trident.bench.serve_plot import write_plot

        os.makedirs(os.path.dirname(config.plot_path) or ".", exist_ok=True)
        write_plot(config.plot_path, records, config.slo, f"trident bench serve: {model}, {_load_label(config)}")
        console.print(f"plot written to {config.plot_path}")
    return 0


async def _run_load(config: ServeBenchConfig, model: str,
                    planned: list[PlannedRequest]) -> tuple[list[RequestRecord], float]:
    """Send every planned request at its arrival time (under the concurrency cap); wall time of the run."""
    import httpx

    from trident.bench.serve_client import send_request

    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    timeout = httpx.Timeout(config.request_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def one(req: PlannedRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - start)))
            if limit is None:
                return await send_request(client, config.base_url, model, req, config.api_key,
                                          config.request_timeout_s, start)
            async with limit:
                return await send_request(client, config.base_url, model, req, config.api_key,
                                          config.request_timeout_s, start)

        records = await asyncio.gather(*(one(req) for req in planned))
        return list(records), time.perf_counter() - start


def _first_model(config: ServeBenchConfig) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = f"{config.base_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, headers=headers, timeout=10)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise TridentError(f"could not list the server's models at {url} ({e}); is it running? "
                           "Pass --base-url, or --model NAME") from None


def _load_label(config: ServeBenchConfig) -> str:
    parts = []
    if config.request_rate is not None:
        parts.append(f"{config.request_rate:g} req/s")
    if config.max_concurrency is not None:
        parts.append(f"concurrency {config.max_concurrency}")
    return ", ".join(parts)


def _print_tables(console: Console, summary: dict) -> None:
    overview = Table(title="trident bench serve")
    overview.add_column("metric")
    overview.add_column("value", justify="right")
    g = summary["goodput"]
    slo = " and ".join(s for s in (g["slo_ttft_ms"] is not None and f"TTFT <= {g['slo_ttft_ms']:g} ms",
                                   g["slo_tpot_ms"] is not None and f"TPOT <= {g['slo_tpot_ms']:g} ms") if s)
    rows = [("completed requests", str(summary["completed"])), ("failed requests", str(summary["failed"])),
            ("duration (s)", f"{summary['duration_s']:.2f}"),
            ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("output tokens", str(summary["output_tokens"])),
            ("output token throughput (tok/s)", f"{summary['output_token_throughput']:.1f}"),
            (f"goodput (req/s, {slo or 'no SLO'})", f"{g['requests_per_s']:.2f}"),
            ("goodput fraction", f"{g['fraction']:.1%}")]
    for name, value in rows:
        overview.add_row(name, value)
    latency = Table(title="latency (ms)")
    latency.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        latency.add_column(col, justify="right")
    for name, stats in summary["latency_ms"].items():
        latency.add_row(name.upper(), *("-" if stats[c] is None else f"{stats[c]:.2f}"
                                        for c in ("mean", "p50", "p90", "p99")))
    console.print(overview)
    console.print(latency)


def _write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
