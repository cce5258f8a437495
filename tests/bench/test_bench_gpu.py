"""The random-weight benchmark path on a CUDA device, at a small scale: weights generated on the GPU in
the target dtype, the same weights in transformers, and both benchmarks end to end with --compare hf."""

from __future__ import annotations

import json

import pytest
import torch
from test_random_weights import check_same_weights
from tiny_shapes import TINY_SHAPES

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import Shape
from trident.cli import main


@pytest.mark.gpu
def test_weights_are_generated_on_the_gpu_in_the_target_dtype() -> None:
    shape = Shape("t", dict(TINY_SHAPES["qwen3-tied"]), "test")
    a = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16, seed=5)
    b = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16, seed=5)
    assert all(t.device.type == "cuda" and t.dtype == torch.bfloat16 for t in a.tensors.values())
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(TINY_SHAPES))
def test_trident_and_transformers_run_the_same_weights_on_cuda(name: str) -> None:
    check_same_weights(name, torch.device("cuda"))


@pytest.mark.gpu
def test_bench_offline_nano_and_latency_on_cuda(tmp_path) -> None:
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_SHAPES["llama3-scaled"]))
    offline, latency = tmp_path / "offline.json", tmp_path / "latency.json"
    assert main(["bench", "offline", "--shape", str(config), "--workload", "nano", "--num-prompts", "8",
                 "--output-len", "16", "--compare", "hf", "--repeat", "1", "--device", "cuda",
                 "--json", str(offline)]) == 0
    assert main(["bench", "latency", "--shape", str(config), "--prompt-len", "32", "--output-len", "16",
                 "--compare", "hf", "--repeat", "1", "--device", "cuda", "--json", str(latency)]) == 0
    for path, main_metric in ((offline, "output_tok_s"), (latency, "decode_tok_s")):
        record = json.loads(path.read_text())
        assert record["device"] == "cuda" and record["dtype"] == "bfloat16" and "gpu" in record["machine"]
        assert record["roofline"]["bandwidth_gb_s"] > 100  # any CUDA GPU copies faster than this
        for row in record["results"]:
            assert "error" not in row and row[main_metric] > 0 and row["roofline_fraction"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int8", "int4", "w8a8"])
def test_bench_latency_with_quantized_weights_on_cuda(tmp_path, weights: str) -> None:
    """Weights quantized on the GPU, decoded through the weight-only kernels (w8a8: the W8A8 kernels) under CUDA
    graphs; fewer weight bytes per step than the same shape in bfloat16."""
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_SHAPES["llama3-scaled"]))
    records = {}
    for name in ("float", weights):
        path = tmp_path / f"{name}.json"
        assert main(["bench", "latency", "--shape", str(config), "--prompt-len", "32", "--output-len", "16",
                     "--repeat", "1", "--device", "cuda", "--weights", name, "--json", str(path)]
                    + (["--group-size", "32"] if name == "int4" else [])) == 0  # the tiny shape's K is 64
        records[name] = json.loads(path.read_text())
    record = records[weights]
    assert record["weights"] == weights and record["quantization"]["bits"] == (8 if weights == "w8a8" else
                                                                              int(weights[3:]))
    (row,) = record["results"]
    assert "error" not in row and row["decode_tok_s"] > 0 and row["output_tokens"] == 16
    quantized_bytes = record["roofline"]["weight_bytes_per_step"]
    assert 0 < quantized_bytes < records["float"]["roofline"]["weight_bytes_per_step"]
