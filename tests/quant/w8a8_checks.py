"""Float64 checks of W8A8 shared by tests/quant/test_w8a8.py (CPU paths) and tests/kernels/test_w8a8_matmul.py
(the Triton kernels): per-token quantization, the product of quantized operands, and the end-to-end error bound
against the unquantized x W^T.

Bounds, element by element (m, n):
- quantization: codes in -127..127, ``scale = absmax / 127`` (float32 division: equal to the float64 quotient
  rounded to float32), ``|code * scale - x| <= scale / 2`` up to 2^-14 of it (the float32 quotient x / scale, up to
  127, and the + 0.5 before the floor are rounded to about 2^-17 of a step);
- product of the quantized operands, against float64 ``(sum_k qx qw) s_x s_w + b``: the output's rounding to
  its dtype, ``RTOL * |exact|`` (2^-7 bfloat16 = four half-units, Triton's CPU interpreter truncating a whole unit;
  2^-10 float16; 2^-20 float32), plus the float32 epilogue (int32 -> float32, two multiplies, the bias add: four
  roundings of 2^-24 each) ``2^-20 * (|sum qx qw| s_x s_w + |b|)``, plus float16's subnormal spacing 2^-24 (ATOL).
  A product missing or counted twice, a scale of the wrong row or column, a tile written to the wrong place is off
  by a whole term or more;
- end to end, against float64 ``x W^T + b`` of the unquantized weight: the quantization error
  ``sum_k (|x_k| s_w / 2 + |w_k| s_x / 2 + s_x s_w / 4)`` (each element within half a step of its code) on top
  of the product's allowance.
"""

from __future__ import annotations

import torch

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}
EPILOGUE = 2**-20
ATOL = {torch.bfloat16: 2**-40, torch.float16: 2**-24, torch.float32: 2**-40}
"""Absolute allowance: float16's subnormal spacing below 2^-14 (a whole unit there), else negligible."""


def assert_quantized_rows(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """(codes, scales) of x [M, K] per token, checked in float64 (see the module docstring)."""
    xd = x.detach().cpu().double()
    assert codes.dtype == torch.int8 and codes.shape == x.shape, f"{what}: codes {codes.dtype} {tuple(codes.shape)}"
    assert scales.dtype == torch.float32 and scales.shape == (x.shape[0],), f"{what}: scales {tuple(scales.shape)}"
    c, s = codes.cpu().double(), scales.cpu().double()
    want = (xd.abs().amax(dim=1) / 127).float().double() if x.shape[1] else torch.zeros(x.shape[0]).double()
    assert torch.equal(s, want), f"{what}: scales differ from absmax / 127 by up to {(s - want).abs().max():.3g}"
    assert not c.numel() or c.abs().max() <= 127, f"{what}: a code beyond 127"
    error = (c * s[:, None] - xd).abs()
    assert (error <= s[:, None] / 2 * (1 + 2**-14)).all(), f"{what}: an element is more than half a step off"
    assert (c[s == 0] == 0).all(), f"{what}: a zero row has non-zero codes"


def assert_product_matches(y: torch.Tensor, x_codes, x_scales, w_codes, w_scales, bias, dtype: torch.dtype,
                           what: str, float_sums: bool = False) -> None:
    """y against float64 math on the same quantized operands (see the module docstring). ``float_sums``: y summed
    its K products in float32 (the dequantizing reference), allowed ``K 2^-24 sum_k |qx_k qw_k| s_x s_w`` more
    (the worst case of float32 accumulation)."""
    qx, qw = x_codes.cpu().double(), w_codes.cpu().double()
    scale = x_scales.cpu().double()[:, None] * w_scales.cpu().double()[None, :]
    sums = qx @ qw.T
    exact, magnitude = sums * scale, sums.abs() * scale
    if bias is not None:
        exact = exact + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    assert y.shape == exact.shape and y.dtype == dtype, f"{what}: {y.dtype} {tuple(y.shape)}"
    assert not y.isnan().any(), f"{what}: NaN in the output (an unwritten element?)"
    allowed = RTOL[dtype] * exact.abs() + EPILOGUE * magnitude + ATOL[dtype]
    if float_sums:
        allowed = allowed + qx.shape[1] * 2**-24 * (qx.abs() @ qw.abs().T) * scale
    excess = ((y.cpu().double() - exact).abs() / allowed).max().item() if y.numel() else 0.0
    assert excess <= 1, f"{what}: an element is off by {excess:.2f}x its allowance"


def assert_w8a8_within_bound(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, w_scales: torch.Tensor,
                             bias: torch.Tensor | None, what: str) -> None:
    """y = W8A8(x) against float64 x W^T + b of the unquantized ``weight`` [N, K], whose per-channel scales are
    ``w_scales`` [N]: within the quantization bound plus the product's allowance."""
    xd, wd = x.detach().cpu().double(), weight.detach().cpu().double()
    sw = w_scales.detach().cpu().double().reshape(-1)[None, :]
    sx = ((xd.abs().amax(dim=1) / 127) * (1 + 2**-14))[:, None]
    k = xd.shape[1]
    exact = xd @ wd.T
    products = xd.abs() @ wd.abs().T
    if bias is not None:
        exact = exact + bias.detach().cpu().double()
        products = products + bias.detach().cpu().double().abs()
    # Half a step per element (2^-14 more for the float32 rounding of x / s, see assert_quantized_rows).
    quantization = (1 + 2**-14) * (xd.abs().sum(dim=1, keepdim=True) * sw / 2
                                   + wd.abs().sum(dim=1)[None, :] * sx / 2 + k * sx * sw / 4)
    allowed = RTOL[y.dtype] * (exact.abs() + quantization) + EPILOGUE * (products + quantization) + quantization
    assert y.shape == exact.shape, f"{what}: shape {tuple(y.shape)}"
    excess = ((y.detach().cpu().double() - exact).abs() / (allowed + ATOL[y.dtype])).max().item()
    assert excess <= 1, f"{what}: an element is off by {excess:.2f}x its bound"
