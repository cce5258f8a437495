"""quantize_model on a model built on CUDA: its QuantizedLinear layers hold codes, scales and the kernels'
offsets on the device, run the weight-only kernels, and equal float64 math on their dequantized weights within
the bfloat16 output's rounding (the allowance of tests/kernels/test_quant_matmul.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trident.attention.registry import create_backend
from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import Shape
from trident.models.build import build_model
from trident.quant.linear import QuantizedLinear, quantize_model
from trident.quant.rtn import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tiny_shapes import TINY_SHAPES  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=8, symmetric=False),
                                    QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, symmetric=False)],
                         ids=["int8", "int8_asym", "int4_g32", "int4_asym"])
def test_quantize_model_built_on_cuda(config: QuantConfig) -> None:
    device = torch.device("cuda")
    checkpoint = random_checkpoint(Shape("t", dict(TINY_SHAPES["qwen2-bias"]), "test"), device=device,
                                   dtype=torch.bfloat16, seed=3)
    model = build_model(checkpoint.config, checkpoint.tensors, dtype=torch.bfloat16, device=device,
                        backend=create_backend("torch", device))
    report = quantize_model(model, config)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(report.modules) == 8
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        assert layer.qweight.is_cuda and layer.scales.is_cuda
        assert (layer.offsets is None) == (config.bits == 8 and config.symmetric)
        assert layer.offsets is None or layer.offsets.is_cuda
        x = torch.randn(3, layer.in_features, generator=g).to(torch.bfloat16).to(device)
        y = layer(x)
        exact = x.double() @ layer.dequantized_weight(torch.float64).T
        if layer.bias is not None:
            exact = exact + layer.bias.double()
        rss = ((x.double() ** 2) @ (layer.dequantized_weight(torch.float64) ** 2).T).sqrt()
        assert ((y.double() - exact).abs() <= 2**-7 * (exact.abs() + rss) + 2**-24).all()
