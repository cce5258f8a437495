"""The one form every weight-only format is multiplied in: an affine code per group along K,

    w[n, k] = scales[n, g] * q[n, k] + offsets[n, g],   g = k // group_size,

its torch reference product, the derivation of (scales, offsets) from :mod:`trident.quant.rtn`'s stored formats,
and :func:`affine_linear`, which sends a product to the Triton kernels of trident/kernels/quant_matmul.py on CUDA
and to the reference elsewhere.

- ``codes``: int8 [N, K] (codes as they are), or uint8 [N, K / 2] holding int4 codes 0..15 two per byte along K
  (element 2j in the low nibble, 2j + 1 in the high one, as :func:`trident.quant.rtn.pack_int4`).
- ``scales``: float32 or float16 [N, G]; ``offsets``: the same dtype and shape, or None (= 0). G = K / group_size
  (1 per channel).

Every format maps onto it: RTN symmetric int8 (offsets None), asymmetric int8 stored as q - 128 (offset
s (128 - z)), symmetric int4 stored as q + 8 (offset -8 s), asymmetric int4 (offset -z s); GGUF Q8_0 (int8,
group 32, no offset), Q4_0 (offset -8 d), Q4_1 (offset m) likewise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trident.errors import TridentError
from trident.quant.rtn import ASYMMETRIC_INT8_OFFSET, INT4_ZERO_POINT, QuantConfig, QuantizedWeight, unpack_int4

AFFINE_SCALE_DTYPES = (torch.float32, torch.float16)
"""Dtypes scales and offsets may have."""


class AffineWeight(NamedTuple):
    """A weight [N, K] as affine codes (see the module docstring)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    """8: int8 codes [N, K]; 4: packed uint8 [N, K / 2]."""
    zero_point: int = 0
    """When not 0, every offset is exactly -zero_point x its scale (symmetric int4 stored as q + 8, GGUF Q4_0):
    kernels that can may take the offsets from the codes' sums instead of reading them (the CUDA batch-1 kernel).
    ``offsets`` holds them all the same."""

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes a product reads from the weight: codes, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets) if t is not None)


def check_affine(w: AffineWeight) -> None:
    """Raise ValueError unless ``w`` has consistent dtypes and shapes (a programming error, not a user's)."""
    if w.bits not in (4, 8) or w.codes.dtype != (torch.uint8 if w.bits == 4 else torch.int8) or w.codes.dim() != 2:
        raise ValueError(f"codes: {w.bits} bits need {'uint8 [N, K/2]' if w.bits == 4 else 'int8 [N, K]'}, "
                         f"got {w.codes.dtype} {tuple(w.codes.shape)}")
    n, k = w.out_features, w.in_features
    if w.scales.dtype not in AFFINE_SCALE_DTYPES or w.scales.dim() != 2 or w.scales.shape[0] != n:
        raise ValueError(f"scales must be float32/float16 [{n}, G], got {w.scales.dtype} {tuple(w.scales.shape)}")
    groups = w.scales.shape[1]
    if groups < 1 or k % groups or (w.bits == 4 and groups > 1 and w.group_size % 2):
        raise ValueError(f"K = {k} does not cut into {groups} groups")
    if w.offsets is not None and (w.offsets.shape != w.scales.shape or w.offsets.dtype != w.scales.dtype):
        raise ValueError(f"offsets must match scales {w.scales.dtype} {tuple(w.scales.shape)}, got "
                         f"{w.offsets.dtype} {tuple(w.offsets.shape)}")
    if w.zero_point and (w.bits != 4 or w.offsets is None or not 0 < w.zero_point < 16):
        raise ValueError(f"a zero point ({w.zero_point}) goes with int4 codes and their offsets")


def affine_from_rtn(q: QuantizedWeight, config: QuantConfig) -> AffineWeight:
    """(codes, scales, offsets) of an RTN weight as stored: the codes and float32 scales are the stored tensors
    themselves (no copy); offsets are computed once, in float32 (None for symmetric int8)."""
    if config.symmetric != (q.zeros is None):
        raise ValueError("zero points must be present exactly for asymmetric weights")
    scales = q.scales
    if config.bits == 8:
        offsets = None
        if not config.symmetric:  # stored q - 128: s (q - z) = s stored + s (128 - z)
            offsets = scales * (ASYMMETRIC_INT8_OFFSET - q.zeros.to(torch.float32))
    elif config.symmetric:  # stored q + 8
        offsets = -float(INT4_ZERO_POINT) * scales
    elif config.float_zero_points:  # GGUF Q4_1: w = s q + m, m stored as is
        offsets = q.zeros.to(torch.float32)
    else:
        offsets = -q.zeros.to(torch.float32) * scales
    return AffineWeight(q.qweight, scales, None if offsets is None else offsets.contiguous(), config.bits,
                        affine_zero_point(config))


def affine_zero_point(config: QuantConfig) -> int:
    """AffineWeight.zero_point of a format's weights: 8 for symmetric int4 (stored q + 8), else 0."""
    return INT4_ZERO_POINT if config.bits == 4 and config.symmetric else 0


def affine_dequantize(w: AffineWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] in ``dtype``, computed in float32 (float64 for float64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    codes = unpack_int4(w.codes) if w.bits == 4 else w.codes
    n, k = codes.shape
    groups = w.scales.shape[1]
    full = codes.to(compute).reshape(n, groups, k // groups) * w.scales.to(compute)[..., None]
    if w.offsets is not None:
        full = full + w.offsets.to(compute)[..., None]
    return full.reshape(n, k).to(dtype)


def affine_matmul_reference(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> x W^T (+ b) [M, N] in x's dtype: W dequantized in float32, float32 matmul, one rounding."""
    y = x.float() @ affine_dequantize(w, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def takes_kernel(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None) -> bool:
    """Whether :func:`affine_linear` runs the Triton kernels: Triton on CUDA, a 16-bit x with contiguous rows of
    K elements, contiguous codes/scales/offsets and bias of x's dtype (if any), the group size per channel or a
    multiple of 16. Shapes, dtypes and the device only, never values: the choice holds across CUDA-graph capture
    and replay."""
    from trident.models import ops

    if not (ops.uses_kernels(x) and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] == w.in_features
            and w.codes.is_contiguous() and w.scales.is_contiguous()
            and (w.offsets is None or w.offsets.is_contiguous())
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))):
        return False
    from trident.kernels.quant_matmul import supports

    return supports(w)


def affine_linear(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> x W^T (+ b) [..., N]: the Triton kernels where :func:`takes_kernel` (one row: the CUDA integer
    kernel of trident/native/gemv_cuda.cu instead, where nvcc built it), else the reference."""
    if x.shape[-1] != w.in_features:
        raise TridentError(f"input has {x.shape[-1]} features, the quantized weight takes {w.in_features}")
    rows = x.reshape(-1, x.shape[-1])
    if takes_kernel(x, w, bias):
        from trident.kernels.quant_matmul import quant_matmul
        from trident.native import gemv_cuda

        if rows.stride(1) != 1:
            rows = rows.contiguous()
        y = gemv_cuda.gemv(rows, w, bias) if gemv_cuda.takes(rows, w, bias) else quant_matmul(rows, w, bias)
    else:
        y = affine_matmul_reference(rows, w, bias)
    return y.view(*x.shape[:-1], w.out_features)
