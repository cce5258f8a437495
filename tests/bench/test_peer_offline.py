"""transformers on an offline workload: continuous batching and the padded fallback each generate exactly
every request's own number of tokens; the latency peer its output length."""

from __future__ import annotations

import pytest
import torch
from tiny_shapes import TINY_SHAPES

from trident.bench.peer_offline import continuous_batching_available, hf_continuous_batching, hf_padded_generate
from trident.bench.peers import hf_latency, load_hf_same_weights
from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import Shape
from trident.bench.workloads import Workload, nano_workload


@pytest.fixture(scope="module")
def tiny_hf():
    ckpt = random_checkpoint(Shape("t", dict(TINY_SHAPES["llama3-scaled"]), "test"), device="cpu",
                             dtype=torch.float32)
    return load_hf_same_weights(ckpt, torch.float32, torch.device("cpu"))


def test_continuous_batching_generates_each_requests_length(tiny_hf) -> None:
    assert continuous_batching_available(tiny_hf)  # transformers >= 5 has it: the fallback stays a fallback
    w = Workload("t", ((1, 2, 3), tuple(range(10, 40)), (7,) * 9), (3, 9, 5))
    row = hf_continuous_batching(tiny_hf, w)
    assert row["output_tokens"] == 17 and row["requests"] == 3 and row["output_tok_s"] > 0
    assert row["method"].startswith("continuous batching (")


def test_padded_fallback_counts_each_requests_own_tokens(tiny_hf) -> None:
    w = nano_workload(num_prompts=3, max_prompt_len=20, max_output_len=6)
    w = Workload("t", (w.prompts[0][:5], *w.prompts[1:]), (2, 6, 4))
    row = hf_padded_generate(tiny_hf, w)
    assert row["output_tokens"] == 12 and row["requests"] == 3 and "padded" in row["method"]


def test_static_cache_latency_generates_the_output_length(tiny_hf) -> None:
    row = hf_latency(tiny_hf, Workload("latency", (tuple(range(100, 116)),), (7,)))
    assert row["output_tokens"] == 7 and row["prompt_tokens"] == 16 and row["decode_tok_s"] > 0
