"""The slices of quantized layers that tensor parallelism keeps (trident/distributed/quantized.py), without
communication: a QuantizedLinear's rows and input features, in every format, hold exactly the unsplit layer's codes,
scales, zero points and bias, and the input-feature slices' partial products sum to the unsplit product; features
that would cut a quantization group or an int4 byte are a clear error."""

from __future__ import annotations

import pytest
import torch

from trident.distributed.quantized import check_columns, columns_error, quantized_columns, quantized_rows
from trident.errors import TridentError
from trident.models.layers import Linear
from trident.native import qmatmul as native_qmatmul
from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantConfig

FORMATS = {
    "int8-per-channel": QuantConfig(bits=8),
    "int8-g32-asymmetric": QuantConfig(bits=8, group_size=32, symmetric=False),
    "int4-g32": QuantConfig(bits=4, group_size=32),
    "int4-per-channel-asymmetric": QuantConfig(bits=4, symmetric=False),
}


def _layer(config: QuantConfig) -> QuantizedLinear:
    """A [24, 128] layer with a float64 bias, random weights quantized with ``config``."""
    generator = torch.Generator().manual_seed(0)
    layer = Linear(128, 24, bias=True).double()
    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64))
    layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, dtype=torch.float64))
    return QuantizedLinear.from_linear(layer, config)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_the_unsplit_layers_rows(fmt):
    full = _layer(FORMATS[fmt])
    part = quantized_rows(full, ((16, 4), (0, 8)))
    assert type(part) is QuantizedLinear and (part.in_features, part.out_features) == (128, 12)
    rows = torch.cat((torch.arange(16, 20), torch.arange(0, 8)))
    assert torch.equal(part.dequantized_weight(torch.float64), full.dequantized_weight(torch.float64)[rows])
    assert torch.equal(part.bias, full.bias[rows])


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_features_sum_to_the_unsplit_product(fmt):
    """Two halves of K (without the bias, which the row-parallel layer adds once after the sum)."""
    full = _layer(FORMATS[fmt])
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    total = torch.zeros(5, 24, dtype=torch.float64)
    for start in (0, 64):
        part = quantized_columns(full, start, 64)
        assert type(part) is QuantizedLinear and part.bias is None and part.in_features == 64
        assert torch.equal(part.dequantized_weight(torch.float64),
                           full.dequantized_weight(torch.float64)[:, start: start + 64])
        total += part(x[:, start: start + 64])
    torch.testing.assert_close(total + full.bias, full(x), atol=1e-12, rtol=0)


def test_features_that_cut_a_group_or_an_int4_byte_are_refused():
    assert columns_error(4, 32, 0, 48) == "input features 0..47, not whole quantization groups of 32"
    assert columns_error(8, 32, 32, 16) == "input features 32..47, not whole quantization groups of 32"
    assert columns_error(4, None, 3, 3) == "input features 3..5, which cut int4 bytes (two codes a byte along K)"
    assert columns_error(8, None, 3, 3) is None and columns_error(4, 32, 32, 64) is None
    with pytest.raises(TridentError) as error:
        check_columns("model.layers.0.self_attn.o_proj", 4, None, [(0, 4), (4, 3)])
    assert str(error.value) == (
        "model.layers.0.self_attn.o_proj (int4 per channel) does not split over --tensor-parallel 2: rank 1 would "
        "hold its input features 4..6, which cut int4 bytes (two codes a byte along K); use a --tensor-parallel size "
        "that gives every rank whole groups and an even number of features")
    with pytest.raises(TridentError, match="an int4 in groups of 32 layer cannot be cut at its input features 16..47"):
        quantized_columns(_layer(FORMATS["int4-g32"]), 16, 32)


@pytest.mark.skipif(not native_qmatmul.available(), reason="the native CPU library is not built here")
@pytest.mark.parametrize("fmt", ["int8-per-channel", "int4-g32"])
def test_native_kernel_takes_the_slices(fmt):
    """The CPU's native integer kernel (what a CPU rank runs for up to 16 rows of float32 activations) takes both
    halves of K as it takes the whole layer, and their products sum to the whole product up to the order of the
    sums (the kernel quantizes activations per block of 32, which the halves keep)."""
    full = _layer(FORMATS[fmt])
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    parts = [quantized_columns(full, start, 64) for start in (0, 64)]
    assert all(layer.native_weight(torch.float32, 5) is not None for layer in (full, *parts))
    whole = x.double() @ full.dequantized_weight(torch.float64).T  # without the bias
    split = sum(part(x[:, start: start + 64]) for part, start in zip(parts, (0, 64)))
    whole_native = full(x) - full.bias.float()
    torch.testing.assert_close(split, whole_native, atol=1e-5 * whole.abs().max().item(), rtol=0)
