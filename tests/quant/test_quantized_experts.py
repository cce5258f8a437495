"""Quantized routed experts (trident/moe/quant.py: int8 per channel, int4 in groups) on the CPU: the rounding's error
bound, the torch experts backend on the codes against float64 math on the dequantized weights, a tiny MoE model's
logits with quantized experts against its float logits, and `trident quantize --bits 8|4`'s MoE folder round trip
(save, load, identical logits)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_hf_model, tiny_hf_configs
from test_quantized_model import _build, _logits

from trident.cli import main
from trident.errors import TridentError
from trident.loader import load_checkpoint
from trident.moe.config import RouterConfig
from trident.moe.experts import FusedExperts, TorchExperts
from trident.moe.quant import (
    EXPERT_TENSORS,
    QuantizedFusedExperts,
    dequantize_experts,
    expert_quant_config,
    quantize_experts,
    quantize_model_experts,
)
from trident.moe.router import route
from trident.quant.linear import quantize_model
from trident.quant.rtn import QuantConfig

EXPERTS_TOLERANCE = {8: 0.03, 4: 0.25}
"""Per token, the largest logit difference relative to the largest logit of the tiny random MoE models (weights
N(0, 0.15), so every weight error is amplified through the layers) with quantized experts against float32 ones, by
bits: with int8 the median over the tokens measured 0.2% to 1.3% (qwen3_moe, mixtral, qwen2_moe, deepseek_v2 / v3,
seeds 3-5), with int4 in groups of 32 ~10% (qwen3_moe, deepseek_v3, seed 3). A few tokens whose router scores nearly
tie in some layer pick another expert there and move further (up to 31% on the tiny Mixtral with int8, seed 4; 65% on
the tiny DeepSeek-V3 with int4): the worst token is held to WORST_TOKEN_TOLERANCE only. Missing or misplaced scales
are off by orders of magnitude; the model with its experts' float weights replaced by the dequantized ones gives the
quantized model's logits (DEQUANTIZED_TOLERANCE)."""
WORST_TOKEN_TOLERANCE = {8: 0.5, 4: 1.0}
DEQUANTIZED_TOLERANCE = 1e-5
TOKENS = [(7 * i + 3) % 97 for i in range(24)]


def test_codes_scales_and_the_rounding_error_bound() -> None:
    """Codes in -127..127, one scale per expert and row = the row's absmax / 127, |w - deq(w)| <= scale / 2; an
    all-zero row gets codes 0 (and a harmless scale)."""
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-3, 1, 24, dtype=torch.float64)[:, None]
    w = torch.randn(5, 24, 40, generator=gen, dtype=torch.float64) * magnitudes
    w[2, 7] = 0.0
    q = quantize_experts(w)
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    assert q.scales.dtype == torch.float32 and q.scales.shape == (5, 24)
    assert q.codes.abs().max() == 127 and not (q.codes == -128).any()
    absmax = w.abs().amax(dim=2)
    nonzero = absmax > 0
    torch.testing.assert_close(q.scales.double()[nonzero], absmax[nonzero] / 127, rtol=1e-6, atol=0)
    deq = dequantize_experts(q.codes, q.scales, torch.float64)
    assert ((deq - w).abs() <= q.scales.double()[..., None] / 2 * (1 + 1e-6)).all()
    assert (q.codes[2, 7] == 0).all() and (deq[2, 7] == 0).all()
    assert torch.equal(deq, q.codes.double() * q.scales.double()[..., None])


@pytest.mark.parametrize("group_size", [None, 32])
def test_int4_codes_scales_and_the_rounding_error_bound(group_size: int | None) -> None:
    """int4: two codes a byte along K (element 2j in the low nibble), stored q + 8 in 1..15, one scale per expert, row
    and group = the group's absmax / 7, |w - deq(w)| <= scale / 2."""
    gen = torch.Generator().manual_seed(6)
    magnitudes = torch.logspace(-3, 1, 24, dtype=torch.float64)[:, None]
    w = torch.randn(5, 24, 64, generator=gen, dtype=torch.float64) * magnitudes
    w[2, 7] = 0.0
    q = quantize_experts(w, 4, group_size)
    groups = 1 if group_size is None else 64 // group_size
    assert q.bits == 4 and q.codes.dtype == torch.uint8 and q.codes.shape == (5, 24, 32)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (5, 24, groups)
    stored = torch.stack((q.codes & 0xF, q.codes >> 4), dim=-1).reshape(5, 24, 64).long()
    assert stored.min() >= 1 and stored.max() == 15
    grouped = w.reshape(5, 24, groups, -1)
    absmax = grouped.abs().amax(dim=-1)
    nonzero = absmax > 0
    torch.testing.assert_close(q.scales.double()[nonzero], absmax[nonzero] / 7, rtol=1e-6, atol=0)
    deq = dequantize_experts(q.codes, q.scales, torch.float64)
    bound = q.scales.double().repeat_interleave(64 // groups, dim=-1) / 2 * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    assert torch.equal(deq, ((stored - 8).double().reshape(5, 24, groups, -1) * q.scales.double()[..., None])
                       .reshape(5, 24, 64))
    assert (deq[2, 7] == 0).all()


def test_expert_formats_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(TridentError, match="per channel"):
        expert_quant_config(8, 64)
    with pytest.raises(TridentError, match="8 or 4 bits"):
        expert_quant_config(2, None)
    with pytest.raises(TridentError, match="group"):
        quantize_experts(torch.randn(2, 8, 48), 4, 32)  # 48 is no multiple of 32


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 32)])
def test_torch_experts_on_codes_equal_float64_math_on_the_dequantized_weights(bits: int,
                                                                              group_size: int | None) -> None:
    """TorchExperts dequantizes the active experts only (an idle expert's NaN scales are never read) and computes as
    with float weights."""
    gen = torch.Generator().manual_seed(1)
    num_experts, hidden_size, inter, top_k = 8, 64, 32, 2
    gate_up = quantize_experts(torch.randn(num_experts, 2 * inter, hidden_size, generator=gen) * 0.2, bits,
                               group_size)
    down = quantize_experts(torch.randn(num_experts, hidden_size, inter, generator=gen) * 0.2, bits, group_size)
    hidden = torch.randn(30, hidden_size, generator=gen)
    routing = route(torch.randn(30, num_experts, generator=gen) - torch.arange(num_experts) * 0.6,
                    RouterConfig(num_experts=num_experts, top_k=top_k))
    idle = sorted(set(range(num_experts)) - set(routing.expert_ids.flatten().tolist()))
    assert idle
    gate_up.scales[idle] = float("nan")
    down.scales[idle] = float("nan")
    out = TorchExperts().forward(hidden, routing.weights, routing.expert_ids, gate_up.codes, down.codes, "silu",
                                 gate_up_scales=gate_up.scales, down_scales=down.scales)
    gu64, dn64 = dequantize_experts(*gate_up, torch.float64), dequantize_experts(*down, torch.float64)
    want = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(top_k):
            e = int(routing.expert_ids[t, j])
            g, u = (gu64[e] @ hidden[t].double()).split(inter)
            want[t] += float(routing.weights[t, j]) * (dn64[e] @ (F.silu(g) * u))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_tiny_moe_model_with_quantized_experts_is_close_to_the_float_model(name: str, bits: int,
                                                                           group_size: int | None) -> None:
    """Every experts module becomes int8 / int4 (dense layers, shared experts and attention stay float); the tokens'
    logits stay within EXPERTS_TOLERANCE[bits] of the float model's (see there), and the modules' bytes are the codes
    plus scales."""
    from hf_tiny import trident_config

    from trident.loader.checkpoint import Checkpoint

    hf_config = tiny_hf_configs()[name]
    config = trident_config(hf_config)
    checkpoint = Checkpoint(config=config, tensors=make_hf_model(hf_config, seed=3).state_dict(), tensor_types={},
                            tokenizer=None, format="hf", path="", file_bytes=0)
    model = _build(checkpoint)
    original = _logits(model, TOKENS)
    floats = {name: (m.gate_up_proj.clone(), m.down_proj.clone()) for name, m in model.named_modules()
              if isinstance(m, FusedExperts)}
    names = quantize_model_experts(model, bits, group_size)
    assert names == list(floats) and names
    qmax = 2 ** (bits - 1) - 1
    for module_name in names:
        experts = model.get_submodule(module_name)
        assert isinstance(experts, QuantizedFusedExperts) and experts.bits == bits
        e, two_i, h = floats[module_name][0].shape
        codes = (e * two_i * h + e * h * (two_i // 2)) * bits // 8
        groups = (two_i + h) if bits == 8 else (two_i * h + h * (two_i // 2)) // group_size
        scales = 4 * e * groups
        assert experts.storage_bytes() == codes + scales
        for deq, w in zip(experts.dequantized(torch.float64), floats[module_name]):
            grouped = w.double().reshape(*w.shape[:2], -1, group_size or w.shape[2])
            bound = grouped.abs().amax(dim=-1, keepdim=True) / (2 * qmax) * (1 + 1e-5)
            assert ((deq.reshape(grouped.shape) - grouped).abs() <= bound).all()
    logits = _logits(model, TOKENS)
    per_token = (logits - original).abs().amax(dim=-1) / original.abs().max()
    assert 0 < per_token.median() < EXPERTS_TOLERANCE[bits], per_token
    assert per_token.max() < WORST_TOKEN_TOLERANCE[bits], per_token
    dequantized = _build(checkpoint)  # the float model with every expert's weights replaced by the dequantized ones
    for module_name in names:
        float_experts = dequantized.get_submodule(module_name)
        float_experts.gate_up_proj.data, float_experts.down_proj.data = \
            model.get_submodule(module_name).dequantized(torch.float32)
    torch.testing.assert_close(logits, _logits(dequantized, TOKENS), rtol=0, atol=DEQUANTIZED_TOLERANCE)


@pytest.mark.parametrize("name, bits, group_size, expert_bits", [("qwen2_moe", 8, None, None),
                                                                  ("mixtral", 8, None, None), ("mixtral", 4, 32, None),
                                                                  ("mixtral", 8, 32, 4)])
def test_quantize_cli_writes_quantized_experts_that_load_with_identical_logits(name: str, bits: int,
                                                                               group_size: int | None,
                                                                               expert_bits: int | None, tmp_path,
                                                                               capsys) -> None:
    """`trident quantize MOE --bits 8|4 [--expert-bits 4]`: the folder lists the experts modules (and with experts of
    another format than the layers imply, their experts_config), holds their codes and scales instead of the
    per-expert matrices (Mixtral's block_sparse_moe names too), and loads into a model whose logits equal the
    in-memory quantized model's bit for bit."""
    source = tmp_path / name
    make_hf_model(tiny_hf_configs()[name], seed=4).save_pretrained(source)
    out = tmp_path / f"{name}-int{bits}"
    report = tmp_path / "quantize.json"
    flags = ([] if group_size is None else ["--group-size", str(group_size)]) + (
        [] if expert_bits is None else ["--expert-bits", str(expert_bits)])
    assert main(["quantize", str(source), "--bits", str(bits), *flags, "--out", str(out), "--json",
                 str(report)]) == 0, capsys.readouterr().err
    record = json.loads(report.read_text())
    checkpoint = load_checkpoint(str(source))
    model = _build(checkpoint)
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size))
    experts_bits = expert_bits or bits
    experts_group = group_size if experts_bits == 4 else None
    experts = quantize_model_experts(model, experts_bits, experts_group)
    assert record["experts"] == experts
    assert (record["experts_bits"], record["experts_group_size"]) == (experts_bits, experts_group)
    assert record["experts_bytes_after"] == sum(model.get_submodule(n).storage_bytes() for n in experts)
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["experts"] == experts and entry["bits"] == bits
    assert entry.get("experts_config") == (None if expert_bits is None else
                                           {"bits": expert_bits, "group_size": experts_group, "symmetric": True})
    loaded = load_checkpoint(str(out))
    assert loaded.quantization.experts == tuple(experts)
    assert loaded.quantization.experts_format() == (experts_bits, experts_group)
    from trident.loader.info import model_info

    described = model_info(loaded).quantization  # `trident info`: the experts' format where it is not the layers'
    assert ("; routed experts int4 in groups of 32, symmetric (3 layers)" in described) == (expert_bits is not None)
    assert not any(".experts." in n and n.endswith(".weight") for n in loaded.tensors)
    assert all(f"{n}.{kind}" in loaded.tensors for n in experts for kind in EXPERT_TENSORS)
    rebuilt = _build(loaded)
    assert all(isinstance(m := rebuilt.get_submodule(n), QuantizedFusedExperts) and m.bits == experts_bits
               for n in experts)
    assert torch.equal(_logits(rebuilt, TOKENS), _logits(model, TOKENS))


@pytest.mark.parametrize("flags, message", [
    (["--bits", "8", "--expert-bits", "4", "--method", "gptq", "--calib", "shakespeare"], "--expert-bits applies"),
    (["--bits", "mixed", "--expert-bits", "4", "--avg-bits", "5"], "--expert-bits applies"),
    (["--bits", "8", "--expert-bits", "4", "--method", "w8a8"], "--expert-bits applies"),
])
def test_quantize_cli_refuses_expert_bits_where_the_experts_stay_float(flags: list[str], message: str, tmp_path,
                                                                      capsys) -> None:
    assert main(["quantize", "default", *flags, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_cli_refuses_expert_bits_on_a_dense_model(tiny_llama_dir, tmp_path, capsys) -> None:
    assert main(["quantize", str(tiny_llama_dir), "--bits", "8", "--expert-bits", "4", "--out",
                 str(tmp_path / "out")]) == 2
    assert "not a mixture-of-experts model" in capsys.readouterr().err



MIXED = QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)
"""Mixed experts: the Linear layers int8 per channel, the routed experts int4 in groups of 32 (experts_config)."""


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_mixed_checkpoint_holds_int8_layers_and_int4_experts_and_runs_their_dequantized_math(name: str) -> None:
    """quantize_checkpoint with experts_config int4 g32 beside int8 Linear layers: the experts are stored as packed
    int4 codes with one scale per group of 32 (within half a step of the float weights), the Linear layers as int8
    codes per channel; the model built from it holds both, and its logits are those of the float model holding every
    dequantized weight (DEQUANTIZED_TOLERANCE), as the existing quantized-experts tests hold the int8 / int4 ones."""
    from hf_tiny import trident_config

    from trident.bench.quantized_weights import quantize_checkpoint
    from trident.loader.checkpoint import Checkpoint
    from trident.quant.linear import QuantizedLinear

    hf_config = tiny_hf_configs()[name]
    source = Checkpoint(config=trident_config(hf_config), tensors=make_hf_model(hf_config, seed=3).state_dict(),
                        tensor_types={}, tokenizer=None, format="hf", path="", file_bytes=0)
    floats = {n: (m.gate_up_proj.clone(), m.down_proj.clone()) for n, m in _build(source).named_modules()
              if isinstance(m, FusedExperts)}
    config, experts_config = MIXED
    quantized = quantize_checkpoint(source, config, experts_config=experts_config)
    quantization = quantized.quantization
    assert quantization.experts == tuple(floats) and quantization.experts_format() == (4, 32)
    for module in quantization.experts:
        stored = [quantized.tensors[f"{module}.{kind}"] for kind in EXPERT_TENSORS]
        for (codes, scales), w in zip((stored[:2], stored[2:]), floats[module]):
            e, n, k = w.shape
            assert codes.dtype == torch.uint8 and codes.shape == (e, n, k // 2)
            assert scales.dtype == torch.float32 and scales.shape == (e, n, k // 32)
            err = (dequantize_experts(codes, scales, torch.float64) - w.double()).abs()
            assert (err <= scales.double().repeat_interleave(32, dim=-1) / 2 * (1 + 1e-6)).all()
    for module in quantization.modules:
        qweight, scales = quantized.tensors[f"{module}.qweight"], quantized.tensors[f"{module}.scales"]
        assert qweight.dtype == torch.int8 and scales.shape == (qweight.shape[0], 1)
    model = _build(quantized)
    assert all(isinstance(m := model.get_submodule(n), QuantizedFusedExperts) and m.bits == 4
               and m.group_sizes == (32, 32) for n in quantization.experts)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers and all(m.config == config for m in layers.values())
    reference = _build(source)  # float weights replaced by the dequantized codes, layer by layer
    for module_name, layer in layers.items():
        reference.get_submodule(module_name).weight.data = layer.dequantized_weight(torch.float32)
    for module_name in quantization.experts:
        experts = reference.get_submodule(module_name)
        experts.gate_up_proj.data, experts.down_proj.data = model.get_submodule(module_name).dequantized()
    torch.testing.assert_close(_logits(model, TOKENS), _logits(reference, TOKENS), rtol=0,
                               atol=DEQUANTIZED_TOLERANCE)


def test_quantization_config_round_trips_with_and_without_experts_config() -> None:
    """as_hf_dict writes experts_config only when the experts have a format of their own; reading it back gives the
    same QuantizedModules; a quantization_config written before (no key) reads as experts following the layers."""
    from trident.quant.format import QuantizedModules, read_quantization_config

    config, experts_config = MIXED
    experts = ("model.layers.1.mlp.experts",)
    mixed = QuantizedModules(config, ("model.layers.0.mlp.down_proj",), experts=experts, experts_config=experts_config)
    entry = json.loads(json.dumps(mixed.as_hf_dict()))
    assert entry["experts_config"] == {"bits": 4, "group_size": 32, "symmetric": True}
    assert read_quantization_config({"quantization_config": entry}) == mixed
    plain = QuantizedModules(QuantConfig(bits=4, group_size=64), ("model.layers.0.mlp.down_proj",), experts=experts)
    entry = json.loads(json.dumps(plain.as_hf_dict()))
    assert "experts_config" not in entry
    read = read_quantization_config({"quantization_config": entry})
    assert read == plain and read.experts_config is None and read.experts_format() == (4, 64)
    assert QuantizedModules(QuantConfig(bits=8, group_size=32), ("m",), experts=experts).experts_format() == (8, None)


def test_experts_config_refuses_what_the_experts_cannot_hold() -> None:
    from trident.quant.format import W8A8_METHOD, W8A8_WEIGHTS, QuantizedModules, read_quantization_config

    experts = ("model.layers.1.mlp.experts",)
    with pytest.raises(TridentError, match="experts_config .* goes with trident-rtn .* not trident-w8a8"):
        QuantizedModules(W8A8_WEIGHTS, ("m",), quant_method=W8A8_METHOD, experts_config=MIXED[1])
    with pytest.raises(TridentError, match="int8 experts are per channel"):
        QuantizedModules(QuantConfig(bits=4, group_size=32), ("m",), experts=experts,
                         experts_config=QuantConfig(bits=8, group_size=64))
    with pytest.raises(TridentError, match="symmetric"):
        QuantizedModules(QuantConfig(bits=8), ("m",), experts=experts,
                         experts_config=QuantConfig(bits=4, group_size=32, symmetric=False))
    with pytest.raises(TridentError, match="lists no experts module"):
        QuantizedModules(QuantConfig(bits=8), ("m",), experts_config=MIXED[1])
    entry = {"quant_method": "trident-rtn", "bits": 8, "group_size": None, "symmetric": True, "modules": ["m"],
             "experts": list(experts), "experts_config": {"bits": 2, "group_size": None, "symmetric": True}}
    with pytest.raises(TridentError, match="experts_config is invalid"):
        read_quantization_config({"quantization_config": entry})


def test_a_folder_whose_experts_differ_from_its_config_is_refused() -> None:
    """The loader checks the stored experts against quantization_config's format: int4 codes under a config that
    says int8 experts is a clear error, not a silent reinterpretation."""
    import dataclasses

    from hf_tiny import trident_config

    from trident.bench.quantized_weights import quantize_checkpoint
    from trident.loader.checkpoint import Checkpoint

    hf_config = tiny_hf_configs()["qwen3_moe"]
    source = Checkpoint(config=trident_config(hf_config), tensors=make_hf_model(hf_config, seed=3).state_dict(),
                        tensor_types={}, tokenizer=None, format="hf", path="", file_bytes=0)
    quantized = quantize_checkpoint(source, MIXED[0], experts_config=MIXED[1])
    claims_int8 = dataclasses.replace(quantized, quantization=dataclasses.replace(quantized.quantization,
                                                                                  experts_config=None))
    with pytest.raises(TridentError, match="holds int4 in groups of 32 / 32 experts, but quantization_config says "
                                           "int8 per channel"):
        _build(claims_int8)
