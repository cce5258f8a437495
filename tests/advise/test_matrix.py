"""`trident advise` without --fit: SLOs and scenarios, the matrix's verdicts and recommendation on hand-made
measurements, and the whole command on the default model and an int8 variant of it (measured, cached, with the
perplexities checked against trident eval's on its own engine)."""

from __future__ import annotations

import json

import pytest

from trident.advise.matrix import evaluate, pareto_front, recommend, serve_commands
from trident.advise.measure import BatchRun, MatrixSettings, Variant, VariantMeasurement
from trident.advise.memory import DeviceMemory, estimate_fit
from trident.advise.slo import SCENARIOS, Slo, slo_for
from trident.cli import main
from trident.config import ModelConfig
from trident.engine.llm import engine_config
from trident.errors import TridentError

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
      "max_position_embeddings": 4096}
TEXT = "".join(f"Line {i}: the river ran past the mill {i % 7} times, and the miller counted every turn.\n"
               for i in range(400))


def measurement(weights: str, perplexity: float, ttft: float, tpot: float, throughput: float,
                context: int = 4096) -> VariantMeasurement:
    """A variant measured at batch caps 1 and 4 (the batch of 4: twice the TPOT, three times the throughput)."""
    runs = (BatchRun(1, throughput / 3, ttft, tpot / 2), BatchRun(4, throughput, ttft * 3, tpot))
    return VariantMeasurement(Variant("default", weights), weights, "float32", "float32", perplexity, 1 << 20, ttft,
                              tpot / 2, runs, context, None, 1.0)


def cells(measurements, fits=None, batch: int = 4):
    """(measurement, its run at ``batch``, a fit) for each measurement."""
    return [(m, next(r for r in m.batch_runs if r.batch == batch), f)
            for m, f in zip(measurements, fits or [fit()] * len(measurements))]


def fit(free: int = 1 << 34):
    return estimate_fit(ModelConfig.from_hf_dict(HF), engine_config(None, dtype="float32", max_model_len=1024,
                                                                    max_num_seqs=4),
                        device=DeviceMemory("cpu", "test", free, free))


def test_slo_scenarios_and_limits() -> None:
    assert slo_for("realtime") == SCENARIOS["realtime"] and slo_for(None) == Slo()
    assert slo_for("realtime", ttft_ms=500, objective=None).ttft_ms == 500
    assert "TTFT <= 500 ms" in slo_for("realtime", ttft_ms=500).describe()
    with pytest.raises(TridentError, match="unknown scenario"):
        slo_for("fast")
    with pytest.raises(TridentError, match="must be positive"):
        Slo(tpot_ms=-1)
    with pytest.raises(TridentError, match="unknown objective"):
        Slo(objective="speed")


def test_flags_of_the_other_mode_are_refused(capsys) -> None:
    assert main(["advise", "--shape", "llama3-8b"]) == 2
    assert "--shape go only with --fit" in capsys.readouterr().err
    assert main(["advise", "--fit", "--scenario", "edge", "--plot", "x.png"]) == 2
    assert "--scenario, --plot do not go with --fit" in capsys.readouterr().err


def test_verdicts_and_recommendation() -> None:
    ms = [measurement("stored", 10.0, 100, 20, 50), measurement("int8", 10.2, 80, 15, 70),
          measurement("int4", 13.0, 60, 10, 90, context=2048)]
    rows = evaluate(cells(ms), Slo(ttft_ms=90, max_perplexity_change=0.05, objective="throughput"))
    assert [r.perplexity_change for r in rows] == pytest.approx([0.0, 0.02, 0.3])
    assert rows[0].misses == ("TTFT 100 > 90 ms",) and rows[1].meets
    assert rows[2].misses == ("perplexity +30.0% > +5%",)
    assert recommend(rows, Slo(ttft_ms=90, max_perplexity_change=0.05, objective="throughput")) is rows[1]
    everything = evaluate(cells(ms), Slo(objective="throughput"))
    assert recommend(everything, Slo(objective="throughput")).variant.weights == "int4"
    assert recommend(everything, Slo(objective="quality")).variant.weights == "stored"
    assert recommend(everything, Slo(objective="latency")).variant.weights == "int4"
    assert [r.variant.weights for r in pareto_front(everything)] == ["stored", "int8", "int4"]
    slower = evaluate(cells([*ms, measurement("float", 10.0, 200, 40, 20)]), Slo())
    assert "float" not in [r.variant.weights for r in pareto_front(slower)]  # stored beats it on both
    tight = evaluate(cells(ms, [fit(free=1 << 20)] * 3), Slo(min_context=4096))
    assert all(any(m.startswith("needs") for m in r.misses) for r in tight)
    assert any(m == "context 2,048 < 4,096" for m in tight[2].misses)
    assert recommend(tight, Slo()) is None


def test_serve_commands() -> None:
    rows = evaluate(cells([measurement("stored", 10, 1, 1, 1),
                           dataclass_replace(measurement("int4", 11, 1, 1, 1), group_size=64)]), Slo())
    settings = MatrixSettings()
    assert serve_commands(rows[0], settings) == ["trident serve default --max-model-len 1024 --max-num-seqs 4 "
                                                 f"--kv-cache-memory {-(-rows[0].fit.kv_bytes // 2**20)}MiB"]
    quantize, serve = serve_commands(rows[1], settings)
    assert quantize == "trident quantize default --bits 4 --group-size 64 --out model-int4"
    assert serve.startswith("trident serve model-int4 ")


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_advise_end_to_end_with_cache(tmp_path, monkeypatch, capsys) -> None:
    from trident import LLM
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.texts import encode_first

    monkeypatch.setenv("TRIDENT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "220")
    text = tmp_path / "mill.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["advise", "--variants", "stored,int8", "--text", str(text), "--perplexity-tokens", "512",
            "--prompt-len", "64", "--output-len", "8", "--batch", "2,1", "--dtype", "float32",
            "--max-perplexity-change", "0.5", "--objective", "quality", "--json", str(tmp_path / "m.json"),
            "--plot", str(tmp_path / "m.png")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "measured in" in first and "recommended: default stored" in first
    record = json.loads((tmp_path / "m.json").read_text())
    assert [(r["variant"]["weights"], r["batch"]) for r in record["rows"]] == [("stored", 1), ("stored", 2),
                                                                                ("int8", 1), ("int8", 2)]
    stored, int8 = record["measurements"]
    assert stored["variant"]["weights"] == "stored" and int8["weights_description"] == "int8 per channel sym x120"
    assert [run["batch"] for run in stored["batch_runs"]] == [1, 2]
    # the stored row's perplexity is trident eval's on an engine of the same model and windows
    llm = LLM(dtype="float32")
    ids = encode_first(llm.tokenizer, TEXT, 512)
    expected = perplexity(llm.engine, ids, PerplexityConfig(window=256, max_tokens=512)).perplexity
    assert stored["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert 0 < int8["perplexity"] / stored["perplexity"] - 1 < 0.1  # int8 per channel of the dequantized Q4_1
    assert all(r["meets"] for r in record["rows"]) and record["recommended"]["variant"]["weights"] == "stored"
    assert all(min(r["throughput"], r["ttft_ms"], r["batch_ttft_ms"], r["tpot_ms"]) > 0
               for r in record["rows"])
    # the memory estimate grows with the batch cap by the KV cache of one more sequence (and its logits)
    one, two = record["rows"][0]["memory_estimate_bytes"], record["rows"][1]["memory_estimate_bytes"]
    assert two > one
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0  # a second time: every variant from the cache
    again = capsys.readouterr().out
    assert again.count(": cached") == 2 and "measured in" not in again
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == record["rows"]
