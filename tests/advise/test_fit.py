"""trident/advise/memory.py's fit estimate by hand on a tiny config, and `trident advise --fit` on the command
line (the server's refusal: tests/serve/test_fit_refusal.py)."""

from __future__ import annotations

import dataclasses
import json
import os

from trident.advise.memory import (
    CPU_RUNTIME_BYTES,
    LOGITS_COPIES,
    DeviceMemory,
    device_memory,
    estimate_fit,
    serving_problem,
)
from trident.cli import main
from trident.config import ModelConfig
from trident.engine.llm import engine_config
from trident.engine.sizing import estimate_memory

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
      "max_position_embeddings": 4096, "tie_word_embeddings": False}
GIB = 1 << 30


def roomy(free: int = 8 * GIB) -> DeviceMemory:
    return DeviceMemory("cpu", "test RAM", 16 * GIB, free)


def test_parts_by_hand() -> None:
    config = ModelConfig.from_hf_dict(HF)
    engine = engine_config(None, dtype="float32", max_model_len=1000, max_num_seqs=3, block_size=16,
                           max_num_batched_tokens=128)
    fit = estimate_fit(config, engine, device=roomy())
    params = 2 * 1000 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64) + 64
    assert fit.weights_bytes == 4 * params
    block = 2 * 2 * 2 * 16 * 16 * 4  # k and v, 2 layers, 2 kv heads, 16 tokens, head_dim 16, float32
    assert fit.kv_block_bytes == block and fit.kv_bytes == 3 * 63 * block  # 1000 tokens: 63 blocks each
    step = 128 * (4 * 64 + (4 + 4) * 16 + 3 * 96) * 4 + 2 * 1000 * 2 * 16 * 4 + 128 * 1000
    assert fit.activation_bytes == step + 3 * LOGITS_COPIES * 4 * 1000
    assert fit.runtime_bytes == CPU_RUNTIME_BYTES
    assert fit.total_bytes == fit.weights_bytes + fit.kv_bytes + fit.activation_bytes + CPU_RUNTIME_BYTES
    assert fit.fits
    room = 8 * GIB - fit.weights_bytes - CPU_RUNTIME_BYTES - step
    assert fit.max_concurrency() == room // (63 * block + LOGITS_COPIES * 4 * 1000)
    assert fit.max_concurrency(64) == room // (4 * block + LOGITS_COPIES * 4 * 1000)
    assert fit.max_context() == 4096  # the model's, long before memory runs out
    tight = estimate_fit(config, engine, device=roomy(fit.total_bytes - 1))
    assert not tight.fits and tight.max_concurrency() == 2
    assert tight.max_context() == (tight.device.free_bytes - fit.total_bytes + fit.kv_bytes) // (3 * block) * 16
    int8 = estimate_fit(config, dataclasses.replace(engine, cache=dataclasses.replace(engine.cache,
                                                                                      kv_cache_dtype="int8")),
                        device=roomy())
    assert int8.kv_block_bytes == 2 * 2 * 2 * 16 * (16 + 4)  # a byte per element, a float32 scale per token-head


def test_device_memory_of_this_machine() -> None:
    cpu = device_memory(__import__("torch").device("cpu"))
    assert cpu.total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < cpu.free_bytes <= cpu.total_bytes


def test_serving_problems() -> None:
    config = ModelConfig.from_hf_dict(HF)
    short = engine_config(None, dtype="float32", max_model_len=4096, memory_budget_bytes=1 << 20)
    problem = serving_problem(config, short, estimate_memory(config, short), device=roomy())
    assert problem is not None and "holds 2,048 tokens" in problem and "at most 2,048" in problem  # 128 blocks
    fine = engine_config(None, dtype="float32", max_model_len=2048, memory_budget_bytes=2 << 20)
    engine = estimate_memory(config, fine)
    assert serving_problem(config, fine, engine, device=roomy()) is None
    fit = estimate_fit(config, fine, device=roomy())
    needed = engine.weights_bytes + engine.kv_cache_bytes + fit.activation_bytes + fit.runtime_bytes
    assert serving_problem(config, fine, engine, device=roomy(needed)) is None
    problem = serving_problem(config, fine, engine, device=roomy(needed - (512 << 10)))  # room for one sequence
    assert problem is not None and "is free" in problem and "holds 1 sequence of 2,048 tokens" in problem


def _config_file(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF))
    return str(path)


def test_cli_fits_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "fit.json"
    assert main(["advise", "--fit", "--shape", _config_file(tmp_path), "--max-model-len", "1000", "--max-num-seqs",
                 "3", "--dtype", "float32", "--contexts", "64,4096", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fits" in printed and "serve it with: trident serve" in printed and "--max-model-len 1000" in printed
    record = json.loads(out.read_text())
    device = DeviceMemory(**record["device"])  # what was free then
    fit = estimate_fit(ModelConfig.from_hf_dict(HF), engine_config(None, dtype="float32", max_model_len=1000,
                                                                   max_num_seqs=3), device=device)
    assert record["bytes"] == {"weights": fit.weights_bytes, "kv_cache": fit.kv_bytes,
                               "activations": fit.activation_bytes, "runtime": fit.runtime_bytes,
                               "total": fit.total_bytes}
    assert set(record["max_concurrency"]) == {"64", "1000", "4096"} and record["fits"] is True
    assert record["max_concurrency"]["4096"] == fit.max_concurrency(4096)


def test_cli_does_not_fit(tmp_path, capsys) -> None:
    shape = dict(HF, vocab_size=2_000_000, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    path = tmp_path / "huge"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(shape))  # about 64 GB of float32 embeddings and head
    assert main(["advise", "--fit", "--shape", str(path), "--dtype", "float32"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys) -> None:
    assert main(["advise", "--fit", "--shape", _config_file(tmp_path), "--group-size", "64"]) == 2
    assert "--group-size goes with --weights" in capsys.readouterr().err
    assert main(["advise", "--fit", "default", "--shape", "llama3-8b"]) == 2
    assert main(["advise", "--fit", "--gguf-weights", "native", "--weights", "int4"]) == 2
    assert "stored quantized already" in capsys.readouterr().err
    assert main(["advise", "--fit", "--shape", "llama3-8b", "--contexts", "8k"]) == 2


def test_cli_default_model_quantized_estimate(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["advise", "--fit", "--gguf-weights", "dequantize", "--weights", "int8", "--dtype", "float32",
                 "--max-model-len", "2048", "--max-num-seqs", "2"]) == 0
    assert "int8 layers (120)" in capsys.readouterr().out  # 30 x (qkv, o, gate_up, down); the tied head stays float
