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


@pytest.mark.parametrize("name, bits, group_size", [("qwen2_moe", 8, None), ("mixtral", 8, None),
                                                     ("mixtral", 4, 32)])
def test_quantize_cli_writes_quantized_experts_that_load_with_identical_logits(name: str, bits: int,
                                                                               group_size: int | None, tmp_path,
                                                                               capsys) -> None:
    """`trident quantize MOE --bits 8|4`: the folder lists the experts modules, holds their codes and scales instead
    of the per-expert matrices (Mixtral's block_sparse_moe names too), and loads into a model whose logits equal the
    in-memory quantized model's bit for bit."""
    source = tmp_path / name
    make_hf_model(tiny_hf_configs()[name], seed=4).save_pretrained(source)
    out = tmp_path / f"{name}-int{bits}"
    report = tmp_path / "quantize.json"
    flags = [] if group_size is None else ["--group-size", str(group_size)]
    assert main(["quantize", str(source), "--bits", str(bits), *flags, "--out", str(out), "--json",
                 str(report)]) == 0, capsys.readouterr().err
    record = json.loads(report.read_text())
    checkpoint = load_checkpoint(str(source))
    model = _build(checkpoint)
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size))
    experts = quantize_model_experts(model, bits, group_size)
    assert record["experts"] == experts
    assert record["experts_bytes_after"] == sum(model.get_submodule(n).storage_bytes() for n in experts)
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["experts"] == experts
    loaded = load_checkpoint(str(out))
    assert loaded.quantization.experts == tuple(experts)
    assert not any(".experts." in n and n.endswith(".weight") for n in loaded.tensors)
    assert all(f"{n}.{kind}" in loaded.tensors for n in experts for kind in EXPERT_TENSORS)
    rebuilt = _build(loaded)
    assert all(isinstance(m := rebuilt.get_submodule(n), QuantizedFusedExperts) and m.bits == bits for n in experts)
    assert torch.equal(_logits(rebuilt, TOKENS), _logits(model, TOKENS))

