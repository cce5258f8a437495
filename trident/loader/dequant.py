"""Turning stored GGUF tensor bytes into torch tensors.

Float types become views (F32, F16, BF16 keep their dtype; no copy). Block-quantized types are unpacked
to float32 with vectorized numpy code written to give bit-identical results to the reference in
``gguf.quants`` (same operations in the same order) with fewer passes over memory. numpy runs on one
thread, which keeps loading fast even when the machine's cores are busy (torch's intra-op threads
slow down many-fold under contention). Types without a path here but known to ``gguf.quants`` (Q2_K,
Q3_K, the IQ and TQ families, ...) go through that reference. Anything else is a :class:`TridentError`.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

from trident.errors import TridentError

QK_K = 256
_FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte ``start`` of every block, as a float32 column (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): the low nibbles, then the high nibbles, as ``dtype``."""
    n, k = qs.shape
    out = np.empty((n, 2 * k), dtype=dtype)
    np.bitwise_and(qs, 15, out=out[:, :k], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, k:], casting="unsafe")
    return out


def _bits(packed: np.ndarray) -> np.ndarray:
    """Little-endian bits of (n, b) bytes, as (n, 8 * b) uint8 zeros and ones."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


def _q4_0(b: np.ndarray) -> np.ndarray:
    out = _nibbles(b[:, 2:18])
    out -= 8
    out *= _f16(b, 0)
    return out


def _q4_1(b: np.ndarray) -> np.ndarray:
    out = _nibbles(b[:, 4:20])
    out *= _f16(b, 0)
    out += _f16(b, 2)
    return out


def _q5(b: np.ndarray, qh_at: int) -> np.ndarray:
    """The 5-bit values of a Q5_0/Q5_1 block: a nibble plus one high bit from the 32-bit qh field."""
    low = _nibbles(b[:, qh_at + 4 : qh_at + 20], np.uint8)
    return low | (_bits(b[:, qh_at : qh_at + 4]) << 4)


def _q5_0(b: np.ndarray) -> np.ndarray:
    out = _q5(b, 2).astype(np.float32)
    out -= 16
    out *= _f16(b, 0)
    return out


def _q5_1(b: np.ndarray) -> np.ndarray:
    out = _q5(b, 4).astype(np.float32)
    out *= _f16(b, 0)
    out += _f16(b, 2)
    return out


def _q8_0(b: np.ndarray) -> np.ndarray:
    out = b[:, 2:34].view(np.int8).astype(np.float32)
    out *= _f16(b, 0)
    return out


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins packed into the 12 scale bytes of a Q4_K/Q5_K block."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32) nibbles: each 32-byte chunk gives a low-, then a high-nibble group."""
    q = qs.reshape(-1, 4, 1, 32) >> _NIBBLE_SHIFTS.reshape(1, 1, 2, 1)
    return (q & 15).reshape(-1, 8, 32)


def _k_scaled(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d * scale) * q - (dmin * min) per 32-value group of a Q4_K/Q5_K block."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (_f16(b, 2) * mn.astype(np.float32)).reshape(n, 8, 1)
    out = q.astype(np.float32)
    out *= dl
    out -= ml
    return out.reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:
    return _k_scaled(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b: np.ndarray) -> np.ndarray:
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return _k_scaled(b, _k_nibbles(b[:, 48:176]) | ((qh & 1) << 4))


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    dl = (_f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    ql = b[:, :128].reshape(n, 2, 1, 64) >> _NIBBLE_SHIFTS.reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 15).reshape(n, 8, 32) | ((qh & 3).reshape(n, 8, 32) << 4)).view(np.int8)
    out = q.astype(np.float32)
    out -= 32
    out = out.reshape(n, 16, 16)
    out *= dl
    return out.reshape(n, QK_K)


_BLOCK_DEQUANT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def supported_types() -> list[str]:
    """Every ggml type name this loader can read."""
    reference = {t.name for t in getattr(gguf.quants, "_type_traits", {})}
    return sorted(set(_FLOAT_TYPES) | set(_BLOCK_DEQUANT) | reference)


def to_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, ...], where: str = "") -> torch.Tensor:
    """The tensor stored as ``raw`` bytes of ggml type ``type_name`` with torch ``shape``.

    ``raw`` may be (n,) bytes or (rows, row_bytes). F32/F16/BF16 come back as views of ``raw`` in their
    own dtype; quantized types as new float32 tensors.
    """
    dtype = _FLOAT_TYPES.get(type_name)
    if dtype is not None:
        return torch.from_numpy(raw).view(dtype).reshape(shape)
    fn = _BLOCK_DEQUANT.get(type_name)
    if fn is not None:
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
        return torch.from_numpy(fn(raw.reshape(-1, block_bytes))).reshape(shape)
    if type_name in supported_types():
        values = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[type_name])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
    raise TridentError(
        f"{where}GGUF tensor type {type_name} is not supported; "
        f"supported types: {', '.join(supported_types())}. "
        "Use a file quantized to one of these (e.g. Q4_K_M, Q8_0 or F16)"
    )
