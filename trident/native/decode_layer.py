"""A Llama-form decoder layer's decode step in one C call (``decode_layer.c``), for trident/engine/cpu_decode.py.

:class:`NativeLayer` binds one layer's packed projections (:class:`~trident.native.qmatmul.NativeQWeight`), norm
weights, rotation frequencies and KV-cache tensors into the C struct once; :class:`NativeStep` holds one step's
rows, positions, block tables and the float32 residual stream, and :func:`run_layers` runs every layer over it.
The weights and caches stay owned by the model and the engine: the structs only point at them, and
:class:`NativeLayer` keeps references so that they outlive it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trident.native.qmatmul import NativeQWeight, library

ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
"""Activation names decode_layer.c computes (Hugging Face's ``hidden_act``) -> its code."""

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
CACHE_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
"""KV-cache element dtypes decode_layer.c reads and writes -> its cache_format code (int8: trident/quant/kv.py's
codes with a float32 scale per (kv head, slot))."""


class _Weight(ctypes.Structure):
    _fields_ = [("bits", _I), ("natural", _I), ("k", _I), ("n", _I), ("n_out", _I), ("group_size", _I), ("codes", _P),
                ("scales", _P), ("offsets", _P), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
                ("activation", _I), ("unit_offset", _I), ("window", _I), ("cache_format", _I),
                ("eps", _F), ("head_eps", _F), ("scale", _F),
                ("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("inv_freq", _P),
                ("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight), ("down", _Weight),
                ("key_cache", _P), ("value_cache", _P), ("key_scale", _P), ("value_scale", _P),
                ("slots", ctypes.c_long)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I), ("max_blocks", _I), ("block_size", _I), ("max_context", _I), ("threads", _I),
                ("positions", _P), ("block_tables", _P), ("residual", _P), ("workspace", _P)]


def _typed_library(lib: ctypes.CDLL | None = None) -> ctypes.CDLL:
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the native library is not available")
    if not getattr(lib, "_layer_typed", False):
        lib.tq_decode_layer.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step)]
        lib.tq_decode_layer.restype = _I
        lib.tq_layer_workspace_bytes.argtypes = [ctypes.POINTER(_Layer), _I, _I]
        lib.tq_layer_workspace_bytes.restype = ctypes.c_long
        lib._layer_typed = True
    return lib


def _weight(w: NativeQWeight) -> _Weight:
    return _Weight(w.bits, w.natural, w.in_features, w.codes.shape[0], w.out_features, w.group_size, w.codes.data_ptr(),
                   w.scales.data_ptr(), None if w.offsets is None else w.offsets.data_ptr(),
                   None if w.bias is None else w.bias.data_ptr())


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's C call needs, as torch objects (validated by :class:`NativeLayer`)."""

    qkv: NativeQWeight
    o: NativeQWeight
    gate_up: NativeQWeight
    down: NativeQWeight
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    eps: float
    head_eps: float
    inv_freq: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    activation: str
    window: int | None
    key_cache: torch.Tensor
    """[kv_heads, slots, head_dim], float32, bfloat16 or int8 codes (a view of the engine's cache)."""
    value_cache: torch.Tensor
    key_scale: torch.Tensor | None = None
    """int8 caches: float32 [kv_heads, slots], one scale per (kv head, slot) (trident/quant/kv.py)."""
    value_scale: torch.Tensor | None = None


class NativeLayer:
    """One layer's C struct and the tensors it points at."""

    def __init__(self, spec: LayerSpec) -> None:
        hidden = spec.input_norm.numel()
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"decode_layer.c computes {', '.join(ACTIVATIONS)}, not {spec.activation!r}")
        if spec.key_cache.dtype not in CACHE_FORMATS or not spec.key_cache.is_contiguous():
            raise ValueError(f"the cache must be contiguous float32, bfloat16 or int8, got {spec.key_cache.dtype}")
        quantized = spec.key_cache.dtype == torch.int8
        if quantized != (spec.key_scale is not None and spec.value_scale is not None) or (quantized and not all(
                t.dtype == torch.float32 and t.is_contiguous() and t.shape == spec.key_cache.shape[:2]
                for t in (spec.key_scale, spec.value_scale))):
            raise ValueError("an int8 cache needs float32 [kv_heads, slots] key and value scales (and only it)")
        if spec.qkv.out_features != (spec.heads + 2 * spec.kv_heads) * spec.head_dim or spec.qkv.in_features != hidden:
            raise ValueError("the qkv projection does not match the heads")
        inter = spec.down.in_features
        if spec.gate_up.out_features != 2 * inter or spec.o.out_features != hidden or spec.down.out_features != hidden:
            raise ValueError("the projections do not chain")
        self.keep = [_f32(spec.input_norm), _f32(spec.post_norm), _f32(spec.q_norm), _f32(spec.k_norm),
                     _f32(spec.inv_freq), spec.qkv, spec.o, spec.gate_up, spec.down, spec.key_cache,
                     spec.value_cache, spec.key_scale, spec.value_scale]
        norms = [None if t is None else t.data_ptr() for t in self.keep[:5]]
        self.struct = _Layer(
            hidden, spec.heads, spec.kv_heads, spec.head_dim, inter, ACTIVATIONS[spec.activation], 0,
            spec.window or 0, CACHE_FORMATS[spec.key_cache.dtype], spec.eps, spec.head_eps, spec.scale,
            *norms, _weight(spec.qkv), _weight(spec.o), _weight(spec.gate_up), _weight(spec.down),
            spec.key_cache.data_ptr(), spec.value_cache.data_ptr(),
            spec.key_scale.data_ptr() if quantized else None, spec.value_scale.data_ptr() if quantized else None,
            spec.key_cache.shape[1])


@dataclass
class NativeStep:
    """A decode step's inputs for the C layers, and the workspace they share (grown to the longest context)."""

    hidden_size: int
    _workspace: torch.Tensor | None = field(default=None, repr=False)
    _capacity: tuple[int, int] = (0, 0)

    def run(self, layers: list[NativeLayer], residual: torch.Tensor, positions: Sequence[int],
            block_tables: Sequence[Sequence[int]], block_size: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
        """residual [rows, hidden] float32 (the embeddings) -> the residual stream after every layer (in place);
        writes each layer's new keys and values into its cache. ``lib``: this CPU's build by default."""
        lib = _typed_library(lib)
        rows = len(positions)
        context = max(positions) + 1
        need = (rows, 1 << (context - 1).bit_length())
        if self._workspace is None or need[0] > self._capacity[0] or need[1] > self._capacity[1]:
            need = (max(need[0], self._capacity[0]), max(need[1], self._capacity[1]))
            size = lib.tq_layer_workspace_bytes(ctypes.byref(layers[0].struct), *need)
            self._workspace, self._capacity = torch.empty(size, dtype=torch.uint8), need
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([[*t, *(0,) * (width - len(t))] for t in block_tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int32)
        shape = (rows, self.hidden_size)
        if residual.dtype != torch.float32 or not residual.is_contiguous() or residual.shape != shape:
            raise ValueError(f"residual must be contiguous float32 [{rows}, {self.hidden_size}], got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        step = _Step(rows, width, block_size, self._capacity[1], torch.get_num_threads(), pos.data_ptr(),
                     tables.data_ptr(), residual.data_ptr(), self._workspace.data_ptr())
        for index, layer in enumerate(layers):
            if lib.tq_decode_layer(ctypes.byref(layer.struct), ctypes.byref(step)) != 0:
                raise RuntimeError(f"tq_decode_layer refused layer {index} (rows {rows}, positions {positions})")
        return residual
