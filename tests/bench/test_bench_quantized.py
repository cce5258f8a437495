"""`trident bench --weights int8|int4|w8a8`: the checkpoint's decoder Linear weights are quantized where they lie
(fused projections as the model holds them), the engine loads them through its quantized path, and the roofline
counts their stored bytes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_shapes import TINY_SHAPES

from trident.bench.quantized_weights import (
    bench_experts_config,
    bench_quant_config,
    quantization_plan,
    quantize_checkpoint,
)
from trident.bench.random_weights import random_checkpoint, weight_specs
from trident.bench.shapes import Shape
from trident.cli import main
from trident.config import ModelConfig
from trident.errors import TridentError
from trident.quant.rtn import QuantConfig, QuantizedWeight, dequantize, quantized_bytes


def test_quantize_checkpoint_fuses_projections_and_keeps_the_rest() -> None:
    shape = Shape("t", dict(TINY_SHAPES["qwen2-bias"]), "test")
    source = random_checkpoint(shape, device="cpu", dtype=torch.float32, seed=1)
    config = QuantConfig(bits=4, group_size=32)
    quantized = quantize_checkpoint(source, config)
    modules = quantized.quantization.modules
    assert quantized.quantization.config == config and len(modules) == 2 * 4  # qkv, o, gate_up, down per layer
    assert "model.layers.1.self_attn.qkv_proj" in modules and "model.layers.0.mlp.gate_up_proj" in modules
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(leaf)
        sources = [f"{parent}.{p}.weight" for p in parts] if parts else [f"{name}.weight"]
        weight = torch.cat([source.tensors[s] for s in sources]).double()
        assert not any(s in quantized.tensors for s in sources)
        q = QuantizedWeight(*(quantized.tensors.get(f"{name}.{kind}") for kind in ("qweight", "scales", "zeros")))
        assert q.zeros is None and q.qweight.dtype == torch.uint8
        steps = q.scales.double().repeat_interleave(32, dim=1)
        assert ((dequantize(q, config, torch.float64) - weight).abs() <= steps / 2 * (1 + 1e-6)).all(), name
    kept = [n for n in source.tensors if not any(n.startswith(m.rpartition(".")[0]) and n.endswith("_proj.weight")
                                                  for m in modules)]
    assert any(n.endswith("q_proj.bias") for n in kept) and "lm_head.weight" in kept
    assert all(quantized.tensors[n] is source.tensors[n] for n in kept)
    with pytest.raises(TridentError, match="already quantized"):
        quantize_checkpoint(quantized, config)


def test_bench_quant_config() -> None:
    assert bench_quant_config("float", None) is None
    assert bench_quant_config("int8", None) == QuantConfig(bits=8, group_size=None)
    assert bench_quant_config("int4", None) == QuantConfig(bits=4, group_size=128)
    assert bench_quant_config("int4", 0) == QuantConfig(bits=4, group_size=None)
    assert bench_quant_config("int8", 64) == QuantConfig(bits=8, group_size=64)
    assert bench_quant_config("w8a8", None) == QuantConfig(bits=8, group_size=None, symmetric=True)
    for weights in ("float", "w8a8"):
        with pytest.raises(TridentError, match="--group-size"):
            bench_quant_config(weights, 32)


def test_bench_experts_config() -> None:
    """--expert-weights: None when absent or when it says what --weights implies (int8 experts per channel whatever
    --group-size, int4 in its groups); int4 experts take --group-size (default 128, 0: per channel); refused beside
    --weights float or w8a8."""
    assert bench_experts_config("int8", None, None) is None
    assert bench_experts_config("int8", "int8", 32) is None and bench_experts_config("int4", "int4", None) is None
    assert bench_experts_config("int8", "int4", None) == QuantConfig(bits=4, group_size=128)
    assert bench_experts_config("int8", "int4", 32) == QuantConfig(bits=4, group_size=32)
    assert bench_experts_config("int8", "int4", 0) == QuantConfig(bits=4, group_size=None)
    assert bench_experts_config("int4", "int8", 64) == QuantConfig(bits=8, group_size=None)
    for weights in ("float", "w8a8"):
        with pytest.raises(TridentError, match=f"--expert-weights applies to --weights int8 or int4.*{weights}"):
            bench_experts_config(weights, "int4", None)
    with pytest.raises(TridentError, match="--expert-weights must be one of"):
        bench_experts_config("int8", "int2", None)


def test_bench_cli_parses_expert_weights_and_refuses_it_with_float_weights(tmp_path, capsys) -> None:
    from trident.cli import build_parser

    args = build_parser().parse_args(["bench", "latency", "--weights", "int8", "--expert-weights", "int4"])
    assert (args.weights, args.expert_weights) == ("int8", "int4")
    assert build_parser().parse_args(["bench", "offline"]).expert_weights is None
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(TINY_SHAPES["mixtral-window"]))
    assert main(["bench", "latency", "--shape", str(config_path), "--device", "cpu", "--weights", "float",
                 "--expert-weights", "int4"]) == 2
    assert "--expert-weights applies to --weights int8 or int4" in capsys.readouterr().err
    config_path.write_text(json.dumps(TINY_SHAPES["llama3-scaled"]))  # a dense model
    assert main(["bench", "latency", "--shape", str(config_path), "--device", "cpu", "--weights", "int8",
                 "--expert-weights", "int4"]) == 2
    assert "this model has no routed experts" in capsys.readouterr().err


def test_bench_latency_with_w8a8_weights(tmp_path) -> None:
    """--weights w8a8 runs the layers as W8A8Linear (the label and the record say so) and counts int8
    per-channel bytes."""
    hf_config = dict(TINY_SHAPES["llama3-scaled"])
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(hf_config))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", str(config_path), "--prompt-len", "16", "--output-len", "4",
                 "--repeat", "1", "--device", "cpu", "--dtype", "float32", "--weights", "w8a8",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["weights"] == "w8a8" and record["quantization"]["quant_method"] == "trident-w8a8"
    (row,) = record["results"]
    assert "int8 per-token activations" in row["engine"] and row["decode_tok_s"] > 0


def test_bench_latency_with_int8_weights_counts_their_bytes(tmp_path) -> None:
    hf_config = dict(TINY_SHAPES["llama3-scaled"])
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(hf_config))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", str(config_path), "--prompt-len", "16", "--output-len", "4",
                 "--repeat", "1", "--device", "cpu", "--dtype", "float32", "--weights", "int8", "--group-size", "32",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["weights"] == "int8" and record["quantization"]["bits"] == 8
    assert record["quantization"]["group_size"] == 32
    (row,) = record["results"]
    assert "int8 g32 weights" in row["engine"] and row["decode_tok_s"] > 0
    # Expected bytes per step: float32 tensors except the untied input embedding, and the quantized layers'
    # codes and scales instead of their weights (the tiny shape is untied).
    model_config = ModelConfig.from_hf_dict(hf_config)
    expected = 0
    for name, (dims, _) in weight_specs(model_config).items():
        if name.endswith("embed_tokens.weight") or (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            continue
        expected += 4 * torch.Size(dims).numel()
    quant = QuantConfig(bits=8, group_size=32)
    h, inter, q, kv = 64, 96, 64, 2 * 16
    per_layer = (quantized_bytes(q + 2 * kv, h, quant) + quantized_bytes(h, q, quant)
                 + quantized_bytes(2 * inter, h, quant) + quantized_bytes(h, inter, quant))
    assert record["roofline"]["weight_bytes_per_step"] == expected + 2 * per_layer


def test_quantized_weights_compare_hf_on_the_float_original(tmp_path, monkeypatch) -> None:
    """--weights int8 --compare hf: trident runs the codes, transformers the float weights they came from (the
    same random tensors, not dequantized codes), in one run; the peer's row says so."""
    from trident.bench import peers

    loaded = []
    load = peers.load_hf_same_weights

    def spy(checkpoint, dtype, device):
        loaded.append(checkpoint)
        return load(checkpoint, dtype, device)

    monkeypatch.setattr(peers, "load_hf_same_weights", spy)
    hf_config = dict(TINY_SHAPES["llama3-scaled"])
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(hf_config))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", str(config_path), "--prompt-len", "16", "--output-len", "4",
                 "--repeat", "1", "--device", "cpu", "--dtype", "float32", "--weights", "int8", "--compare", "hf",
                 "--json", str(out)]) == 0
    (checkpoint,) = loaded
    assert checkpoint.quantization is None
    expected = random_checkpoint(Shape("tiny", hf_config, "test"), device="cpu", dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(checkpoint.tensors[name], expected.tensors[name])
    ours, theirs = json.loads(out.read_text())["results"]
    assert "int8 per channel" in ours["engine"] and "float weights" in theirs["engine"]
    assert theirs.get("error") is None and theirs["decode_tok_s"] > 0


@pytest.mark.parametrize("per_expert", [False, True], ids=["fused", "per-expert"])
def test_int8_quantizes_the_routed_experts(per_expert: bool) -> None:
    """--weights int8 on an MoE checkpoint: each sparse layer's experts become int8 codes and per-row scales within
    half a step of the float weights, from fused tensors or from per-expert matrices (Mixtral's
    block_sparse_moe.experts.{e}.w1 / w3 / w2, stacked); dense layers' MLPs stay Linear layers; int4 makes them
    int4 codes in groups along K."""
    from trident.moe.quant import EXPERT_TENSORS, dequantize_experts

    shape = Shape("t", dict(TINY_SHAPES["mixtral-window" if per_expert else "qwen2-moe-shared"]), "test")
    source = random_checkpoint(shape, device="cpu", dtype=torch.float32, seed=2)
    layers = (0, 1) if per_expert else (1,)  # qwen2-moe-shared's layer 0 is dense (mlp_only_layers)
    fused = {i: (source.tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"],
                 source.tensors[f"model.layers.{i}.mlp.experts.down_proj"]) for i in layers}
    if per_expert:
        tensors = dict(source.tensors)
        for i in layers:
            gate_up, down = (tensors.pop(f"model.layers.{i}.mlp.experts.{t}") for t in ("gate_up_proj", "down_proj"))
            inter = down.shape[2]
            for e in range(gate_up.shape[0]):
                prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
                tensors[f"{prefix}.w1.weight"], tensors[f"{prefix}.w3.weight"] = gate_up[e].split(inter)
                tensors[f"{prefix}.w2.weight"] = down[e]
        source = dataclasses.replace(source, tensors=tensors, tensor_types={})
    quantized = quantize_checkpoint(source, QuantConfig(bits=8))
    assert quantized.quantization.experts == tuple(f"model.layers.{i}.mlp.experts" for i in layers)
    assert not any(".experts." in n and not n.endswith(EXPERT_TENSORS) for n in quantized.tensors)
    for i, weights in fused.items():
        name = f"model.layers.{i}.mlp.experts"
        stored = [quantized.tensors[f"{name}.{kind}"] for kind in EXPERT_TENSORS]
        for (codes, scales), w in zip((stored[:2], stored[2:]), weights):
            assert codes.dtype == torch.int8 and scales.dtype == torch.float32
            err = (dequantize_experts(codes, scales, torch.float64) - w.double()).abs()
            assert (err <= scales.double()[..., None] / 2 * (1 + 1e-6)).all()
    if not per_expert:
        assert "model.layers.0.mlp.gate_up_proj" in quantized.quantization.modules
        int4 = quantize_checkpoint(source, QuantConfig(bits=4))  # per channel: the shared expert's K = 48
        assert int4.quantization.experts == ("model.layers.1.mlp.experts",)
        codes, scales = (int4.tensors[f"model.layers.1.mlp.experts.{kind}"] for kind in EXPERT_TENSORS[:2])
        assert codes.dtype == torch.uint8 and scales.shape == (*codes.shape[:2], 1)
        err = (dequantize_experts(codes, scales, torch.float64) - fused[1][0].double()).abs()
        assert (err <= scales.double() / 2 * (1 + 1e-6)).all()


def test_bench_latency_with_int8_weights_and_int4_experts(tmp_path) -> None:
    """--weights int8 --expert-weights int4 --group-size 32 on an MoE shape: int8 g32 Linear layers, int4 g32
    experts; the row says both, the record keeps the experts' format, and the roofline's expert bytes are int4 codes
    (half a byte a weight) and one float32 scale per group of 32."""
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(TINY_SHAPES["mixtral-window"]))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", str(config_path), "--prompt-len", "16", "--output-len", "4",
                 "--repeat", "1", "--device", "cpu", "--dtype", "float32", "--weights", "int8", "--group-size", "32",
                 "--expert-weights", "int4", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["weights"] == "int8" and record["expert_weights"] == "int4"
    assert (record["quantization"]["bits"], record["quantization"]["group_size"]) == (8, 32)
    assert record["quantization"]["experts"] == {"bits": 4, "group_size": 32, "modules": 2}
    (row,) = record["results"]
    assert "int8 g32 weights, int4 g32 experts" in row["engine"] and row["decode_tok_s"] > 0
    layers, experts, hidden, inter = 2, 4, 64, 96
    codes = layers * experts * 3 * hidden * inter // 2
    scales = layers * experts * (2 * inter * hidden + hidden * inter) // 32 * 4
    assert record["roofline"]["expert_bytes"] == codes + scales


def test_bench_latency_with_int8_experts_counts_codes_and_scales(tmp_path) -> None:
    """An MoE shape with --weights int8 runs with int8 experts; the roofline's expert bytes are their codes and
    scales (1 byte per weight, 4 per row)."""
    hf_config = dict(TINY_SHAPES["mixtral-window"])
    config_path = tmp_path / "tiny" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(hf_config))
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--shape", str(config_path), "--prompt-len", "16", "--output-len", "4",
                 "--repeat", "1", "--device", "cpu", "--dtype", "float32", "--weights", "int8",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["decode_tok_s"] > 0
    layers, experts, hidden, inter = 2, 4, 64, 96  # mixtral's experts are intermediate_size wide
    codes = layers * experts * 3 * hidden * inter
    scales = layers * experts * (2 * inter + hidden) * 4
    assert record["roofline"]["expert_bytes"] == codes + scales


@pytest.mark.parametrize(("name", "weights", "group", "dtype", "expert_weights"), [
    ("qwen2-moe-shared", "int8", None, torch.float32, None),
    ("qwen2-moe-shared", "int4", 0, torch.bfloat16, None),  # per channel: K = 48 (the shared expert): no CPU kernel
    ("qwen2-moe-shared", "int8", 0, torch.float32, "int4"),
    ("mixtral-window", "int8", 32, torch.bfloat16, "int4"),
    ("llama3-scaled", "int4", 32, torch.bfloat16, None),
    ("llama3-scaled", "int8", 32, torch.float32, None),
])
def test_estimate_from_the_plan_equals_the_engine(name: str, weights: str, group: int | None, dtype: torch.dtype,
                                                  expert_weights: str | None) -> None:
    """What the memory estimate sees before loading (the config and quantization_plan: no tensor) is what an engine
    of the quantized checkpoint holds once every product has run: int8 or int4 experts (their own format beside
    int8 layers too) as codes and scales, the CPU kernels' layouts of the quantized layers."""
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.engine.request import SamplingParams
    from trident.engine.sizing import estimate_memory
    from trident.models.build import meta_model

    shape = Shape("t", dict(TINY_SHAPES[name]), "test")
    experts_config = bench_experts_config(weights, expert_weights, group)
    quantized = quantize_checkpoint(random_checkpoint(shape, device="cpu", dtype=torch.float32, seed=3),
                                    bench_quant_config(weights, group), experts_config=experts_config)
    plan = quantization_plan(meta_model(quantized.config), quantized.quantization.config,
                             experts_config=experts_config)
    assert plan == quantized.quantization and bool(plan.experts) == (name != "llama3-scaled")
    assert (expert_weights is None) == (plan.experts_config is None)
    config = engine_config(None, dtype=str(dtype).removeprefix("torch."), num_blocks=4, max_model_len=64)
    engine = LLMEngine(config, quantized)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    estimate = estimate_memory(quantized.config, config, plan)
    used = engine.memory_usage()
    assert estimate.kv_cache_bytes == used.kv_cache_bytes
    assert 0 <= used.weights_bytes - estimate.weights_bytes <= 1024, (used, estimate)  # + the rotary table


def test_sizing_counts_int4_experts_bytes() -> None:
    """weights_bytes of an int8 plan with int4 g32 experts is the int8 plan's less, per experts tensor, the
    difference between int8-per-channel and int4-g32 codes and scales."""
    from trident.engine.sizing import weights_bytes
    from trident.models.build import meta_model
    from trident.moe.quant import quantized_experts_bytes

    model_config = ModelConfig.from_hf_dict(dict(TINY_SHAPES["mixtral-window"]))
    model = meta_model(model_config)
    int8 = quantization_plan(model, QuantConfig(bits=8))
    mixed = quantization_plan(model, QuantConfig(bits=8), experts_config=QuantConfig(bits=4, group_size=32))
    assert mixed.experts == int8.experts and len(mixed.experts) == 2
    saved = sum(quantized_experts_bytes(*m.shape, 8, None) - quantized_experts_bytes(*m.shape, 4, 32)
                for name in mixed.experts
                for m in (model.get_submodule(name).gate_up_proj, model.get_submodule(name).down_proj))
    assert saved == 2 * 4 * 3 * 64 * 96 // 2 + 2 * 4 * 4 * (2 * 96 + 64) - 2 * 4 * 4 * (2 * 96 * 2 + 64 * 3)
    assert weights_bytes(model_config, torch.float32, int8) - weights_bytes(model_config, torch.float32, mixed) == saved
