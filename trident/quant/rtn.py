"""Round-to-nearest (RTN) weight-only quantization of a weight [N, K] to int8 or int4 codes with float32 scales.

Groups run along K (the input dimension): ``group_size=None`` is one group per output channel (row), otherwise
each row is cut into ``K / group_size`` groups of consecutive inputs. K must be a multiple of the group size
(a :class:`TridentError` names the module otherwise; no padding is done).

Codes:
- symmetric int8: ``q = round(w / s)`` in -127..127 with ``s = absmax / 127``, stored as int8.
- symmetric int4: ``q = round(w / s)`` in -7..7 with ``s = absmax / 7``. -8 is never produced: with the scale
  set by absmax / 7 every ``|w / s| <= 7``, and using -8 would need a scale of absmax / 8 that clips the
  largest positive weight; a range symmetric about zero keeps ``w -> -w`` exact. Stored as the unsigned nibble
  ``q + 8`` (1..15).
- asymmetric: the group's range ``[min(lo, 0), max(hi, 0)]`` (extended to contain 0, so that the zero point is a
  code and 0.0 is exact) maps to 0..15 (int4) / 0..255 (int8): ``s = (hi - lo) / qmax``, integer zero point
  ``z = round(-lo / s)``, ``q = clamp(round(w / s) + z, 0, qmax)``, dequantized ``(q - z) * s``. int4 codes
  are stored as unsigned nibbles, int8 codes as int8 ``q - 128`` (-128..127: torch's int8 CPU kernel then takes
  them as they are, the zero point going into a per-row correction); zero points as uint8, one per group.

- float zero points (``float_zero_points=True``, asymmetric only; not produced by :func:`quantize`, they hold
  GGUF Q4_1 weights as the file stores them): unsigned codes 0..qmax, a float32 offset ``m`` per group in
  ``zeros``, dequantized ``s * q + m``.

Every element then satisfies ``|w - dequantize(q)| <= s / 2`` (up to float32 rounding of ``w / s``).

int4 packing: two codes per uint8 along K: byte ``j`` of a row holds element ``2j`` in its low nibble (bits
0-3) and element ``2j + 1`` in its high nibble (bits 4-7); K must be even.

Scales are float32 ([N, K / group_size], or [N, 1] per channel): the scale is the step of the code grid, so
its own rounding error multiplies every weight of the group; bfloat16 would add up to 2^-9 relative error to
each weight (a sizeable fraction of int8's step), float16 underflows for tiny groups. They cost 32 bits per
group (0.25 bits per weight at group 128), counted in the on-disk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from trident.errors import TridentError
from trident.quant import BITS, GROUP_SIZES

DEFAULT_MODULES = ("model.layers.*",)
"""Module-name patterns (fnmatch) quantized by default: every Linear of the decoder layers."""
NEVER_QUANTIZED = ("lm_head", "*embed*")
"""Never quantized whatever the patterns say: the LM head and embeddings."""


@dataclass(frozen=True)
class QuantConfig:
    """How round-to-nearest quantizes the weights of a model's Linear layers."""

    bits: int = 8
    """4 or 8 bits per weight."""
    group_size: int | None = None
    """None: one scale per output channel; 32, 64 or 128: one scale per that many consecutive inputs (K)."""
    symmetric: bool = True
    """True: codes centred on zero, no zero point; False: min/max range with an integer zero point per group."""
    float_zero_points: bool = False
    """Asymmetric int4 only: zero points are float32 offsets m (w = s q + m, GGUF Q4_1's layout) instead of integer
    codes z (w = s (q - z)). Weights loaded from such files; round-to-nearest never produces them."""
    modules: tuple[str, ...] = DEFAULT_MODULES
    """fnmatch patterns over module names (``model.layers.0.self_attn.qkv_proj``); the LM head and embeddings
    are never quantized."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise TridentError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise TridentError(f"group size must be one of {GROUP_SIZES} or None (per channel), got "
                               f"{self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TridentError(f"symmetric must be True or False, got {self.symmetric!r}")
        if not isinstance(self.float_zero_points, bool) or (self.float_zero_points and (
                self.symmetric or self.bits != 4)):
            raise TridentError(f"float_zero_points must be a bool and needs symmetric=False and bits=4, got "
                               f"{self.float_zero_points!r} with symmetric={self.symmetric!r}, bits={self.bits!r}")
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            raise TridentError(f"modules must be a non-empty tuple of name patterns, got {self.modules!r}")

    @property
    def qmax(self) -> int:
        """The largest code: 127 / 7 symmetric (codes -qmax..qmax), 255 / 15 asymmetric (codes 0..qmax)."""
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2 ** self.bits - 1


class QuantizedWeight(NamedTuple):
    """A weight [N, K] as stored: ``qweight`` int8 [N, K] (int8: symmetric codes, or asymmetric codes minus 128)
    or uint8 [N, K / 2] (int4, packed); ``scales`` float32 [N, groups]; ``zeros`` uint8 [N, groups] or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


ASYMMETRIC_INT8_OFFSET = 128
"""Asymmetric int8 codes 0..255 are stored minus this, as int8."""
INT4_ZERO_POINT = 8
"""Symmetric int4 codes -8..7 are stored plus this (0..15): their affine offset is -8 x scale."""


def group_size_of(config: QuantConfig, in_features: int) -> int:
    """The group length along K for a weight of ``in_features`` inputs (K itself per channel)."""
    group = config.group_size or in_features
    if in_features % group:
        fitting = ", ".join(str(g) for g in GROUP_SIZES if in_features % g == 0) or "none: use per channel"
        raise TridentError(f"K = {in_features} inputs is not a multiple of the group size {group}; choose a group "
                           f"size that divides it ({fitting}) or leave the module out")
    if config.bits == 4 and in_features % 2:
        raise TridentError(f"int4 packs two codes per byte along K, which needs an even K, got {in_features}")
    return group


Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Tensor name (qweight, scales, zeros) -> (shape, dtype)."""


def stored_layout(out_features: int, in_features: int, config: QuantConfig) -> Layout:
    """(shape, dtype) of each tensor a weight [out_features, in_features] is stored as (:class:`QuantizedWeight`'s
    fields; ``zeros`` only when asymmetric), from its shape alone."""
    groups = in_features // group_size_of(config, in_features)
    layout = {"qweight": ((out_features, in_features // 2), torch.uint8) if config.bits == 4
              else ((out_features, in_features), torch.int8),
              "scales": ((out_features, groups), torch.float32)}
    if not config.symmetric:
        layout["zeros"] = ((out_features, groups), torch.float32 if config.float_zero_points else torch.uint8)
    return layout


def quantized_bytes(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bytes a weight [out_features, in_features] takes as :class:`QuantizedWeight`, from its shape alone."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in stored_layout(out_features, in_features, config).values())


def quantize(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] (any float dtype; computed in float32) by round-to-nearest."""
    if weight.dim() != 2:
        raise TridentError(f"quantize expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if config.float_zero_points:
        raise TridentError("round-to-nearest produces integer zero points; float_zero_points is for loaded weights")
    n, k = weight.shape
    group = group_size_of(config, k)
    w = weight.detach().to(torch.float32).reshape(n, k // group, group)
    grid = group_grid(w, config)
    codes = round_to_grid(w, grid.scales[..., None], None if grid.zeros is None else grid.zeros[..., None], config)
    return pack_codes(codes.reshape(n, k), grid, config)


class Grid(NamedTuple):
    """The code grid of each group: float32 ``scales`` [..., groups] and integer ``zeros`` (int32, asymmetric)
    or None (symmetric)."""

    scales: torch.Tensor
    zeros: torch.Tensor | None


def group_grid(w: torch.Tensor, config: QuantConfig) -> Grid:
    """The grid of each group of ``w`` [..., groups, group_size] (float32), from its values (see the module
    docstring): symmetric ``s = absmax / qmax``; asymmetric ``s = (hi - lo) / qmax``, ``z = round(-lo / s)``."""
    qmax = config.qmax
    # Divisions by a tensor, never by a Python number: CUDA divides by a scalar through its reciprocal, which
    # moves a scale by an ulp against the CPU's and flips codes that sit on a rounding tie.
    qmax_t = torch.tensor(float(qmax), device=w.device)
    if config.symmetric:
        scales = w.abs().amax(dim=-1) / qmax_t
        return Grid(torch.where(scales > 0, scales, torch.ones_like(scales)), None)  # an all-zero group: codes 0
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scales = (hi - lo) / qmax_t
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return Grid(scales, torch.round(-lo / scales).clamp_(0, qmax).to(torch.int32))


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  config: QuantConfig) -> torch.Tensor:
    """Codes (int32) of ``w`` (float32) on the grid ``scales`` / ``zeros`` (broadcast against ``w``): symmetric
    ``clamp(round(w / s), -qmax, qmax)``, asymmetric ``clamp(round(w / s) + z, 0, qmax)``."""
    qmax = config.qmax
    if zeros is None:
        return torch.round(w / scales).clamp_(-qmax, qmax).to(torch.int32)
    return (torch.round(w / scales).to(torch.int32) + zeros).clamp_(0, qmax)


def grid_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The values (float32) that ``codes`` stand for on the grid: ``codes * s`` or ``(codes - z) * s``."""
    return (codes if zeros is None else codes - zeros).to(torch.float32) * scales


def pack_codes(codes: torch.Tensor, grid: Grid, config: QuantConfig) -> QuantizedWeight:
    """Codes [N, K] (int32, from :func:`round_to_grid`) and the grid [N, groups] as stored."""
    if config.bits == 4:
        qweight = pack_int4(codes + INT4_ZERO_POINT if config.symmetric else codes)
    else:
        qweight = (codes if config.symmetric else codes - ASYMMETRIC_INT8_OFFSET).to(torch.int8)
    zeros = None if grid.zeros is None else grid.zeros.to(torch.uint8).contiguous()
    return QuantizedWeight(qweight.contiguous(), grid.scales.contiguous(), zeros)


def dequantize(q: QuantizedWeight, config: QuantConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] that ``q`` stands for, in ``dtype`` (computed in float32, or float64 for float64). On the
    CPU, float32 and bfloat16 come from the native library's one-pass copy of this arithmetic where it is built
    (trident/native/qmatmul.py: dequantize_stored, bit for bit the same)."""
    if dtype in (torch.float32, torch.bfloat16) and q.qweight.device.type == "cpu":
        from trident.native.qmatmul import dequantize_stored

        w = dequantize_stored(q, config, dtype)
        if w is not None:
            return w
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if config.bits == 4:
        codes = unpack_int4(q.qweight) - (INT4_ZERO_POINT if config.symmetric else 0)
    else:
        codes = q.qweight.to(torch.int32) + (0 if config.symmetric else ASYMMETRIC_INT8_OFFSET)
    n, k = codes.shape
    groups = q.scales.shape[1]
    w = codes.to(compute).reshape(n, groups, k // groups)
    if q.zeros is not None and config.float_zero_points:
        return (w * q.scales.to(compute)[..., None] + q.zeros.to(compute)[..., None]).reshape(n, k).to(dtype)
    if q.zeros is not None:
        w = w - q.zeros.to(compute)[..., None]
    return (w * q.scales.to(compute)[..., None]).reshape(n, k).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (K even) -> uint8 [N, K / 2]: element 2j in the low nibble, 2j + 1 in the high one."""
    if codes.shape[-1] % 2:
        raise TridentError(f"int4 packing needs an even K, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int4 codes must lie in 0..15")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> codes 0..15 as int32 [N, K] (inverse of :func:`pack_int4`)."""
    p = packed.to(torch.int32)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
