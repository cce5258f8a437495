"""torch's packed CPU kernels behind QuantizedLinear (trident/quant/cpu_kernels.py) against a float64 reference,
for every stored format: symmetric, asymmetric with integer zero points, and float zero points (GGUF Q4_1)."""

from __future__ import annotations

import pytest
import torch

from trident.models.layers import Linear
from trident.quant.affine import affine_from_rtn
from trident.quant.cpu_kernels import INT4_MAX_ROWS
from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantConfig, QuantizedWeight, dequantize, pack_int4, quantize


@pytest.fixture(autouse=True)
def torch_kernels_only(monkeypatch):
    """These tests are about torch's kernels: trident's native one (tests/native) would take their products."""
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")


BF16_RELATIVE = 2e-2
"""bfloat16 activations, scales and outputs: the largest error relative to the largest output."""


def float_zero_point_weight(n: int, k: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    """A GGUF Q4_1-like weight: unsigned codes, a positive scale and a float offset (the group's minimum)."""
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.05 + 0.01
    mins = -torch.rand(n, k // group, generator=gen) * 0.5
    return QuantizedWeight(pack_int4(codes), scales, mins)


def test_float_zero_points_dequantize_as_scale_times_code_plus_offset() -> None:
    gen = torch.Generator().manual_seed(3)
    q = float_zero_point_weight(16, 64, 32, gen)
    config = QuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True)
    codes = torch.stack((q.qweight & 15, q.qweight >> 4), -1).reshape(16, 64).double()
    expected = codes.view(16, 2, 32) * q.scales.double()[..., None] + q.zeros.double()[..., None]
    assert torch.equal(dequantize(q, config, torch.float64), expected.view(16, 64))
    w = affine_from_rtn(q, config)
    assert torch.equal(w.scales, q.scales) and torch.equal(w.offsets, q.zeros)


@pytest.mark.parametrize("group,symmetric,float_zeros", [(32, True, False), (64, False, False), (128, True, False),
                                                         (32, False, True), (64, False, True)])
def test_int4_kernel_matches_the_float64_reference(monkeypatch, group, symmetric, float_zeros) -> None:
    gen = torch.Generator().manual_seed(group + symmetric)
    n, k = 48, 256
    config = QuantConfig(bits=4, group_size=group, symmetric=symmetric, float_zero_points=float_zeros)
    if float_zeros:
        q = QuantizedLinear(k, n, config, float_zero_point_weight(n, k, group, gen))
    else:
        layer = Linear(k, n)
        layer.weight = torch.nn.Parameter(torch.randn(n, k, generator=gen) + 0.4, requires_grad=False)
        q = QuantizedLinear.from_linear(layer, config)
    calls = []
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a) or kernel(*a))
    for rows in (1, 5, INT4_MAX_ROWS):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        y = q(x)
        reference = x.double() @ q.dequantized_weight(torch.float64).T
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert ((y.double() - reference).abs().max() / reference.abs().max()).item() < BF16_RELATIVE
    assert len(calls) == 3
    q(torch.randn(INT4_MAX_ROWS + 1, k).to(torch.bfloat16))  # more rows: dequantize + bf16 GEMM
    q(torch.randn(2, k))  # float32 activations: the reference
    assert len(calls) == 3


def test_int4_kernel_needs_a_multiple_of_16_outputs(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(9)
    layer = Linear(64, 40)
    layer.weight = torch.nn.Parameter(torch.randn(40, 64, generator=gen), requires_grad=False)
    q = QuantizedLinear.from_linear(layer, QuantConfig(bits=4, group_size=32))
    calls = []
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a))
    x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
    reference = x.double() @ q.dequantized_weight(torch.float64).T
    assert ((q(x).double() - reference).abs().max() / reference.abs().max()).item() < BF16_RELATIVE
    assert not calls


def test_float_zero_points_are_for_loaded_weights_only() -> None:
    from trident.errors import TridentError

    with pytest.raises(TridentError, match="symmetric=False and bits=4"):
        QuantConfig(bits=4, group_size=32, float_zero_points=True)
    with pytest.raises(TridentError, match="loaded weights"):
        quantize(torch.randn(4, 32), QuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True))


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True)])
def test_grouped_int8_through_the_int4_kernel_matches_the_float64_reference(monkeypatch, group, symmetric) -> None:
    """Group-wise int8 (GGUF Q8_0 is symmetric with groups of 32) runs the int4 kernel on [x, x] against its codes
    split into high and low nibbles; codes over the whole range, -128 included (Q8_0 may store it)."""
    gen = torch.Generator().manual_seed(group + symmetric)
    n, k = 48, 256
    config = QuantConfig(bits=8, group_size=group, symmetric=symmetric)
    if symmetric:
        codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = torch.rand(n, k // group, generator=gen) * 0.01 + 0.001
        q = QuantizedLinear(k, n, config, QuantizedWeight(codes, scales, None))
    else:  # trident's own asymmetric int8 (codes minus 128, integer zero points)
        layer = Linear(k, n)
        layer.weight = torch.nn.Parameter(torch.randn(n, k, generator=gen) + 0.4, requires_grad=False)
        q = QuantizedLinear.from_linear(layer, config)
    calls = []
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a) or kernel(*a))
    for rows in (1, 7, INT4_MAX_ROWS):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        y = q(x)
        reference = x.double() @ q.dequantized_weight(torch.float64).T
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert ((y.double() - reference).abs().max() / reference.abs().max()).item() < BF16_RELATIVE
        fast = q.cpu_matmul(torch.bfloat16)
        assert fast is not None and torch.equal(fast(x), y)
    assert len(calls) == 6
