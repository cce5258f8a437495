"""Mixed 4/8 bits with GPTQ codes (`trident quantize --method gptq --bits mixed`) on a tiny Llama: the budget met
from the stored tensors, GPTQ's model closer to the float one than round-to-nearest's on the same layout, the
folder's round trip, per-module grids in gptq_model, and the flags that do not combine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_gptq import _prefill
from test_mixed import HIGH, LOW, _bits, _build, _logits, _shapes

from trident.cli import main
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.models.layers import Linear
from trident.quant.calibrate import gptq_model
from trident.quant.format import QuantizedModules
from trident.quant.gptq import relative_output_error
from trident.quant.gptq_config import GPTQConfig
from trident.quant.linear import QuantizedLinear, quantize_model
from trident.quant.mixed import MixedConfig, Unit, choose_bits

CALIB = "It was the best of times, it was the worst of times; it was the age of wisdom, the age of foolishness. " * 8
"""Calibration text (byte tokens): few distinct bytes, so the inputs of layer 0 are strongly correlated."""
BUDGET = 6.0
CALIB_TOKENS = ("--calib-samples", "4", "--calib-seq-len", "64")


HELD_OUT = "It was the spring of hope, it was the winter of despair; we had everything before us, we had nothing."


def _held_out_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(_prefill(model, tokens)).float()


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm((logits - reference).double()) / torch.linalg.norm(reference.double()))


@pytest.fixture(scope="module")
def gptq_mixed(tiny_llama_dir, tmp_path_factory):
    """(folder, JSON record) of `trident quantize --method gptq --bits mixed --act-order --sensitivity gptq` on the
    tiny Llama."""
    tmp = tmp_path_factory.mktemp("mixed-gptq")
    calib = tmp / "calib.txt"
    calib.write_text(CALIB, "utf-8")
    out, report_file = tmp / "mixed", tmp / "mixed.json"
    code = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "mixed", "--avg-bits", str(BUDGET),
                 "--group-size", "32", "--act-order", "--sensitivity", "gptq", "--calib", str(calib),
                 "--calib-tokens", "200", *CALIB_TOKENS,
                 "--out", str(out), "--json", str(report_file)])
    assert code == 0
    return out, json.loads(report_file.read_text())


def test_gptq_mixed_meets_the_budget_and_records_its_choice(tiny_llama_dir, gptq_mixed) -> None:
    out, record = gptq_mixed
    shapes = _shapes(load_checkpoint(str(tiny_llama_dir)).hf_config)
    weights = sum(n * k for n, k in shapes.values())
    assert record["method"] == "gptq" and record["sensitivity"] == "gptq"
    assert record["gptq"]["act_order"] is True and record["gptq_calibration"]["tokens"] == 256
    units = [Unit(u["name"], u["out_features"], u["in_features"], u["sensitivity"]) for u in record["units"]]
    assert [u.name for u in units] == list(shapes)
    high = {u["name"] for u in record["units"] if u["bits"] == 8}
    assert high == choose_bits(units, MixedConfig(BUDGET, LOW, HIGH)).high_units and 0 < len(high) < len(units)
    stored = load_file(str(out / "model.safetensors"))
    bits = sum(8 * t.numel() * t.element_size() for name, t in stored.items()
               if name.rpartition(".")[0] in shapes and name.rpartition(".")[2] in ("qweight", "scales", "zeros"))
    assert bits == sum(_bits(*shape, HIGH if name in high else LOW) for name, shape in shapes.items())
    assert record["average_bits"] == pytest.approx(bits / weights, rel=1e-12) and bits / weights <= BUDGET
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["method"] == "gptq"
    assert entry["module_configs"] == {name: {"bits": 8, "group_size": None, "symmetric": True}
                                       for name in shapes if name in high}
    from trident.loader.info import info_rows, model_info

    assert ("quantization", f"mixed bits: {len(shapes) - len(high)} layers int4 GPTQ, groups of 32, symmetric; "
            f"{len(high)} layers int8 GPTQ, per channel, symmetric; {bits / weights:.3f} bits per weight") in \
        info_rows(model_info(load_checkpoint(str(out))))
    # every module's GPTQ codes moved its outputs less than round-to-nearest's on its calibration inputs
    assert all(u["output_error"] < u["rtn_output_error"] for u in record["units"]), record["units"]


def test_gptq_mixed_beats_round_to_nearest_on_the_same_layout_and_round_trips(tiny_llama_dir, gptq_mixed) -> None:
    out, record = gptq_mixed
    high = {u["name"]: HIGH for u in record["units"] if u["bits"] == 8}
    source = load_checkpoint(str(tiny_llama_dir))
    loaded = load_checkpoint(str(out))
    assert loaded.quantization == QuantizedModules(LOW, tuple(_shapes(source.hf_config)), high, method="gptq")
    gptq = _build(loaded)
    assert all(gptq.get_submodule(name).config == high.get(name, LOW) for name in loaded.quantization.modules)
    rtn = _build(source)
    quantize_model(rtn, LOW, module_configs=high)
    # on text the calibration did not see, of the same kind (the inputs GPTQ compensates for are those of such text)
    held_out = torch.tensor(source.tokenizer.encode(HELD_OUT)[:96]).view(1, 96)
    reference = _held_out_logits(_build(source), held_out)
    gptq_error = _relative_error(_held_out_logits(gptq, held_out), reference)
    rtn_error = _relative_error(_held_out_logits(rtn, held_out), reference)
    # Deterministic (seeded model, fixed texts). Measured: GPTQ 0.160, RTN 0.266 (ratio 0.60); other held-out
    # sentences gave 0.44 (Dickens, reordered) and 0.77 (Moby-Dick's first lines: other bytes than the
    # calibration's). 0.8 leaves room for float rounding across platforms, not for GPTQ losing its advantage.
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)

    # round trip: the folder's logits equal those of the same GPTQ run in memory
    calib_ids = torch.tensor(source.tokenizer.encode(CALIB)[:256]).view(4, 64)
    model = _build(source)
    gptq_model(model, LOW, GPTQConfig(act_order=True), calib_ids, module_configs=high)
    assert torch.equal(_logits(model), _logits(gptq))


def test_gptq_model_quantizes_each_module_on_its_own_grid(tiny_llama_dir) -> None:
    """Per-module grids, sequential: layer 1's modules calibrate on the quantized layer 0's outputs. install: the
    model stays float and each module's codes come from the float model's inputs (layer 1's differ)."""
    source = load_checkpoint(str(tiny_llama_dir))
    tokens = torch.tensor(source.tokenizer.encode(CALIB)[:256]).view(4, 64)
    high = {"model.layers.0.mlp.down_proj": HIGH, "model.layers.1.self_attn.qkv_proj": HIGH}
    sequential = _build(source)
    report = gptq_model(sequential, LOW, GPTQConfig(), tokens, module_configs=high)
    for m in report.modules:
        config = high.get(m.name, LOW)
        assert sequential.get_submodule(m.name).config == config
        assert (m.bits, m.group_size, m.symmetric) == (config.bits, config.group_size, config.symmetric)
        assert m.output_error < m.rtn_output_error
    codes: dict = {}
    on_float = _build(source)
    float_report = gptq_model(on_float, LOW, GPTQConfig(), tokens, module_configs=high, install=codes.__setitem__)
    assert all(type(m) is Linear for name, m in on_float.named_modules() if name in codes)
    assert list(codes) == report.names == float_report.names
    assert all(isinstance(q, QuantizedLinear) and q.config == high.get(name, LOW) for name, q in codes.items())
    for name in report.names:  # layer 0 sees the same inputs either way, layer 1 does not
        same = torch.equal(codes[name].quantized.qweight, sequential.get_submodule(name).quantized.qweight)
        assert same == name.startswith("model.layers.0."), name
    # the float inputs' Hessian gives the output error the non-sequential run reported
    float_model = _build(source)
    with pytest.raises(TridentError, match="which the config does not quantize"):
        gptq_model(float_model, LOW, GPTQConfig(), tokens, module_configs={"lm_head": HIGH})
    layer = float_model.get_submodule("model.layers.1.mlp.down_proj")
    weight = layer.weight.detach().clone()
    rows = []
    hook = layer.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, 128)))
    _prefill(float_model, tokens)
    hook.remove()
    x = torch.cat(rows).double()
    reported = next(m for m in float_report.modules if m.name == "model.layers.1.mlp.down_proj")
    deq = codes["model.layers.1.mlp.down_proj"].dequantized_weight(torch.float64)
    assert relative_output_error(weight, deq, x.T @ x) == pytest.approx(reported.output_error, rel=1e-4)


def test_mixed_flags_that_do_not_combine_are_clear_errors(tiny_llama_dir, tmp_path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *argv]) == 2
        return capsys.readouterr().err

    mixed = ("--bits", "mixed", "--avg-bits", "6", "--calib", "kjv")
    assert "needs --method gptq" in error(*mixed, "--sensitivity", "gptq")
    assert "--act-order only apply to --method gptq" in error(*mixed, "--act-order")
    assert "--sensitivity only apply to --bits mixed" in error("--bits", "4", "--sensitivity", "rtn")
    assert "--method gptq needs calibration text" in error("--method", "gptq", "--bits", "mixed", "--avg-bits", "6")
    assert not (tmp_path / "q").exists()


def test_gptq_mixed_measures_with_round_to_nearest_codes_by_default(tiny_llama_dir, gptq_mixed, tmp_path) -> None:
    """Without --sensitivity, the sensitivities are round-to-nearest's (those `--method rtn --bits mixed` measures
    on the same tokens) and the layout they choose is quantized by GPTQ."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB, "utf-8")
    records = {}
    for method in ("gptq", "rtn"):
        report_file = tmp_path / f"{method}.json"
        assert main(["quantize", str(tiny_llama_dir), "--method", method, "--bits", "mixed", "--avg-bits", str(BUDGET),
                     "--group-size", "32", "--calib", str(calib), "--calib-tokens", "200",
                     *(CALIB_TOKENS if method == "gptq" else ()), "--out", str(tmp_path / method),
                     "--json", str(report_file)]) == 0
        records[method] = json.loads(report_file.read_text())
    gptq, rtn = records["gptq"], records["rtn"]
    assert gptq["sensitivity"] == rtn["sensitivity"] == "rtn" and gptq["method"] == "gptq"
    assert [(u["name"], u["sensitivity"], u["bits"]) for u in gptq["units"]] == \
        [(u["name"], u["sensitivity"], u["bits"]) for u in rtn["units"]]
    # GPTQ's sensitivities differ (other codes), so the default is not the fixture's measurement
    assert [u["sensitivity"] for u in gptq["units"]] != [u["sensitivity"] for u in gptq_mixed[1]["units"]]
    assert load_checkpoint(str(tmp_path / "gptq")).quantization.method == "gptq"
    assert all(u["output_error"] < u["rtn_output_error"] for u in gptq["units"])
