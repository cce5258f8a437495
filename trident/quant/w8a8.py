"""W8A8: int8 weights times int8 activations. :class:`W8A8Linear` replaces a Linear; :func:`quantize_model_w8a8`
swaps a built model's decoder-layer Linear layers for it in place.

- Weights: int8 per output channel, symmetric (``s_w = absmax / 127``, codes -127..127): exactly round-to-nearest's
  int8 per-channel layout (:data:`trident.quant.format.W8A8_WEIGHTS`; buffers ``qweight`` int8 [N, K] and
  ``scales`` float32 [N, 1]), chosen once.
- Activations: quantized at every forward, per token (row of x), symmetric: ``s_x = absmax(row) / 127`` in float32,
  codes ``clamp(floor(x / s_x + 0.5), -127, 127)`` (:func:`quantize_per_token`; a zero row: scale 0, codes 0).
- Product: ``y[m, n] = (sum_k qx[m, k] qw[n, k]) * s_x[m] * s_w[n] (+ b[n])``, the integer sum exact in int32,
  the scales applied in float32, the result cast to x's dtype.

Every element of x is then within ``s_x / 2`` of its dequantized value and every weight within ``s_w / 2``, so
``|y - x W^T| <= sum_k (|x_k| s_w / 2 + |w_k| s_x / 2 + s_x s_w / 4)`` plus float32 rounding (the bound the tests
check against float64).

Where it runs: on CUDA (with Triton) the two kernels of trident/kernels/w8a8_matmul.py (per-token quantization,
then the int8 tensor-core matmul with the scales fused in its epilogue); on the CPU the torch quantization and
``torch._int_mm`` (int8 x int8 -> int32, any shape on torch's CPU build); elsewhere :func:`w8a8_matmul_reference`
(both sides dequantized, a float32 matmul). The CPU and GPU paths are tested against the reference and against
float64.

SmoothQuant's migration (:mod:`trident.quant.smoothquant`) is applied to the float model before the swap: it is
folded into the norm weights and the weights' columns, so nothing of it remains here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trident.errors import TridentError
from trident.models import ops
from trident.models.layers import Linear
from trident.quant.format import W8A8_WEIGHTS
from trident.quant.linear import ModuleReport, QuantReport, eligible_modules, replace_module
from trident.quant.rtn import QuantConfig, QuantizedWeight, dequantize, quantize

QMAX = 127
"""Largest code magnitude of weights and activations."""
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Activation dtypes the GPU kernels take (the output is written in x's dtype)."""


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype; computed in float32) -> (codes int8 [M, K], scales float32 [M]), symmetric per
    row: ``scale = absmax / 127``, ``codes = clamp(floor(x / scale + 0.5), -127, 127)``; a zero row has scale 0
    and codes 0. The torch reference of trident/kernels/w8a8_matmul.py's ``quantize_rows`` (bit for bit)."""
    x32 = x.to(torch.float32)
    # Divisions by a tensor (IEEE, as the kernel's div_rn), never by a Python number (a reciprocal on CUDA).
    scales = x32.abs().amax(dim=1) / torch.tensor(float(QMAX), device=x.device)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (x32 / divisor[:, None]).add_(0.5).floor_().clamp_(-QMAX, QMAX).to(torch.int8)  # one temporary
    return codes, scales


def w8a8_matmul_reference(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor,
                          w_scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The product of the quantized operands (shapes as :func:`trident.kernels.w8a8_matmul.w8a8_matmul`): both
    dequantized to float32, one float32 matmul, bias added, cast to ``dtype``."""
    x = x_codes.to(torch.float32) * x_scales[:, None]
    w = w_codes.to(torch.float32) * w_scales[:, None]
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def int_mm_product(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The same product on the CPU through ``torch._int_mm`` (int8 [M, K] @ int8 [K, N] -> int32, exact), the
    scales and bias applied in float32."""
    y = torch._int_mm(x_codes, w_codes.T).to(torch.float32)
    y.mul_(x_scales[:, None]).mul_(w_scales)  # in place: the [M, N] epilogue is a large part of the time
    if bias is not None:
        y.add_(bias)
    return y.to(dtype)


def takes_kernels(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`w8a8_linear` runs the Triton kernels: Triton on CUDA, x of a kernel dtype, bias (if any)
    of x's dtype. Shapes, dtypes and the device only: the choice holds across CUDA-graph capture and replay."""
    return ops.uses_kernels(x) and x.dtype in KERNEL_DTYPES and (bias is None or bias.dtype == x.dtype)


def w8a8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: x quantized per token times the int8 weight ``w_codes`` [N, K] with its
    per-channel ``w_scales`` [N] (see the module docstring for where it runs)."""
    if takes_kernels(x, bias):
        from trident.kernels.w8a8_matmul import quantize_rows, w8a8_matmul

        x_codes, x_scales = quantize_rows(x if x.stride(1) == 1 else x.contiguous())
        return w8a8_matmul(x_codes, x_scales, w_codes, w_scales, None if bias is None else bias.contiguous(),
                           x.dtype)
    x_codes, x_scales = quantize_per_token(x)
    if x.device.type == "cpu" and x.shape[0] > 0:
        return int_mm_product(x_codes, x_scales, w_codes, w_scales, bias, x.dtype)
    return w8a8_matmul_reference(x_codes, x_scales, w_codes, w_scales, bias, x.dtype)


class W8A8Linear(nn.Module):
    """y = quantize_per_token(x) (int8 W)^T (+ b): buffers ``qweight`` (int8 [N, K]) and ``scales`` (float32
    [N, 1]), stored as round-to-nearest int8 per channel symmetric; the bias stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, q: QuantizedWeight,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if config != W8A8_WEIGHTS or q.zeros is not None:
            raise TridentError(f"W8A8 weights are int8 per channel, symmetric; got {config}")
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("scales", q.scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, layer: Linear) -> W8A8Linear:
        return cls(layer.in_features, layer.out_features, W8A8_WEIGHTS, quantize(layer.weight, W8A8_WEIGHTS),
                   layer.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized, self.config, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the codes and scales (the bias apart)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise TridentError(f"input has {x.shape[-1]} features, the W8A8 layer takes {self.in_features}")
        y = w8a8_linear(x.reshape(-1, self.in_features), self.qweight, self.scales.view(-1), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 per-token"


@torch.no_grad()
def quantize_model_w8a8(model: nn.Module, progress: Callable[[str], None] | None = None) -> QuantReport:
    """Replace every Linear of the decoder layers (the modules round-to-nearest quantizes by default; never the
    embeddings or the LM head) by a W8A8Linear, in place; the report gives each weight's relative error."""
    report = QuantReport(W8A8_WEIGHTS)
    for name in eligible_modules(model, W8A8_WEIGHTS):
        layer = model.get_submodule(name)
        qlayer = W8A8Linear.from_linear(layer)
        w64 = layer.weight.to(torch.float64)
        err = torch.linalg.norm(w64 - qlayer.dequantized_weight(torch.float64)) / torch.linalg.norm(w64).clamp_min(
            1e-300)
        report.modules.append(ModuleReport(name, layer.out_features, layer.in_features, float(err),
                                           layer.weight.numel() * layer.weight.element_size(),
                                           qlayer.storage_bytes()))
        replace_module(model, name, qlayer)
        if progress is not None:
            progress(name)
    return report
