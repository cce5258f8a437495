"""The bench table's medians and the spread caption beside them (known answers)."""
from __future__ import annotations

from trident.bench.report import median, spread_captions, summarize


def test_median_of_repetitions() -> None:
    runs = [{"output_tok_s": 33584.0, "requests": 256, "method": "a"},
            {"output_tok_s": 35050.0, "requests": 255, "method": "b"},
            {"output_tok_s": 34380.0, "requests": 257, "method": "c"}]
    assert median(runs) == {"output_tok_s": 34380.0, "requests": 256, "method": "a"}


def test_spread_caption_names_min_median_max() -> None:
    runs = [{"output_tok_s": v} for v in (33584.0, 35050.0, 34380.0, 34099.0)]
    row = summarize("trident (bfloat16)", 1.0, runs, None, None, "offline")
    assert spread_captions([row], "offline") == [
        "trident (bfloat16) output_tok_s over 4 repetitions: min 33,584, median 34,240, max 35,050"]


def test_no_spread_caption_for_one_repetition_or_a_failed_engine() -> None:
    one = summarize("trident", 1.0, [{"decode_tok_s": 379.0}], None, None, "latency")
    failed = summarize("peer", None, [], "RuntimeError: out of memory", None, "latency")
    assert spread_captions([one, failed], "latency") == []
