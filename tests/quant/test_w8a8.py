"""W8A8 on the CPU: per-token quantization, the torch._int_mm product and the dequantizing reference against
float64 (bounds in w8a8_checks.py); SmoothQuant's migration leaves a tiny Llama's and Gemma's function unchanged in
float64 and lowers W8A8's error when an activation channel is an outlier; the trident-w8a8 folder's round trip
(save, load, bit-identical logits) through the API and `trident quantize`."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_hf_model, tiny_hf_configs, trident_config
from test_quantized_model import _build, _logits, _relative_diff
from w8a8_checks import assert_product_matches, assert_quantized_rows, assert_w8a8_within_bound

from trident.attention.registry import create_backend
from trident.cli import main
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.models.build import build_model
from trident.models.layers import Linear
from trident.quant.calibrate import run_calibration
from trident.quant.format import W8A8_METHOD, W8A8_WEIGHTS, QuantizedModules, save_quantized
from trident.quant.linear import num_weights
from trident.quant.rtn import QuantConfig, quantize
from trident.quant.smoothquant import (
    SmoothConfig,
    activation_maxima,
    changed_source_tensors,
    migrate,
    migrated_linears,
    norm_inputs,
)
from trident.quant.w8a8 import (
    W8A8Linear,
    int_mm_product,
    quantize_model_w8a8,
    quantize_per_token,
    w8a8_matmul_reference,
)

CPU = torch.device("cpu")
NORMS = {"llama": "post_attention_layernorm", "llama-mlp-bias": "post_attention_layernorm",
         "gemma2": "pre_feedforward_layernorm"}
"""The norm that feeds gate_up_proj."""


def _x(m: int, k: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=g) * 10 ** (torch.rand(m, 1, generator=g) * 3 - 2)
    x[:, ::7] *= 30  # outlier channels
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_quantize_per_token_against_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = _x(9, 77, dtype, g)
    x[4] = 0
    codes, scales = quantize_per_token(x)
    assert_quantized_rows(codes, scales, x, str(dtype))
    assert scales[4] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_products_against_float64(dtype: torch.dtype) -> None:
    """torch._int_mm's product and the dequantizing reference on odd shapes, with and without bias."""
    for m, n, k in ((1, 37, 77), (3, 129, 200), (17, 45, 31), (64, 70, 576)):
        g = torch.Generator().manual_seed(m + n + k)
        x_codes = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w_codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        x_scales, w_scales = 10 ** (torch.rand(m, generator=g) * 3 - 4), 10 ** (torch.rand(n, generator=g) * 2 - 4)
        for bias in (None, torch.randn(n, generator=g).to(dtype)):
            what = f"M={m} N={n} K={k} {dtype} bias={bias is not None}"
            for product in (int_mm_product, w8a8_matmul_reference):
                y = product(x_codes, x_scales, w_codes, w_scales, bias, dtype)
                assert_product_matches(y, x_codes, x_scales, w_codes, w_scales, bias, dtype,
                                       f"{product.__name__} {what}", float_sums=product is w8a8_matmul_reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_w8a8_linear_within_the_bound(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    layer = Linear(200, 43, bias=True)
    layer.weight.data = (torch.randn(43, 200, generator=g) * 0.05).to(dtype)
    layer.bias.data = torch.randn(43, generator=g).to(dtype)
    qlayer = W8A8Linear.from_linear(layer)
    assert torch.equal(qlayer.qweight, quantize(layer.weight, QuantConfig(bits=8)).qweight)
    for rows in (1, 5, 40):
        x = _x(rows, 200, dtype, g).reshape(1, rows, 200)
        y = qlayer(x)
        assert y.shape == (1, rows, 43) and y.dtype == dtype
        assert_w8a8_within_bound(y[0], x[0], layer.weight, qlayer.scales, layer.bias, f"{dtype} rows={rows}")


def test_w8a8_linear_refuses_other_weight_layouts() -> None:
    q = quantize(torch.randn(8, 64), QuantConfig(bits=4, group_size=32))
    with pytest.raises(TridentError, match="W8A8 weights are int8 per channel"):
        W8A8Linear(64, 8, QuantConfig(bits=4, group_size=32), q)


def _float64_model(name: str):
    hf_config = tiny_hf_configs()["llama"] if name == "llama-mlp-bias" else tiny_hf_configs()[name]
    if name == "llama-mlp-bias":
        hf_config.mlp_bias = True
    model = build_model(trident_config(hf_config), make_hf_model(hf_config).state_dict(), dtype=torch.float64,
                        device=CPU, backend=create_backend("torch", CPU))
    return model, hf_config.vocab_size


def _calibrate(model, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (3, 24), generator=torch.Generator().manual_seed(seed))
    return activation_maxima(model, migrated_linears(model, SmoothConfig()),
                             lambda: run_calibration(model, tokens, batch_size=2))


@pytest.mark.parametrize(("name", "tolerance"), [("llama", 1e-12), ("llama-mlp-bias", 1e-12), ("gemma2", 1e-5)])
def test_migration_keeps_the_function_in_float64(name: str, tolerance: float) -> None:
    """Norm weights (or gate_up_proj's up rows and bias) divided by s and weight columns multiplied by s: the
    float64 logits are unchanged (to 1e-12 of their range), while the weights really moved (s far from 1).
    Gemma's norms multiply by (1 + g) in float32 whatever the model's dtype (its reference numerics), so there the
    migrated (1 + g) / s is rounded to float32: 1e-5 (measured 3.5e-7), where a wrong formula (g / s) moves the
    logits by order 1."""
    model, vocab = _float64_model(name)
    tokens = [(5 * i + 2) % vocab for i in range(30)]
    before = _logits(model, tokens).double()
    weight_before = model.model.layers[0].self_attn.qkv_proj.weight.clone()
    pairs = migrate(model, _calibrate(model, vocab), SmoothConfig(alpha=0.5))
    layers = range(len(model.model.layers))
    assert [p.linear for p in pairs] == [f"model.layers.{i}.{m}" for i in layers
                                         for m in ("self_attn.qkv_proj", "mlp.gate_up_proj")] + [
        f"model.layers.{i}.mlp.down_proj" for i in layers]
    changed = changed_source_tensors(model, pairs)
    gate_up = model.model.layers[1].mlp.gate_up_proj
    assert torch.equal(changed["model.layers.1.post_attention_layernorm.weight" if "llama" in name
                               else "model.layers.1.pre_feedforward_layernorm.weight"].double(),
                       model.model.layers[1].get_submodule(NORMS[name]).weight.float().double())
    assert ("model.layers.1.mlp.up_proj.bias" in changed) == (name == "llama-mlp-bias")
    if name == "llama-mlp-bias":
        assert torch.equal(changed["model.layers.1.mlp.up_proj.bias"], gate_up.bias[96:].float())
    assert max(float((p.scales.log().abs()).max()) for p in pairs) > 0.5
    assert not torch.allclose(model.model.layers[0].self_attn.qkv_proj.weight, weight_before)
    after = _logits(model, tokens).double()
    assert _relative_diff(after, before) < tolerance


def test_migration_evens_an_outlier_channel_and_lowers_the_w8a8_error(tiny_llama_dir) -> None:
    """A channel of every norm made 40x larger (its weight column 40x smaller: the same function) is an activation
    outlier that per-token int8 rounding suffers from; SmoothQuant's migration brings its input ranges back within
    a few x of the median and the W8A8 logits closer to the float ones than without migration."""
    checkpoint = load_checkpoint(str(tiny_llama_dir))
    reference = _build(checkpoint)
    with torch.no_grad():
        for norm_name, linear_name in norm_inputs(reference):
            reference.get_submodule(norm_name).weight[5] *= 40
            reference.get_submodule(linear_name).weight[:, 5] /= 40
    float_logits = _logits(reference)
    errors = {}
    for smoothed in (False, True):
        model = _build(checkpoint)
        model.load_state_dict(reference.state_dict())
        if smoothed:
            pairs = migrate(model, _calibrate(model, 256), SmoothConfig())
            assert all(p.activation_spread_before > 20 > 4 > p.activation_spread_after for p in pairs
                       if p.kind == "norm"), pairs
        quantize_model_w8a8(model)
        errors[smoothed] = _relative_diff(_logits(model), float_logits)
    assert errors[True] < 0.5 * errors[False], errors


def test_unsupported_layers_and_bad_alpha_are_clear_errors() -> None:
    with pytest.raises(TridentError, match="no decoder layers"):
        norm_inputs(torch.nn.Linear(2, 2))
    with pytest.raises(TridentError, match=r"--smooth-alpha must be a number in \[0, 1\]"):
        SmoothConfig(alpha=1.5)


def test_malformed_w8a8_configs_are_clear_errors() -> None:
    from trident.quant.format import read_quantization_config

    entry = {"quant_method": "trident-w8a8", "bits": 8, "group_size": None, "symmetric": True, "modules": ["m"]}
    assert read_quantization_config({"quantization_config": entry}).quant_method == "trident-w8a8"
    for change, message in (({"bits": 4}, "stores every module as int8 per channel"),
                            ({"method": "gptq"}, "method 'gptq' is not one of rtn, smoothquant"),
                            ({"method": "smoothquant"}, "smooth_alpha must be a number exactly when"),
                            ({"smooth_alpha": 0.5}, "smooth_alpha must be a number exactly when")):
        with pytest.raises(TridentError, match=message):
            read_quantization_config({"quantization_config": {**entry, **change}})


def test_round_trip_is_bit_identical(tiny_llama_dir, tmp_path) -> None:
    """Migrate, quantize, save (the migrated norms in place of the originals), load: the same logits exactly."""
    checkpoint = load_checkpoint(str(tiny_llama_dir))
    model = _build(checkpoint)
    pairs = migrate(model, _calibrate(model, 256), SmoothConfig(alpha=0.6))
    report = quantize_model_w8a8(model)
    assert isinstance(model.model.layers[1].mlp.down_proj, W8A8Linear) and isinstance(model.lm_head, Linear)
    modules = QuantizedModules(W8A8_WEIGHTS, tuple(report.names), method="smoothquant", quant_method=W8A8_METHOD,
                               smooth_alpha=0.6)
    save_quantized(model, checkpoint, modules, str(tmp_path / "q"), changed_source_tensors(model, pairs))
    entry = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert entry == {"quant_method": "trident-w8a8", "bits": 8, "group_size": None, "symmetric": True,
                     "method": "smoothquant", "smooth_alpha": 0.6, "modules": report.names}
    loaded = load_checkpoint(str(tmp_path / "q"))
    assert loaded.quantization == modules
    assert torch.equal(loaded.tensors["model.layers.0.input_layernorm.weight"],
                       model.model.layers[0].input_layernorm.weight)
    rebuilt = _build(loaded)
    assert isinstance(rebuilt.model.layers[0].self_attn.qkv_proj, W8A8Linear)
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_folder_through_the_engine_sizing_and_info(tiny_llama_dir, tmp_path) -> None:
    """The engine (generate / serve / eval's path) loads a W8A8 folder: its memory estimate matches what it
    allocates, `trident info` describes it."""
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.engine.sizing import estimate_memory
    from trident.loader.info import info_rows, model_info

    checkpoint = load_checkpoint(str(tiny_llama_dir))
    model = _build(checkpoint)
    report = quantize_model_w8a8(model)
    out = str(tmp_path / "w8a8")
    save_quantized(model, checkpoint, QuantizedModules(W8A8_WEIGHTS, tuple(report.names), quant_method=W8A8_METHOD),
                   out)
    loaded = load_checkpoint(out)
    engine_cfg = engine_config(out, dtype="float32", memory_budget_bytes=1 << 20)
    engine = LLMEngine(engine_cfg, loaded)
    assert isinstance(engine.model.model.layers[1].mlp.gate_up_proj, W8A8Linear)
    estimate = estimate_memory(loaded.config, engine_cfg, loaded.quantization)
    assert abs(engine.memory_usage().weights_bytes - estimate.weights_bytes) <= 1024  # the rotary table buffer
    info = model_info(loaded)
    assert info.parameters == model_info(checkpoint).parameters == num_weights(engine.model)
    assert ("quantization", "W8A8: int8 per-channel weights x int8 per-token activations (no migration), 8 layers"
            ) in info_rows(info)


def test_quantize_cli_smoothquant_and_w8a8(tiny_llama_dir, tmp_path, capsys) -> None:
    """Both methods through `trident quantize`: folders that load as W8A8 and whose logits stay near the float
    model's; the flags they cannot take are refused with the fix."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    float_logits = _logits(_build(load_checkpoint(str(tiny_llama_dir))))
    for method, extra in (("smoothquant", ["--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "64"]),
                          ("w8a8", [])):
        out = tmp_path / method
        assert main(["quantize", str(tiny_llama_dir), "--method", method, "--bits", "8", *extra, "--out", str(out),
                     "--json", str(tmp_path / f"{method}.json")]) == 0
        loaded = load_checkpoint(str(out))
        assert loaded.quantization.quant_method == "trident-w8a8"
        assert loaded.quantization.smooth_alpha == (0.5 if method == "smoothquant" else None)
        record = json.loads((tmp_path / f"{method}.json").read_text())
        assert record["params_quantized"] == 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64)
        assert _relative_diff(_logits(_build(loaded)), float_logits) < 0.1
    for args, message in ((["--method", "smoothquant", "--bits", "8"], "needs calibration text"),
                          (["--method", "w8a8", "--bits", "4"], "use --bits 8"),
                          (["--method", "w8a8", "--bits", "8", "--group-size", "64"], "drop --group-size"),
                          (["--method", "w8a8", "--bits", "8", "--smooth-alpha", "0.3"], "drop --smooth-alpha"),
                          (["--bits", "8", "--smooth-alpha", "0.3"], "--method smoothquant only")):
        assert main(["quantize", str(tiny_llama_dir), *args, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_w8a8_decode_graph_replays_match_eager(name: str) -> None:
    """W8A8 layers (both Triton kernels per projection) inside CUDA-graph replays of decode steps, a padded bucket
    among them, give the eager forward's hidden states (tests/models/test_cuda_graph_models.py)."""
    from test_cuda_graph_models import check_decode_graph_replays

    check_decode_graph_replays(name, "bfloat16", "auto", transform=quantize_model_w8a8)
