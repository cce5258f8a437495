"""The memory estimate (trident/advise/memory.py) against the resident memory a fresh process gains while loading
the default model and filling its KV cache with ``max_num_seqs`` sequences of ``max_model_len`` tokens: within 10%,
for weights kept as the GGUF's Q4_1/Q8_0 codes or dequantized to float32, float32 or int8 KV caches, and different
contexts and concurrencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trident.advise.memory import estimate_fit
from trident.engine.llm import engine_config
from trident.engine.sizing import gguf_native
from trident.loader.describe import describe_model

SCRIPT = Path(__file__).with_name("measure_memory.py")


@pytest.mark.parametrize("options", [
    {"max_model_len": 1024, "max_num_seqs": 4, "dtype": "float32"},
    {"max_model_len": 2048, "max_num_seqs": 2, "dtype": "float32", "kv_cache_dtype": "int8"},
    {"max_model_len": 512, "max_num_seqs": 8, "dtype": "float32", "gguf_weights": "dequantize"},
], ids=["q4_1-f32kv-1024x4", "q4_1-int8kv-2048x2", "f32-f32kv-512x8"])
def test_estimate_within_ten_percent_of_measured(options: dict) -> None:
    config = engine_config(None, **options)
    model = describe_model(None, gguf_native(config, torch.device("cpu")))
    estimate = estimate_fit(model.config, config, model.quantization)
    run = subprocess.run([sys.executable, str(SCRIPT), json.dumps(options)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["num_blocks"] == measured["blocks_used"]  # the cache is sized to the workload, and filled
    assert estimate.kv_bytes == measured["num_blocks"] * estimate.kv_block_bytes
    error = estimate.total_bytes / measured["peak_bytes"] - 1
    parts = {"weights": estimate.weights_bytes, "kv": estimate.kv_bytes, "activations": estimate.activation_bytes,
             "runtime": estimate.runtime_bytes, "measured": measured["peak_bytes"]}
    assert abs(error) <= 0.10, {k: f"{v / 2**20:.0f} MiB" for k, v in parts.items()}
