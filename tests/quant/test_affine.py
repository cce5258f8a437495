"""The affine form of the round-to-nearest formats (scales * q + offsets per group) stands for the same weight as
rtn.dequantize, computed in float64 here; its reference product equals float64 math; the CPU dispatch takes the
reference; QuantizedLinear on the CPU derives no offsets (the kernels' buffer exists only on CUDA)."""

from __future__ import annotations

import pytest
import torch

from trident.models.layers import Linear
from trident.quant.affine import AffineWeight, affine_from_rtn, affine_linear, affine_matmul_reference, check_affine
from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantConfig, dequantize, quantize, unpack_int4

CONFIGS = [QuantConfig(bits=b, group_size=g, symmetric=s) for b in (8, 4) for g in (None, 32, 128)
           for s in (True, False)]


def _id(c: QuantConfig) -> str:
    return f"int{c.bits}_g{c.group_size}_{'sym' if c.symmetric else 'asym'}"


def _affine_float64(w: AffineWeight) -> torch.Tensor:
    codes = (unpack_int4(w.codes) if w.bits == 4 else w.codes).double()
    n, k = codes.shape
    per_element = torch.arange(k) // (k // w.scales.shape[1])
    full = codes * w.scales.double()[:, per_element]
    return full if w.offsets is None else full + w.offsets.double()[:, per_element]


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_affine_form_equals_dequantize(config: QuantConfig) -> None:
    """scales * q + offsets (float64) == rtn.dequantize (float64) up to the float32 rounding of the offsets
    (half a unit: 2^-24 of |offset|); the codes and scales are the stored tensors themselves."""
    g = torch.Generator().manual_seed(config.bits + (config.group_size or 0) + config.symmetric)
    weight = torch.randn(37, 256, generator=g) * 0.05 + 0.01
    q = quantize(weight, config)
    w = affine_from_rtn(q, config)
    check_affine(w)
    assert w.codes is q.qweight and w.scales is q.scales and w.bits == config.bits
    assert w.group_size == (config.group_size or 256) and w.in_features == 256 and w.out_features == 37
    assert (w.offsets is None) == (config.bits == 8 and config.symmetric)
    # a zero point exactly where every offset is -8 x its scale (what the CUDA batch-1 kernel relies on)
    assert w.zero_point == (8 if config.bits == 4 and config.symmetric else 0)
    if w.zero_point:
        assert torch.equal(w.offsets, -8.0 * w.scales)
    expected = dequantize(q, config, torch.float64)
    got = _affine_float64(w)
    allowed = 2**-24 * (w.offsets.double().abs().max().item() if w.offsets is not None else 0.0)
    assert (got - expected).abs().max().item() <= allowed
    assert allowed < 1e-3 * q.scales.min().item()  # far below a code step: a wrong offset shows


@pytest.mark.parametrize("bias", [False, True])
def test_reference_product_equals_float64_math(bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    config = QuantConfig(bits=4, group_size=32, symmetric=False)
    w = affine_from_rtn(quantize(torch.randn(19, 96, generator=g), config), config)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(19, generator=g).to(torch.bfloat16) if bias else None
    exact = x.double() @ _affine_float64(w).T + (b.double() if bias else 0)
    y = affine_matmul_reference(x, w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=2**-8 * exact.abs().max().item())
    y3 = affine_linear(x.reshape(1, 5, 96), w, b)  # the CPU dispatch: the reference, any leading shape
    assert y3.shape == (1, 5, 19) and torch.equal(y3[0], y)


def test_check_affine_rejects_inconsistent_tensors() -> None:
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    scales = torch.ones(4, 2)
    check_affine(AffineWeight(codes, scales, None, 4))
    for bad in (AffineWeight(codes, scales, None, 8), AffineWeight(codes.to(torch.int8), scales, None, 4),
                AffineWeight(codes, scales.double(), None, 4), AffineWeight(codes, torch.ones(4, 3), None, 4),
                AffineWeight(codes, scales, torch.ones(4, 1), 4), AffineWeight(codes, scales, None, 4, 8),
                AffineWeight(codes.view(torch.int8), scales, -8 * scales, 8, 8),
                AffineWeight(codes, scales, -16 * scales, 4, 16)):
        with pytest.raises(ValueError):
            check_affine(bad)


def test_quantized_linear_on_the_cpu_holds_no_offsets() -> None:
    layer = Linear(64, 16)
    layer.weight.data = torch.randn(16, 64)
    q = QuantizedLinear.from_linear(layer, QuantConfig(bits=4, group_size=32))
    assert q.offsets is None and "offsets" not in q.state_dict()
    w = q.affine_weight()  # derived on demand (a module moved to CUDA after it was built)
    assert torch.equal(w.offsets, -8.0 * q.scales) and q.offsets is not None
