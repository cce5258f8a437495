"""`trident bench` runs end to end, side by side with HF transformers, and writes its JSON: on the real
default model, and on random weights of a shape given as a config.json."""

from __future__ import annotations

import json

import pytest

from trident.cli import main

TINY_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 10240, "max_position_embeddings": 4096, "tie_word_embeddings": True}


@pytest.fixture
def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny-qwen3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def test_bench_latency_compare_hf_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "latency.json"
    assert main(["bench", "latency", "--compare", "hf", "--prompt-len", "24", "--output-len", "6", "--repeat", "2",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["kind"] == "latency" and record["workload"]["prompt_len_max"] == 24
    engines = [r["engine"] for r in record["results"]]
    assert engines[0].startswith("trident (") and engines[1].startswith("hf-transformers (")
    # the peer runs in trident's dtype (trident's label also names the default model's native Q4_1 weights)
    assert engines[0].split("(")[1].split(",")[0].rstrip(")") == engines[1].split("(")[1].rstrip(")")
    for row in record["results"]:
        assert row["output_tokens"] == 6 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
        assert 0 < row["roofline_fraction"] == pytest.approx(row["decode_tok_s"] / record["roofline"]["roofline_tok_s"])
    assert record["results"][1]["method"] == "static cache"
    assert "trident / peer" in capsys.readouterr().out


def test_bench_offline_writes_json(tmp_path) -> None:
    path = tmp_path / "offline.json"
    assert main(["bench", "offline", "--num-prompts", "4", "--prompt-len", "16", "--output-len", "5", "--repeat", "1",
                 "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["results"]
    assert row["requests"] == 4 and row["output_tokens"] == 20 and row["output_tok_s"] > 0


def test_bench_offline_nano_on_a_shape_compare_hf(tmp_path, tiny_config, capsys) -> None:
    path = tmp_path / "nano.json"
    assert main(["bench", "offline", "--shape", tiny_config, "--workload", "nano", "--num-prompts", "4",
                 "--output-len", "6", "--compare", "hf", "--repeat", "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["source"] == "shape" and record["model"] == "tiny-qwen3"
    assert record["shape"]["hf_config"] == TINY_CONFIG and record["shape"]["weights_seed"] == 0
    assert record["workload"]["name"] == "nano" and record["workload"]["prompts"] == 4
    assert record["workload"]["output_tokens"] == 24 and record["engine_options"]["max_num_seqs"] == 4
    bound = record["roofline"]
    assert bound["bandwidth_gb_s"] > 0 and bound["steps"] == 6 and bound["mean_batch"] == 4
    assert bound["weight_bytes_per_step"] > 0 and bound["roofline_tok_s"] > 0
    ours, theirs = record["results"]
    assert ours["engine"].startswith("trident (") and theirs["engine"].startswith("hf-transformers (")
    assert theirs["method"].startswith("continuous batching")
    for row in (ours, theirs):
        assert row["output_tokens"] == 24 and row["output_tok_s"] > 0 and 0 < row["roofline_fraction"]
    out = capsys.readouterr().out
    assert "tiny-qwen3" in out and "of roofline" in out


def test_bench_latency_on_a_shape(tmp_path, tiny_config) -> None:
    path = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", tiny_config, "--prompt-len", "20", "--output-len", "4", "--repeat",
                 "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    (row,) = record["results"]
    assert record["workload"]["prompt_tokens"] == 20 and row["output_tokens"] == 4
    assert record["roofline"]["steps"] == 3 and record["roofline"]["mean_batch"] == 1  # decode after token 1


def test_a_peer_failure_is_reported_in_its_row(tmp_path, tiny_config, monkeypatch, capsys) -> None:
    from trident.bench import peer_offline

    def broken(model, workload):
        raise RuntimeError("peer exploded")

    monkeypatch.setattr(peer_offline, "hf_offline", broken)
    path = tmp_path / "broken.json"
    assert main(["bench", "offline", "--shape", tiny_config, "--num-prompts", "2", "--prompt-len", "8",
                 "--output-len", "3", "--compare", "hf", "--repeat", "2", "--json", str(path)]) == 0
    ours, theirs = json.loads(path.read_text())["results"]
    assert ours["output_tokens"] == 6 and len(ours["runs"]) == 2
    assert theirs["error"] == "RuntimeError: peer exploded" and theirs["runs"] == []
    assert "peer exploded" in capsys.readouterr().out


def test_unknown_shape_is_a_clear_error(capsys) -> None:
    assert main(["bench", "offline", "--shape", "qwen9-1t"]) == 2
    err = capsys.readouterr().err
    assert "unknown shape 'qwen9-1t'" in err and "qwen3-0.6b" in err and "llama3-8b" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--workload", "nano", "--num-prompts", "300"], "--num-prompts must be in [1, 256]"),
])
def test_bad_bench_options_are_clear_errors(argv: list[str], message: str, tiny_config, capsys) -> None:
    assert main(["bench", "offline", "--shape", tiny_config, *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_latency_moe_report_on_a_moe_shape(tmp_path, tiny_config, capsys) -> None:
    """--moe-report on random weights of the tiny Qwen3-MoE shape: per-layer figures in the JSON and the table, and
    the heat map PNG beside the JSON; a dense model is refused with the reason."""
    path = tmp_path / "moe.json"
    assert main(["bench", "latency", "--shape", "qwen3-moe-tiny", "--prompt-len", "12", "--output-len", "4",
                 "--repeat", "1", "--moe-report", "--json", str(path)]) == 0
    moe = json.loads(path.read_text())["moe"]
    assert (moe["num_experts"], moe["top_k"]) == (128, 8) and [m["layer"] for m in moe["layers"]] == [0, 1, 2, 3]
    assert moe["num_tokens"] >= 12 + 3  # the timed request's tokens (and the warm-up's) went through every layer
    for layer in moe["layers"]:
        assert sum(layer["token_counts"]) == 8 * moe["num_tokens"]
        assert layer["imbalance"] == pytest.approx(max(layer["token_counts"]) / (8 * moe["num_tokens"] / 128))
        assert sum(layer["mean_probs"]) == pytest.approx(1.0, abs=1e-5)
    png = tmp_path / "moe-moe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "expert load" in out and "imbalance" in out
    assert main(["bench", "latency", "--shape", tiny_config, "--moe-report", "--repeat", "1",
                 "--json", str(tmp_path / "dense.json")]) == 2
    assert "no experts" in capsys.readouterr().err
