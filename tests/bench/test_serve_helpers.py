"""`trident bench serve` helpers: percentiles against numpy, seeded lognormal lengths, Poisson arrivals,
goodput accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trident.bench.serve_client import RequestRecord
from trident.bench.serve_stats import Slo, bench_summary, percentile, summarize
from trident.bench.serve_workload import WORDS, length_range, plan_requests, poisson_arrivals, sample_lengths


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n: int) -> None:
    values = np.random.default_rng(n).exponential(3.0, size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    stats = summarize([4.0, 1.0, 3.0, 2.0])
    assert stats["mean"] == 2.5 and stats["p50"] == 2.5 and stats["p50"] <= stats["p90"] <= stats["p99"]


def test_sample_lengths_mean_clip_and_seed() -> None:
    low, high = length_range(200, 1)
    draw = sample_lengths(np.random.default_rng(0), 20000, 200, low, high)
    assert draw.dtype == np.int64 and draw.min() >= low and draw.max() <= high
    assert abs(draw.mean() / 200 - 1) < 0.03  # lognormal centred on the mean, clipping barely biases it
    # the same draw as numpy's lognormal with mu chosen so that the mean is 200
    sigma = 0.7
    ref = np.clip(np.rint(np.random.default_rng(0).lognormal(math.log(200) - sigma**2 / 2, sigma, 20000)), low, high)
    np.testing.assert_array_equal(draw, ref)
    assert np.median(draw) < draw.mean()  # a long right tail, as ShareGPT's
    np.testing.assert_array_equal(sample_lengths(np.random.default_rng(5), 50, 8, 2, 48),
                                  sample_lengths(np.random.default_rng(5), 50, 8, 2, 48))
    with pytest.raises(ValueError):
        sample_lengths(np.random.default_rng(0), 3, 0, 1, 2)


def test_poisson_arrivals() -> None:
    arrivals = poisson_arrivals(np.random.default_rng(1), 20000, rate=50.0)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 50) < 0.001 and abs(gaps.std() - 1 / 50) < 0.001  # exponential: std = mean
    assert not poisson_arrivals(np.random.default_rng(1), 4, None).any()


def test_plan_requests_is_deterministic_and_sized() -> None:
    a = plan_requests(3, 10, 16, 8, request_rate=5.0)
    assert a == plan_requests(3, 10, 16, 8, request_rate=5.0)
    assert a != plan_requests(4, 10, 16, 8, request_rate=5.0)
    for req in a:
        words = req.prompt.split()
        assert len(words) == req.input_len and set(words) <= set(WORDS)
        assert 2 <= req.output_len <= 48


def test_goodput_counts_failures_against_the_fraction() -> None:
    ok = RequestRecord(0, 16, 8, success=True, output_tokens=8, ttft_ms=50.0, e2e_ms=120.0, tpot_ms=10.0)
    slow_first = RequestRecord(1, 16, 8, success=True, output_tokens=8, ttft_ms=500.0, e2e_ms=570.0, tpot_ms=10.0)
    slow_decode = RequestRecord(2, 16, 8, success=True, output_tokens=8, ttft_ms=50.0, e2e_ms=400.0, tpot_ms=50.0)
    failed = RequestRecord(3, 16, 8, success=False, error="HTTP 429")
    summary = bench_summary([ok, slow_first, slow_decode, failed], 2.0, Slo(ttft_ms=100.0, tpot_ms=20.0))
    assert summary["completed"] == 3 and summary["failed"] == 1 and summary["output_tokens"] == 24
    assert summary["goodput"]["good_requests"] == 1 and summary["goodput"]["fraction"] == 0.25
    assert summary["goodput"]["requests_per_s"] == 0.5
    assert bench_summary([ok, failed], 1.0, Slo())["goodput"]["good_requests"] == 1  # no SLO: completed ones
