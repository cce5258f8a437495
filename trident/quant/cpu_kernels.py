"""Weight-only quantized matmuls on the CPU through torch's packed kernels, for the few-row (decode) case.

Both kernels read the weight's codes as they are stored (int8: one byte, int4: half a byte per weight) and
multiply them with bfloat16 activations; the torch reference (dequantize, then matmul) in
:mod:`trident.quant.linear` is what they are tested against. Every format is first put in the affine form
``w = scales * c + offsets`` (:func:`trident.quant.affine.affine_from_rtn`), so symmetric, asymmetric and
GGUF-native weights share one path.

- int8, one group per row (per-channel): ``torch._weight_int8pack_mm(x, codes, scales)`` computes
  ``(x @ codes^T) * scales``; a per-row offset adds ``sum(x) * offsets``.
- int4, groups of 32/64/128 along K: ``torch._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zeros)``
  computes ``x @ ((c - 8) * scale + zero)^T`` per group, so ``zero = offsets + 8 * scales``. The codes are
  re-packed once into the kernel's own blocked layout (:class:`Int4Packed`, which needs N to be a multiple
  of 16), kept beside the stored codes. The kernel takes its scales and zeros in the activations' dtype: in
  bfloat16 a scale carries a relative rounding error of at most 2^-9, which moves a weight by at most 1/64 of
  its quantization step (the unquantized bf16 path rounds every weight itself by as much relative error).

- int8 in groups (GGUF's Q8_0 among them) through the int4 kernel: a code q is 16 hi + lo with hi = q >> 4
  (-8..7) and lo = q & 15, so one weight becomes two int4 weights side by side, ``16 s hi + s lo + b``
  (:meth:`Int4Packed.pack_int8`), and the activations go in twice (``[x, x]``, 2K wide). Exact in the same
  sense as the int4 path (scales and zeros in the activations' dtype); the codes it reads are the same byte per
  weight, and a tied LM head of 49152 x 576 (SmolLM2's Q8_0 table) takes 2.5 ms on 2 Xeon cores against 4.0 in
  bfloat16 matrix-vector (weights read from memory, not cache).

With more rows both kernels do no better than dequantizing once and running a bf16 GEMM (they do not reuse a
weight across rows), so the callers fall back beyond ``*_MAX_ROWS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_MAX_ROWS = 16
"""Most rows the int8 kernel takes: 3072 x 576 on 2 Xeon cores: 102 us against 1,980 for dequantize + bf16 at
one row, 801 against 1,597 at 16, 2,958 against 1,850 at 64."""
INT4_MAX_ROWS = 16
"""Most rows the int4 kernel takes (same reason as INT8_MAX_ROWS)."""
INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group lengths torch's int4 CPU kernel supports."""
INT4_N_MULTIPLE = 16
"""torch's int4 CPU packer needs the output features to be a multiple of this."""


def kernel_dtype_ok(x: torch.Tensor) -> bool:
    """Both kernels: bfloat16 activations on the CPU (with float32 ones torch's kernels are slower than the
    reference, with float16 ones many times slower)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def int8_matmul(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                offsets: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] bf16 times int8 ``codes`` [N, K] (64-byte aligned), per-row float32 ``scales`` [N] and
    ``offsets`` [N] (None: all zero) -> [M, N] in rows' dtype."""
    y = torch._weight_int8pack_mm(rows, codes, scales.to(rows.dtype))
    if offsets is None:
        return y
    return (y.float() + rows.float().sum(dim=1, keepdim=True) * offsets).to(rows.dtype)


@dataclass(frozen=True)
class Int4Packed:
    """An int4 weight in torch's CPU kernel layout."""

    packed: torch.Tensor
    """uint8, the kernel's blocked layout of the unsigned codes."""
    scale_and_zeros: torch.Tensor
    """[groups, N, 2] in the activations' dtype: (scale, zero) with w = (c - 8) * scale + zero."""
    group_size: int
    out_features: int

    @staticmethod
    def supports(out_features: int, group_size: int) -> bool:
        return group_size in INT4_GROUP_SIZES and out_features % INT4_N_MULTIPLE == 0

    @staticmethod
    def packed_bytes(out_features: int, in_features: int, group_size: int, dtype: torch.dtype) -> int:
        """Bytes :meth:`pack` allocates for an [out_features, in_features] weight: two codes a byte, and a scale and
        zero per group and row in ``dtype``."""
        element = torch.empty((), dtype=dtype).element_size()
        return out_features * in_features // 2 + in_features // group_size * out_features * 2 * element

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
             dtype: torch.dtype) -> Int4Packed:
        """``codes`` unsigned 0..15 as any integer dtype [N, K]; ``scales``/``offsets`` float32 [N, K / group]."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        zeros = offsets + 8.0 * scales
        scale_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, scale_and_zeros, group_size, codes.shape[0])

    @classmethod
    def pack_int8(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                  dtype: torch.dtype) -> Int4Packed:
        """int8 ``codes`` [N, K] with float32 ``scales`` / ``offsets`` (None: zero) [N, K / group] as an int4 weight
        [N, 2K]: first the high parts (hi + 8, scale 16 s, offset b - 128 s), then the low parts (lo, scale s). Its
        :meth:`matmul` takes ``[x, x]``."""
        wide = codes.to(torch.int32)
        hi, lo = (wide >> 4) + 8, wide & 15
        offsets = torch.zeros_like(scales) if offsets is None else offsets
        return cls.pack(torch.cat((hi, lo), dim=1), torch.cat((16.0 * scales, scales), dim=1),
                        torch.cat((offsets - 128.0 * scales, torch.zeros_like(scales)), dim=1), group_size, dtype)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, K] (bf16) -> [M, N]."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scale_and_zeros)
