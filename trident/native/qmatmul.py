"""The CPU's 8-bit integer dot-product matmul (``qmatmul.c``) for weight-only int4 / int8 affine weights.

:func:`pack` puts an :class:`~trident.quant.affine.AffineWeight` in the kernel's layout once (pairs of blocks of
32 in the "lane order" qmatmul.c describes; scales per block and offsets per group in float16, GGUF's own
precision, which moves a float32 scale by at most 2^-11 of itself; N padded to a multiple of ROWS);
:meth:`NativeQWeight.matmul` runs ``y = x W^T (+ bias)`` for a few rows of float32 or bfloat16 activations, which
the kernel quantizes to two int8 stages per block of 32 (a value and its remainder: about 16 bits) before
multiplying the integer
codes with the CPU's integer dot products. Its torch reference is
:func:`trident.quant.affine.affine_matmul_reference` (float32 dequantization and matmul): the two differ by the
activations' rounding only, which tests/quant/test_native_qmatmul.py bounds.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import torch

from trident.native.build import NATIVE, load, unavailable_reason
from trident.quant.affine import AffineWeight
from trident.quant.rtn import ASYMMETRIC_INT8_OFFSET, QuantConfig, QuantizedWeight, unpack_int4

BLOCK = 32
"""Activations are quantized per block of this many elements; group sizes must be multiples of it."""
MAX_ROWS = 16
"""Most rows of x a call takes (decode steps): beyond, a float GEMM of the dequantized weight reuses each
weight over the rows better than this row-by-row kernel."""
X_DTYPES = (torch.float32, torch.bfloat16)
LIBRARY = "tqnative"
NO_AMX_ENV = "TRIDENT_NO_AMX"
"""Set to 1 to keep 6-16-row products on the vector path where the CPU has AMX tiles (comparisons, debugging)."""


def library(march: str = NATIVE) -> ctypes.CDLL | None:
    """The native library built for ``-march=march`` with its functions typed, or None (:func:`why_unavailable`)."""
    lib = load(LIBRARY, march)
    if lib is not None and not getattr(lib, "_typed", False):
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.tq_matmul.argtypes = [p, i, i, i, i, i, p, p, p, i, i, p, p, i, i, p, i]
        lib.tq_matmul.restype = i
        lib.tq_workspace_bytes.argtypes = [i, i, i]
        lib.tq_workspace_bytes.restype = ctypes.c_long
        lib.tq_isa.restype = i
        lib.tq_pack.argtypes = [i, p, i, i, i, p, i]
        lib.tq_pack.restype = None
        lib.tq_dequantize.argtypes = [i, p, i, p, p, i, i, i, i, p, i, i]
        lib.tq_dequantize.restype = None
        lib.tq_quantize_activations.argtypes = [p, i, i, i, i, p, p, i]
        lib.tq_quantize_activations.restype = i
        lib.tq_amx_init.argtypes = [i]
        lib.tq_amx_init.restype = i
        lib.tq_amx_min_rows.restype = i
        # AMX tiles (Sapphire Rapids and later) for 6-16 activation rows, unless TRIDENT_NO_AMX=1 (comparisons)
        lib.tq_amx_init(0 if os.environ.get(NO_AMX_ENV) == "1" else 1)
        lib._typed = True
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded for this CPU."""
    return library() is not None


def why_unavailable() -> str | None:
    return unavailable_reason(LIBRARY)


def isa(lib: ctypes.CDLL | None = None) -> str:
    """The integer dot product a build uses (this CPU's by default): 'avx512-vnni', 'avx-vnni' (256-bit), 'avx2'
    or 'c' (plain C), with " + amx-int8 from N rows" where the tile path is on."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"the native qmatmul kernel is not available: {why_unavailable()}")
    name = {3: "avx512-vnni", 2: "avx-vnni", 1: "avx2", 0: "c"}[lib.tq_isa()]
    amx_rows = lib.tq_amx_min_rows()
    return name + (f" + amx-int8 from {amx_rows} rows" if amx_rows else "")


def supports(w: AffineWeight) -> bool:
    """Whether the kernel takes this weight: K and the group size multiples of BLOCK (per channel included)."""
    return w.in_features % BLOCK == 0 and w.group_size % BLOCK == 0


@dataclass
class NativeQWeight:
    """A weight in the kernel's layout (see the module doc) and the workspace its calls reuse. ``natural``: int8
    codes as stored (row-major, the caller's tensor itself: no copy; :func:`takes_natural`)."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int
    out_features: int
    in_features: int
    bias: torch.Tensor | None = None
    natural: bool = False
    _workspaces: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def matmul(self, x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """x [rows, in_features] (float32 or bfloat16, 1 to MAX_ROWS rows) -> [rows, out_features] in x's dtype,
        by ``lib`` (this CPU's build by default)."""
        lib = lib or library()
        if lib is None:
            raise RuntimeError(f"the native qmatmul kernel is not available: {why_unavailable()}")
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype not in X_DTYPES or x.device.type != "cpu":
            raise ValueError(f"x must be [rows, {self.in_features}] float32/bfloat16 on the CPU, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        rows = x.shape[0]
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"the native kernel takes 1 to {MAX_ROWS} rows, got {rows}")
        x = x.contiguous()
        y = torch.empty(rows, self.out_features, dtype=x.dtype)
        workspace = self._workspaces.get(rows)
        if workspace is None:
            workspace = torch.empty(lib.tq_workspace_bytes(rows, self.in_features, self.group_size), dtype=torch.uint8)
            self._workspaces[rows] = workspace
        bf16 = x.dtype == torch.bfloat16
        status = lib.tq_matmul(
            x.data_ptr(), bf16, rows, self.in_features, self.bits, self.natural, self.codes.data_ptr(),
            self.scales.data_ptr(),
            None if self.offsets is None else self.offsets.data_ptr(), self.group_size, self.codes.shape[0],
            None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), bf16, self.out_features,
            workspace.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"tq_matmul refused [{rows}, {self.in_features}] x int{self.bits} group "
                               f"{self.group_size}")
        return y


ROWS = 4
"""The kernel computes this many weight rows together: the packer pads N to a multiple of it."""
PAIR = 2 * BLOCK


def lane_order() -> torch.Tensor:
    """The element of a pair of blocks (0..63) that each lane-order position holds (qmatmul.c's layout)."""
    p = torch.arange(PAIR)
    return ((p // 4) % 2) * BLOCK + (p // 8) * 4 + p % 4


def takes_natural(w: AffineWeight) -> bool:
    """Whether the kernel multiplies ``w``'s codes as stored (qmatmul.c's natural order): int8, K and the group size
    multiples of a pair of blocks (64), N of ROWS, the codes contiguous."""
    return (w.bits == 8 and w.in_features % PAIR == 0 and w.group_size % PAIR == 0 and w.out_features % ROWS == 0
            and w.codes.is_contiguous())


def pack(w: AffineWeight, bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None, *,
         natural: bool = False) -> NativeQWeight:
    """``w`` (on the CPU) in the kernel's layout; :func:`supports` must hold. The codes are laid out by the
    library's tq_pack (``lib``, this CPU's build by default), or by :func:`pack_codes_torch` without one. With
    ``natural`` (:func:`takes_natural` must hold) the codes are ``w.codes`` itself, not a copy; the activations are
    then quantized with one unit per pair of blocks (qmatmul.c)."""
    if not supports(w):
        raise ValueError(f"the native kernel needs K and the group size to be multiples of {BLOCK}, got K = "
                         f"{w.in_features}, group {w.group_size}")
    if natural and not takes_natural(w):
        raise ValueError(f"natural order needs contiguous int8 codes, K and the group size multiples of {PAIR} and N "
                         f"of {ROWS}; got int{w.bits} [{w.out_features}, {w.in_features}] group {w.group_size}")
    n, k = w.out_features, w.in_features
    pairs = -(-k // PAIR)
    rows = -(-n // ROWS) * ROWS
    lib = lib or library()
    if natural:
        codes = w.codes
    elif lib is None:
        codes = pack_codes_torch(w, rows)
    else:
        codes = torch.empty(rows, pairs * PAIR // (2 if w.bits == 4 else 1), dtype=torch.uint8)
        stored = w.codes.contiguous()
        lib.tq_pack(w.bits, stored.data_ptr(), n, k, rows, codes.data_ptr(), torch.get_num_threads())
    scales = torch.zeros(rows, 2 * pairs, dtype=torch.float16)
    scales[:n, :k // BLOCK] = w.scales.repeat_interleave(w.group_size // BLOCK, dim=1).half()
    offsets = None
    if w.offsets is not None:
        offsets = torch.zeros(rows, w.scales.shape[1], dtype=torch.float16)
        offsets[:n] = w.offsets.half()
    return NativeQWeight(w.bits, codes, scales, offsets, w.group_size, n, k,
                         None if bias is None else bias.float().contiguous(), natural)


def packed_bytes(w: AffineWeight, natural: bool = False, bias: bool = False) -> int:
    """Bytes :func:`pack` allocates for ``w`` (its codes, scales and offsets read for their shapes only): the codes
    unless ``natural``, float16 scales and offsets with N padded to ROWS, and a float32 copy of a ``bias``."""
    n, k = w.out_features, w.in_features
    pairs = -(-k // PAIR)
    rows = -(-n // ROWS) * ROWS
    codes = 0 if natural else rows * pairs * PAIR // (2 if w.bits == 4 else 1)
    offsets = 0 if w.offsets is None else rows * w.scales.shape[1] * 2
    return codes + rows * 2 * pairs * 2 + offsets + (n * 4 if bias else 0)


def pack_codes_torch(w: AffineWeight, rows: int) -> torch.Tensor:
    """The codes of ``w`` in the kernel's layout, N padded to ``rows``, in torch (the reference for tq_pack)."""
    n, k = w.out_features, w.in_features
    pairs = -(-k // PAIR)
    q = unpack_int4(w.codes).to(torch.uint8) if w.bits == 4 else w.codes.view(torch.uint8)
    padded = torch.zeros(rows, pairs * PAIR, dtype=torch.uint8)
    padded[:n, :k] = q
    lanes = padded.view(rows, pairs, PAIR)[:, :, lane_order()]
    if w.bits == 4:
        return (lanes[:, :, :PAIR // 2] | (lanes[:, :, PAIR // 2:] << 4)).reshape(rows, pairs * PAIR // 2).contiguous()
    return lanes.reshape(rows, pairs * PAIR).contiguous()


def dequantize_stored(q: QuantizedWeight, config: QuantConfig, dtype: torch.dtype,
                      lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """The weight [N, K] that the stored ``q`` stands for, in float32 or bfloat16, by the library's tq_dequantize:
    bit for bit what :func:`trident.quant.rtn.dequantize` computes, in one pass (prefill products of more rows than
    the kernel takes dequantize every weight once per chunk). None without the library (``lib``: this CPU's build by
    default), for other dtypes, or K or groups not multiples of BLOCK."""
    lib = lib or library()
    if lib is None or dtype not in X_DTYPES or q.qweight.device.type != "cpu":
        return None
    codes = q.qweight.contiguous()
    n = codes.shape[0]
    k = codes.shape[1] * (2 if config.bits == 4 else 1)
    groups = q.scales.shape[1]
    if groups == 0 or k % groups or (k // groups) % BLOCK:
        return None
    if config.bits == 4:
        code_bias = -8 if config.symmetric else 0
    else:
        code_bias = 0 if config.symmetric else ASYMMETRIC_INT8_OFFSET
    scales = q.scales.to(torch.float32).contiguous()
    zeros = None if q.zeros is None else q.zeros.to(torch.float32).contiguous()
    mode = 0 if zeros is None else 2 if config.float_zero_points else 1
    out = torch.empty(n, k, dtype=dtype)
    lib.tq_dequantize(config.bits, codes.data_ptr(), code_bias, scales.data_ptr(),
                      None if zeros is None else zeros.data_ptr(), mode, n, k, groups, out.data_ptr(),
                      dtype == torch.bfloat16, torch.get_num_threads())
    return out
