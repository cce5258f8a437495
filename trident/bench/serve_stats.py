"""Statistics of `trident bench serve`: percentiles, latency summaries, throughput and goodput."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the client module needs httpx; the stats need only the record's fields
    from trident.bench.serve_client import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default method); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of ``values`` (all None when there are none)."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


@dataclass(frozen=True)
class Slo:
    """Latency targets a request must meet to count towards goodput; None means no target."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        """A completed request within both targets (a one-token output has no TPOT and passes that one)."""
        if not r.success or r.ttft_ms is None:
            return False
        if self.ttft_ms is not None and r.ttft_ms > self.ttft_ms:
            return False
        return self.tpot_ms is None or r.tpot_ms is None or r.tpot_ms <= self.tpot_ms


def bench_summary(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict:
    """Counts, throughput, latency summaries (ms) and goodput of one run."""
    done = [r for r in records if r.success]
    good = sum(slo.met_by(r) for r in records)
    output_tokens = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": per_s(len(done)),
        "output_tokens": output_tokens,
        "output_token_throughput": per_s(output_tokens),
        "latency_ms": {
            "ttft": summarize([r.ttft_ms for r in done if r.ttft_ms is not None]),
            "tpot": summarize([r.tpot_ms for r in done if r.tpot_ms is not None]),
            "itl": summarize([gap for r in done for gap in r.itl_ms]),
            "e2e": summarize([r.e2e_ms for r in done if r.e2e_ms is not None]),
        },
        "goodput": {
            "slo_ttft_ms": slo.ttft_ms,
            "slo_tpot_ms": slo.tpot_ms,
            "good_requests": good,
            "requests_per_s": per_s(good),
            "fraction": good / len(records) if records else 0.0,
        },
    }
