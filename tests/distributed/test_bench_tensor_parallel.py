"""`trident bench latency|offline --tensor-parallel 2` on a tiny random-weight shape (two spawned gloo ranks): the
result reports the size and, with --collective-timing, the collectives' figures; int8 weights split; what it
refuses; the check that every rank drew the same random weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from tiny_shapes import TINY_SHAPES  # noqa: E402

from trident.cli import main  # noqa: E402
from trident.distributed.bench import check_same_weights  # noqa: E402
from trident.errors import TridentError  # noqa: E402


def test_latency_reports_the_size_and_the_all_reduce_share(tmp_path) -> None:
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(TINY_SHAPES["llama3-scaled"]))
    out = tmp_path / "latency.json"
    r = subprocess.run([sys.executable, "-m", "trident.cli", "bench", "latency", "--shape", str(shape),
                        "--tensor-parallel", "2", "--collective-timing", "--prompt-len", "16", "--output-len", "6",
                        "--repeat", "1", "--dtype", "float32", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "tensor parallel 2" in r.stdout and "the all-reduces took" in r.stdout
    record = json.loads(out.read_text())
    assert record["tensor_parallel_size"] == 2 and record["collective_timing"] is True
    (row,) = record["results"]
    assert row["tensor_parallel"] == 2 and row["output_tokens"] == 6
    assert 0 < row["all_reduce_share"] <= row["collectives_share"] <= 1
    calls = row["collectives"]
    # every step: two row-parallel all-reduces per layer and the embedding's; the logits' all-gather, the sampled
    # tokens' broadcast and the plan once
    steps = calls["plan"]["calls"]
    assert steps == 6
    assert calls["all_reduce"]["calls"] == steps * (2 * TINY_SHAPES["llama3-scaled"]["num_hidden_layers"] + 1)
    assert calls["all_gather"]["calls"] == calls["broadcast"]["calls"] == steps


def test_offline_with_expert_parallelism_reports_it(tmp_path) -> None:
    """An MoE shape (Qwen2-MoE with a shared expert and a dense layer) split with whole experts per rank runs the
    offline workload to its end and says so in the record."""
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(TINY_SHAPES["qwen2-moe-shared"]))
    out = tmp_path / "offline.json"
    r = subprocess.run([sys.executable, "-m", "trident.cli", "bench", "offline", "--shape", str(shape),
                        "--tensor-parallel", "2", "--expert-parallel", "--num-prompts", "3", "--prompt-len", "12",
                        "--output-len", "5", "--repeat", "1", "--dtype", "float32", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["tensor_parallel_size"] == 2 and record["expert_parallel"] is True
    (row,) = record["results"]
    assert row["tensor_parallel"] == 2 and row["output_tokens"] == 3 * 5


def test_latency_with_int8_weights(tmp_path) -> None:
    """--weights int8: every rank quantizes the whole shape (its decoder layers and routed experts) before its engine
    splits it; the record says so."""
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(TINY_SHAPES["qwen2-moe-shared"]))
    out = tmp_path / "latency.json"
    r = subprocess.run([sys.executable, "-m", "trident.cli", "bench", "latency", "--shape", str(shape),
                        "--tensor-parallel", "2", "--weights", "int8", "--prompt-len", "12", "--output-len", "4",
                        "--repeat", "1", "--dtype", "float32", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["tensor_parallel_size"] == 2 and record["weights"] == "int8"
    assert record["quantization"]["bits"] == 8 and record["quantization"]["group_size"] is None
    (row,) = record["results"]
    assert row["tensor_parallel"] == 2 and row["output_tokens"] == 4


@pytest.mark.parametrize(("flags", "message"), [
    (("latency", "--shape", "qwen3-0.6b", "--tensor-parallel", "2", "--compare", "hf"),
     "--compare is not supported with --tensor-parallel 2"),
    (("latency", "--shape", "qwen3-0.6b", "--tensor-parallel", "2", "--weights", "w8a8"),
     "--weights w8a8 is not supported with --tensor-parallel 2 yet"),
    (("latency", "--shape", "qwen3-0.6b", "--tensor-parallel", "2", "--weights", "int8", "--lm-head", "int8"),
     "--lm-head int8 is not supported with --tensor-parallel 2 yet"),
    (("latency", "--shape", "qwen3-0.6b", "--tensor-parallel", "16", "--weights", "int4"),
     "model.layers.0.mlp.down_proj (int4 in groups of 128) does not split over --tensor-parallel 16: rank 0 would "
     "hold its input features 0..191, not whole quantization groups of 128"),
    (("latency", "--shape", "qwen3-0.6b", "--collective-timing"), "--collective-timing times the collectives"),
    (("offline", "--shape", "qwen3-0.6b", "--tensor-parallel", "2", "--collective-timing", "--device", "cuda"),
     "--collective-timing on CUDA needs --enforce-eager"),
    (("serve", "--tensor-parallel", "2"), "start it with `trident serve --tensor-parallel N`"),
    (("latency", "--shape", "qwen3-0.6b", "--expert-parallel"), "--expert-parallel splits experts over the ranks"),
    (("latency", "--shape", "qwen3-0.6b", "--tensor-parallel", "2", "--expert-parallel"),
     "qwen3 has no routed experts for --expert-parallel to split"),
])
def test_refused_before_any_rank(flags, message, capsys) -> None:
    assert main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


class _Group:
    """Rank 1 of two whose rank 0 holds ``reference`` sums: the broadcast and the minimum over both ranks."""

    rank, is_driver = 1, False

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference

    def broadcast_object(self, obj=None):
        return self.reference

    def min_over_ranks(self, value: int) -> int:
        return value


def test_differing_random_weights_are_an_error() -> None:
    tensors = {"a": torch.ones(3), "b": torch.arange(4.0)}
    check_same_weights(tensors, _Group(torch.tensor([3.0, 6.0], dtype=torch.float64)))
    with pytest.raises(TridentError, match=r"the ranks' random weights differ \(rank 1\)"):
        check_same_weights(tensors, _Group(torch.tensor([3.0, 6.5], dtype=torch.float64)))
