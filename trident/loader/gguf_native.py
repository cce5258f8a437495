"""GGUF weights kept in their own quantized formats: Q4_0, Q4_1 and Q8_0 blocks become trident's quantized
weights (:class:`trident.quant.rtn.QuantizedWeight`) with the same codes, scales and offsets, so nothing is
requantized and the weights keep their file's size in memory.

ggml blocks hold 32 consecutive weights of a row (along K):

- Q4_0 (18 bytes): float16 ``d``, then 16 bytes of nibbles; weight ``i < 16`` is the low nibble of byte ``i``,
  weight ``i + 16`` its high nibble; value ``d (q - 8)``. That is trident's symmetric int4 with groups of 32
  (stored nibble ``q``, dequantized ``s (q - 8)``), the scale ``d`` widened to float32 exactly.
- Q4_1 (20 bytes): float16 ``d`` and ``m``, then 16 bytes of nibbles as Q4_0; value ``d q + m``: asymmetric
  int4 with float zero points (``QuantConfig.float_zero_points``), ``m`` kept as a float32 offset.
- Q8_0 (34 bytes): float16 ``d``, then 32 int8 ``q``; value ``d q``: symmetric int8 with groups of 32 (codes
  may be -128, which trident's own quantizer never writes but every kernel reads).

The nibbles are re-packed into trident's order (weight ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in
its high one); values are bit-for-bit those of the dequantizing loader (tests/loader).
"""

from __future__ import annotations

import numpy as np
import torch

from trident.quant.rtn import QuantConfig, QuantizedWeight

BLOCK = 32
"""Weights per ggml block of these types."""
NATIVE_CONFIGS: dict[str, QuantConfig] = {
    "Q4_0": QuantConfig(bits=4, group_size=BLOCK, symmetric=True),
    "Q4_1": QuantConfig(bits=4, group_size=BLOCK, symmetric=False, float_zero_points=True),
    "Q8_0": QuantConfig(bits=8, group_size=BLOCK, symmetric=True),
}
"""ggml types kept as codes, and the trident format each becomes."""
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _f16_column(blocks: np.ndarray, start: int, rows: int) -> torch.Tensor:
    """The float16 field at byte ``start`` of every block, as float32 [rows, blocks per row]."""
    values = blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(values.reshape(rows, -1))


def _repacked_nibbles(qs: np.ndarray, rows: int) -> torch.Tensor:
    """ggml's 16 nibble bytes per block (weights i and i + 16 in byte i) -> trident's packing [rows, K / 2]."""
    codes = np.concatenate((qs & 15, qs >> 4), axis=1)  # [blocks, 32] in K order
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, -1))


def native_weight(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight:
    """The weight [N, K] stored as ``raw`` bytes of ggml type ``type_name`` (one of :data:`NATIVE_CONFIGS`)."""
    rows, k = shape
    blocks = np.ascontiguousarray(raw).reshape(-1, _BLOCK_BYTES[type_name])
    if type_name == "Q8_0":
        codes = torch.from_numpy(blocks[:, 2:34].copy().view(np.int8).reshape(rows, k))
        return QuantizedWeight(codes, _f16_column(blocks, 0, rows), None)
    if type_name == "Q4_0":
        return QuantizedWeight(_repacked_nibbles(blocks[:, 2:18], rows), _f16_column(blocks, 0, rows), None)
    return QuantizedWeight(_repacked_nibbles(blocks[:, 4:20], rows), _f16_column(blocks, 0, rows),
                           _f16_column(blocks, 2, rows))
