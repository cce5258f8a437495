"""Mixed 4/8-bit quantization: the greedy choice under the average-bits budget, sensitivities (with and without
replaying the layers before the measured one), and `trident quantize --bits mixed` end to end on a tiny Llama
with one module made sensitive (the budget checked from the stored tensors' bytes, the folder's round trip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trident.attention.registry import create_backend
from trident.cli import main
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.models.build import build_model
from trident.quant.format import QuantizedModules, save_quantized
from trident.quant.kv import kv_cache_format
from trident.quant.linear import QuantizedLinear, quantize_model
from trident.quant.mixed import MixedConfig, Unit, choose_bits
from trident.quant.rtn import QuantConfig

LOW = QuantConfig(bits=4, group_size=32)
HIGH = QuantConfig(bits=8)
SENSITIVE = "model.layers.0.mlp.down_proj"
"""The module given outliers: one weight of 3.0 (20 standard deviations) in every group of 32 of every row, so that
int4 rounds most of its other weights to zero."""
CPU = torch.device("cpu")


def _build(checkpoint):
    return build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=CPU,
                       backend=create_backend("torch", CPU), quantization=checkpoint.quantization)


def _logits(model) -> torch.Tensor:
    """Prefill logits of one 40-token sequence through the paged KV cache."""
    runner = ModelRunner(model, backend=create_backend("torch", CPU), num_blocks=8, block_size=16,
                         kv_format=kv_cache_format("auto", torch.float32), device=CPU,
                         sampler=Sampler(device=CPU), max_num_seqs=1)
    chunk = ScheduledChunk(seq_id=0, token_ids=tuple((7 * i + 3) % 256 for i in range(40)), start_pos=0,
                           block_table=(0, 1, 2), sample=True, params=SamplingParams(temperature=0.0))
    input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=(chunk,)))
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, runner.kv_caches, meta)).float()


def _bits(n: int, k: int, config: QuantConfig) -> int:
    """Stored bits, from the layout's definition: codes, one float32 scale and (asymmetric) one uint8 zero point
    per group."""
    groups = k // (config.group_size or k)
    return n * k * config.bits + n * groups * (32 + (0 if config.symmetric else 8))


def test_equal_units_keep_the_most_sensitive_at_int8() -> None:
    sensitivities = [0.3, -0.1, 2.0, 0.7, 0.05, 1.1, 0.0, 0.4]
    units = [Unit(f"m{i}", 64, 128, s) for i, s in enumerate(sensitivities)]
    low, high = _bits(64, 128, LOW), _bits(64, 128, HIGH)
    budget = (len(units) * low + 3 * (high - low) + 100) / (len(units) * 64 * 128)  # room for 3 units at int8
    plan = choose_bits(units, MixedConfig(budget, LOW, HIGH))
    assert plan.high_units == {"m2", "m5", "m3"}
    assert plan.average_bits == (5 * low + 3 * high) / (8 * 64 * 128) <= budget
    assert plan.module_configs == {"m2": HIGH, "m5": HIGH, "m3": HIGH}


def test_uneven_units_fit_the_budget_and_leave_no_room() -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 64), (128, 64), (256, 64), (64, 128), (32, 96), (96, 32)] * 3
    units = [Unit(f"m{i}", n, k, float(torch.rand((), generator=gen))) for i, (n, k) in enumerate(shapes)]
    weights = sum(n * k for n, k in shapes)
    for budget in (5.2, 6.0, 7.1):
        plan = choose_bits(units, MixedConfig(budget, LOW, HIGH))
        total = sum(_bits(u.out_features, u.in_features, HIGH if u.name in plan.high_units else LOW) for u in units)
        assert plan.average_bits == total / weights <= budget
        room = budget * weights - total
        assert all(_bits(u.out_features, u.in_features, HIGH) - _bits(u.out_features, u.in_features, LOW) > room
                   for u in units if u.name not in plan.high_units)
        assert plan.min_average_bits == sum(_bits(n, k, LOW) for n, k in shapes) / weights
    everything = choose_bits(units, MixedConfig(plan.max_average_bits, LOW, HIGH))
    assert len(everything.high_units) == len(units)


@pytest.mark.parametrize("budget, message", [(4.9, "below the all-int4 cost"), (8.6, "above the all-int8 cost")])
def test_budget_out_of_range_is_a_clear_error(budget: float, message: str) -> None:
    units = [Unit("a", 64, 64, 1.0), Unit("b", 64, 128, 2.0)]
    with pytest.raises(TridentError, match=message):  # int4 g32 symmetric: 5.0 bits; int8 per channel: 8.33
        choose_bits(units, MixedConfig(budget, LOW, HIGH))


def test_replaying_earlier_layers_gives_the_same_sensitivities(tiny_llama_dir) -> None:
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.quant.linear import eligible_modules, replace_module
    from trident.quant.mixed import decoder_layer_names, measure_sensitivities

    engine = LLMEngine(engine_config(str(tiny_llama_dir), dtype="float32", num_blocks=32))
    ids = [(7 * i + 3) % 256 for i in range(100)]
    config = PerplexityConfig(window=32, batch_windows=1)  # three forwards per loss: the replay goes call by call
    names = eligible_modules(engine.model, LOW)
    layers = decoder_layer_names(engine.model)
    assert layers == ["model.layers.0", "model.layers.1"]
    baseline, full = measure_sensitivities(engine.model, names, LOW, lambda: perplexity(engine, ids, config).nll)
    again, replayed = measure_sensitivities(engine.model, names, LOW, lambda: perplexity(engine, ids, config).nll,
                                            layers=layers)
    assert again == baseline == perplexity(engine, ids, config).nll  # every module put back
    assert [u.name for u in full] == names == [u.name for u in replayed]
    for a, b in zip(full, replayed):
        assert abs(a.sensitivity - b.sensitivity) < 1e-9, (a, b)
    assert all(isinstance(engine.model.get_submodule(layer), torch.nn.Module) for layer in layers)
    assert not any(isinstance(m, QuantizedLinear) for m in engine.model.modules())
    # one module alone at int4, measured by hand
    layer = engine.model.get_submodule(names[5])
    replace_module(engine.model, names[5], QuantizedLinear.from_linear(layer, LOW))
    assert abs(perplexity(engine, ids, config).nll - baseline - full[5].sensitivity) < 1e-9


@pytest.fixture(scope="module")
def sensitive_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """tiny_llama_dir's model (same seed) with outliers in SENSITIVE."""
    from hf_tiny import make_hf_model, tiny_llama_config

    model = make_hf_model(tiny_llama_config(vocab_size=256, max_position_embeddings=256), seed=11)
    with torch.no_grad():
        model.get_submodule(SENSITIVE).weight[:, ::32] = 3.0
    path = tmp_path_factory.mktemp("tiny-llama-sensitive")
    model.save_pretrained(path)
    shutil.copyfile(tiny_llama_dir / "tokenizer.json", path / "tokenizer.json")
    return path


def _shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of every decoder-layer Linear of a Llama, from its config alone."""
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    head_dim = hidden // hf_config["num_attention_heads"]
    qkv = (hf_config["num_attention_heads"] + 2 * hf_config["num_key_value_heads"]) * head_dim
    per_layer = {"self_attn.qkv_proj": (qkv, hidden), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_up_proj": (2 * inter, hidden), "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{m}": shape for i in range(hf_config["num_hidden_layers"])
            for m, shape in per_layer.items()}


def _sensitivities(path: Path) -> tuple[list[Unit], dict[str, tuple[int, int]]]:
    """Each module's sensitivity on 256 tokens sampled from the float model itself (seeded): on its own samples the
    expected rise of the NLL is the KL divergence from the float model, never negative, so a random model's
    sensitivities mean something."""
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.quant.linear import eligible_modules
    from trident.quant.mixed import decoder_layer_names, measure_sensitivities

    engine = LLMEngine(engine_config(str(path), dtype="float32", num_blocks=64))
    requests = [engine.add_request([65 + seed], SamplingParams(max_tokens=63, temperature=1.0, ignore_eos=True,
                                                                seed=seed)) for seed in range(4)]
    samples = {}
    while engine.has_unfinished():
        samples.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    ids = [t for seed, request in enumerate(requests) for t in [65 + seed, *samples[request]]]
    assert len(ids) == 256
    config = PerplexityConfig(window=64)
    names = eligible_modules(engine.model, LOW)
    _, units = measure_sensitivities(engine.model, names, LOW, lambda: perplexity(engine, ids, config).nll,
                                     layers=decoder_layer_names(engine.model))
    return units, _shapes(load_checkpoint(str(path)).hf_config)


def test_a_module_given_outliers_is_the_one_kept_at_int8(tiny_llama_dir, sensitive_llama_dir) -> None:
    plans = {}
    for which, path in (("original", tiny_llama_dir), ("outliers", sensitive_llama_dir)):
        units, shapes = _sensitivities(path)
        assert [u.name for u in units] == list(shapes)
        weights = sum(n * k for n, k in shapes.values())
        # room for SENSITIVE at int8 and for nothing more once it is there (every other extra is larger than what
        # is left), so any module taken before it would leave it out
        extra = {name: _bits(*s, HIGH) - _bits(*s, LOW) for name, s in shapes.items()}
        assert min(extra.values()) > 100
        budget = (sum(_bits(*s, LOW) for s in shapes.values()) + extra[SENSITIVE] + 100) / weights
        plans[which] = choose_bits(units, MixedConfig(budget, LOW, HIGH))
        top = max(units, key=lambda u: u.sensitivity / extra[u.name])
        assert (top.name == SENSITIVE) == (which == "outliers"), units
    assert plans["outliers"].high_units == {SENSITIVE}
    assert SENSITIVE not in plans["original"].high_units


def test_cli_meets_the_budget_and_the_folder_round_trips(tiny_llama_dir, tmp_path, capsys) -> None:
    source = load_checkpoint(str(tiny_llama_dir))
    shapes = _shapes(source.hf_config)
    weights = sum(n * k for n, k in shapes.values())
    budget = 6.0
    calib = tmp_path / "calib.txt"
    calib.write_text("It was the best of times, it was the worst of times; the quick brown fox. " * 6, "utf-8")
    out, report_file = tmp_path / "mixed", tmp_path / "mixed.json"
    code = main(["quantize", str(tiny_llama_dir), "--bits", "mixed", "--avg-bits", str(budget), "--group-size", "32",
                 "--calib", str(calib), "--calib-tokens", "200", "--out", str(out), "--json", str(report_file)])
    assert code == 0, capsys.readouterr().err
    assert "average bits per weight" in capsys.readouterr().out
    record = json.loads(report_file.read_text())
    assert record["calibration"]["tokens"] == 200
    units = [Unit(u["name"], u["out_features"], u["in_features"], u["sensitivity"]) for u in record["units"]]
    assert [u.name for u in units] == list(shapes)
    high = {u["name"] for u in record["units"] if u["bits"] == 8}
    assert high == choose_bits(units, MixedConfig(budget, LOW, HIGH)).high_units and 0 < len(high) < len(units)

    # the budget, from the stored tensors' bytes
    stored = load_file(str(out / "model.safetensors"))
    bits = sum(8 * t.numel() * t.element_size() for name, t in stored.items()
               if name.rpartition(".")[0] in shapes and name.rpartition(".")[2] in ("qweight", "scales", "zeros"))
    assert record["average_bits"] == pytest.approx(bits / weights, rel=1e-12) and bits / weights <= budget
    for name, (n, k) in shapes.items():
        qweight = stored[f"{name}.qweight"]
        assert (qweight.dtype, tuple(qweight.shape)) == ((torch.int8, (n, k)) if name in high
                                                         else (torch.uint8, (n, k // 2)))
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["quantization_config"]["module_configs"] == {
        name: {"bits": 8, "group_size": None, "symmetric": True} for name in shapes if name in high}

    # round trip: the folder's logits equal those of the source quantized in memory with the same choice
    loaded = load_checkpoint(str(out))
    assert loaded.quantization == QuantizedModules(LOW, tuple(shapes), {name: HIGH for name in high})
    assert loaded.quantized_average_bits() == pytest.approx(bits / weights, rel=1e-12)
    model = _build(source)
    quantize_model(model, LOW, module_configs={name: HIGH for name in high})
    rebuilt = _build(loaded)
    assert all(rebuilt.get_submodule(name).config == (HIGH if name in high else LOW) for name in shapes)
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_mixed_folder_memory_estimate_and_info(sensitive_llama_dir, tmp_path) -> None:
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.engine.sizing import estimate_memory
    from trident.loader.info import info_rows, model_info

    checkpoint = load_checkpoint(str(sensitive_llama_dir))
    model = _build(checkpoint)
    overrides = {"model.layers.0.self_attn.o_proj": HIGH, SENSITIVE: HIGH}
    report = quantize_model(model, LOW, module_configs=overrides)
    out = str(tmp_path / "mixed")
    save_quantized(model, checkpoint, QuantizedModules(LOW, tuple(report.names), overrides), out)
    loaded = load_checkpoint(out)
    engine_cfg = engine_config(out, dtype="float32", memory_budget_bytes=1 << 20)
    estimate = estimate_memory(loaded.config, engine_cfg, loaded.quantization)
    used = LLMEngine(engine_cfg, loaded).memory_usage()
    assert abs(used.weights_bytes - estimate.weights_bytes) <= 1024  # the rotary table buffer
    info = model_info(loaded)
    assert info.parameters == model_info(checkpoint).parameters
    shapes = _shapes(checkpoint.hf_config)
    average = sum(_bits(*s, overrides.get(name, LOW)) for name, s in shapes.items()) / sum(
        n * k for n, k in shapes.values())
    assert ("quantization", "mixed bits: 6 layers int4 round-to-nearest, groups of 32, symmetric; 2 layers int8 "
            f"round-to-nearest, per channel, symmetric; {average:.3f} bits per weight") in info_rows(info)


def test_cli_user_errors(tiny_llama_dir, tmp_path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(["quantize", str(tiny_llama_dir), *argv]) == 2
        return capsys.readouterr().err

    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text. " * 20, "utf-8")
    mixed = ["--bits", "mixed", "--group-size", "32", "--calib", str(calib)]
    assert "below the all-int4 cost" in error(*mixed, "--avg-bits", "4.9", "--out", str(tmp_path / "a"))
    assert "above the all-int8 cost" in error(*mixed, "--avg-bits", "9", "--out", str(tmp_path / "b"))
    assert "needs --avg-bits" in error("--bits", "mixed", "--calib", str(calib), "--out", str(tmp_path / "c"))
    assert "needs --avg-bits" in error("--bits", "mixed", "--avg-bits", "6", "--out", str(tmp_path / "d"))
    assert "only apply to --bits mixed" in error("--bits", "8", "--avg-bits", "6", "--out", str(tmp_path / "e"))
    assert "does not exist" in error("--bits", "mixed", "--avg-bits", "6", "--calib", str(tmp_path / "none.txt"),
                                     "--out", str(tmp_path / "f"))
    assert not any((tmp_path / d).exists() for d in "abcdef")


def test_malformed_module_configs_are_clear_errors(tiny_llama_dir, tmp_path) -> None:
    checkpoint = load_checkpoint(str(tiny_llama_dir))
    model = _build(checkpoint)
    report = quantize_model(model, LOW)
    out = tmp_path / "q"
    save_quantized(model, checkpoint, QuantizedModules(LOW, tuple(report.names)), str(out))
    hf_config = json.loads((out / "config.json").read_text())
    assert "module_configs" not in hf_config["quantization_config"]  # a uniform folder is written as before
    entry = hf_config["quantization_config"]
    for module_configs, message in [({"model.layers.9.mlp.down_proj": {"bits": 8, "group_size": None,
                                                                        "symmetric": True}}, "does not list"),
                                    ({report.names[0]: {"bits": 3, "group_size": None, "symmetric": True}},
                                     "bits must be one of"),
                                    ({report.names[0]: 8}, "must be an object"),
                                    ([report.names[0]], "must map module names")]:
        (out / "config.json").write_text(json.dumps({**hf_config, "quantization_config": {
            **entry, "module_configs": module_configs}}))
        with pytest.raises(TridentError, match=message):
            load_checkpoint(str(out))
    # a module stored as int4 but declared int8: the shape check names it
    (out / "config.json").write_text(json.dumps({**hf_config, "quantization_config": {
        **entry, "module_configs": {report.names[0]: {"bits": 8, "group_size": None, "symmetric": True}}}}))
    with pytest.raises(TridentError, match=f"{report.names[0]}.qweight is torch.uint8"):
        _build(load_checkpoint(str(out)))
