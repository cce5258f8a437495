"""Variants side by side (trident/compress/variants.py, `trident eval report`, `trident quantize --report`) on a tiny
random Llama with a byte-level tokenizer and its int8 / int4 folders: each column against an independent
measurement (perplexity run directly, the files' bytes, a sum over the loaded model's tensors, the transformers
parameter count), the JSON record and PNG, and the user errors. Speeds are only checked to be positive and finite."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from trident.bench.trident_side import run_latency
from trident.bench.workloads import latency_workload
from trident.cli import main
from trident.compress.eval import PerplexityConfig, perplexity, plan_windows
from trident.compress.variants import VariantSettings, load_variant
from trident.quant.linear import QuantizedLinear

TEXT = (
    "A miller lived beside a river that turned his wheel from spring to autumn. In the dry months the water ran low "
    "and the stones stood still, so he mended sacks, sharpened tools and walked to the market to buy grain for the "
    "winter. When the rains returned the river rose, the wheel turned again and the whole valley brought him its "
    "harvest. He ground wheat for the baker, barley for the brewer and oats for the farmers' horses, and every "
    "evening he swept the floor and counted the sacks stacked against the wall.\n"
)
SETTINGS = VariantSettings(perplexity=PerplexityConfig(window=64, max_tokens=256), prompt_len=16, output_len=4,
                           repeat=1, dtype="bfloat16", threads=1)
"""bfloat16 on the CPU: the int4 layers then run torch's packed kernel and keep its re-packed codes. One thread:
a tiny model gains nothing from two, and loses much on a busy machine."""


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The engines here set torch's thread count (process-wide) to 1; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _quantize(model: Path, out: Path, *flags: str) -> str:
    assert main(["quantize", str(model), *flags, "--out", str(out), "--json", str(out) + ".json"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def variants(tiny_text_llama_dir, tmp_path_factory) -> list[str]:
    """The original folder, its int8 per-channel and its int4 group-32 round-to-nearest folders."""
    root = tmp_path_factory.mktemp("variants")
    return [str(tiny_text_llama_dir), _quantize(tiny_text_llama_dir, root / "int8", "--bits", "8"),
            _quantize(tiny_text_llama_dir, root / "int4", "--bits", "4", "--group-size", "32")]


@pytest.fixture(scope="module")
def report(variants, tmp_path_factory) -> dict:
    """`trident eval report` over the three folders with SETTINGS: its JSON record (and the PNG beside it)."""
    root = tmp_path_factory.mktemp("report")
    text_file = root / "miller.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code = main(["eval", "report", *variants, "--text", str(text_file), "--window", "64", "--max-tokens", "256",
                 "--prompt-len", "16", "--output-len", "4", "--repeat", "1", "--dtype", "bfloat16",
                 "--threads", "1", "--json", str(root / "variants.json"), "--plot", str(root / "variants.png")])
    assert code == 0
    return {**json.loads((root / "variants.json").read_text()), "png": (root / "variants.png").read_bytes()}


def _independent_resident_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, layers with a CPU kernel's weight): parameters, buffers and each QuantizedLinear's weight for a CPU
    kernel (torch's int4 one, or trident's native one: re-packed codes, or per-channel int8's stored codes
    themselves) with their scales, offsets and bias, by distinct storage."""
    tensors = [*model.parameters(), *model.buffers()]
    packed = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and "_int4_cpu" in m.__dict__:
            p = m.__dict__["_int4_cpu"]
            tensors += [p.packed, p.scale_and_zeros]
            packed += 1
        if isinstance(m, QuantizedLinear) and "_native_cpu" in m.__dict__:
            p = m.__dict__["_native_cpu"]
            tensors += [t for t in (p.codes, p.scales, p.offsets, p.bias) if t is not None]
            packed += 1
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), packed


def test_rows_match_independent_measurements(report, variants, tiny_text_llama_dir) -> None:
    import transformers

    hf_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
        tiny_text_llama_dir).parameters())
    assert report["kind"] == "variants" and report["text"]["slice"] == "all"
    assert asdict(SETTINGS) == report["settings"]
    assert [row["name"] for row in report["rows"]] == variants  # every row, in order
    ids = None
    for row, model in zip(report["rows"], variants):
        engine, checkpoint, _ = load_variant(model, SETTINGS)
        ids = engine.tokenizer.encode(TEXT)[:256]
        direct = perplexity(engine, ids, SETTINGS.perplexity)
        assert row["dtype"] == "bfloat16"
        assert row["perplexity"] == pytest.approx(direct.perplexity, rel=1e-12)
        assert row["nll"] == pytest.approx(direct.nll, rel=1e-12)
        assert row["disk_bytes"] == sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
        assert row["params"] == hf_params  # quantized weights count as their N x K weights
        run_latency(engine, latency_workload(engine.tokenizer, 16, 4))  # builds what the layers derive on use
        expected, num_packed = _independent_resident_bytes(engine.model)
        assert row["resident_bytes"] == expected
        # int8 (the stored codes, no copy) and int4: 4 modules (qkv, o, gate_up, down) x 2 layers
        assert num_packed == (0 if model == variants[0] else 8)
        assert row["cuda_peak_bytes"] is None and len(row["latency_runs"]) == 1
        for key in ("prefill_tok_s", "decode_tok_s", "ppl_seconds", "load_s"):
            assert math.isfinite(row[key]) and row[key] > 0
        del engine, checkpoint
    assert report["fingerprint"] == plan_windows(ids, SETTINGS.perplexity).fingerprint
    assert (report["num_windows"], report["num_scored_tokens"]) == (4, 252)
    original, int8, int4 = report["rows"]
    assert int4["disk_bytes"] < int8["disk_bytes"] < original["disk_bytes"]
    # int4 on the CPU keeps the re-packed codes beside the stored ones; int8 multiplies its stored codes
    assert int8["resident_bytes"] < original["resident_bytes"] and int4["resident_bytes"] < original["resident_bytes"]
    assert original["weights"] == "float" and int8["weights"] == "int8 per channel sym x8"
    assert int4["weights"] == "int4 g32 sym x8"
    assert original["vs_original"] is None
    for row in (int8, int4):
        change = row["vs_original"]
        assert change["perplexity_change"] == pytest.approx(row["perplexity"] / original["perplexity"] - 1)
        assert change["size_ratio"] == pytest.approx(row["disk_bytes"] / original["disk_bytes"])
        assert change["memory_ratio"] == pytest.approx(row["resident_bytes"] / original["resident_bytes"])
        assert change["prefill_speedup"] == pytest.approx(row["prefill_tok_s"] / original["prefill_tok_s"])
        assert change["decode_speedup"] == pytest.approx(row["decode_tok_s"] / original["decode_tok_s"])
    assert report["png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_report_end_to_end(tiny_text_llama_dir, tmp_path, capsys) -> None:
    text_file = tmp_path / "miller.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out, plot = tmp_path / "int8", tmp_path / "int8.png"
    code = main(["quantize", str(tiny_text_llama_dir), "--bits", "8", "--out", str(out), "--json",
                 str(tmp_path / "q.json"), "--report", "--report-text", str(text_file), "--report-window", "64",
                 "--report-max-tokens", "256", "--report-dtype", "float32", "--report-threads", "1",
                 "--report-plot", str(plot)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "q-report.json").read_text())
    assert record["quantize_json"] == str(tmp_path / "q.json") and (tmp_path / "q.json").exists()
    original, quantized = record["rows"]
    assert (original["name"], quantized["name"]) == (str(tiny_text_llama_dir), str(out))
    assert quantized["weights"] == "int8 per channel sym x8" and quantized["dtype"] == "float32"
    assert quantized["disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert quantized["vs_original"]["size_ratio"] == pytest.approx(quantized["disk_bytes"] / original["disk_bytes"])
    assert (record["num_windows"], record["num_scored_tokens"]) == (4, 252)
    assert abs(quantized["vs_original"]["perplexity_change"]) < 0.05  # int8 barely moves a random model
    assert all(math.isfinite(r["prefill_tok_s"]) and r["prefill_tok_s"] > 0 for r in record["rows"])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "quantized model written to" in printed and "trident variants" in printed


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_user_errors(tiny_text_llama_dir, variants, tmp_path, capsys, monkeypatch) -> None:
    text_file = tmp_path / "miller.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "never"
    quantize = ["quantize", str(tiny_text_llama_dir), "--bits", "8", "--out", str(out)]
    assert "--report-plot only apply with --report" in _error(capsys, *quantize, "--report-plot", "x.png")
    assert "does not exist" in _error(capsys, *quantize, "--report", "--report-text", str(tmp_path / "none.txt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in _error(capsys, *quantize, "--report", "--report-text", str(text_file),
                                      "--report-device", "cuda")
    assert not out.exists()  # refused before any work
    assert "output_len must be at least 2" in _error(capsys, "eval", "report", *variants[:2], "--text",
                                                     str(text_file), "--output-len", "1")

    from trident.compress import texts

    calls, encode_first = [], texts.encode_first

    def tokenize_differently(tokenizer, text, max_tokens):  # as a model with another vocabulary would
        calls.append(1)
        return encode_first(tokenizer, text[len(calls) - 1:], max_tokens)

    monkeypatch.setattr(texts, "encode_first", tokenize_differently)
    assert "tokenizes the text differently" in _error(
        capsys, "eval", "report", *variants[:2], "--text", str(text_file), "--window", "64", "--max-tokens", "256",
        "--prompt-len", "16", "--output-len", "4", "--repeat", "1", "--threads", "1")
