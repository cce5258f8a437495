"""Giving freed heap memory back to the operating system after loading a model on the CPU.

Loading converts and copies tensors (GGUF blocks dequantized, codes re-laid for the CPU kernels); glibc keeps much of
what is freed afterwards in its heap, resident though unused: 50 MB for the default Q4_1 model, 250 MB dequantized to
float32 (measured in session 14, docs/benchmarks.md). ``malloc_trim(0)`` returns it. Elsewhere (musl, macOS,
Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free memory to the operating system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
