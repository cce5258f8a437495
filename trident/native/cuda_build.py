"""Compile trident's CUDA kernels (``*.cu`` in this folder) with ``nvcc`` for the GPU in use, on first use, and
load them with ctypes: the CUDA counterpart of build.py (same cache folder, same ``TRIDENT_NO_NATIVE`` switch).

A library is a shared object with C entry points that take raw device pointers and the caller's CUDA stream
(torch's current stream), so its launches join torch's stream order and CUDA-graph capture. It is compiled for the
device's own architecture (``-gencode arch=compute_XY,code=sm_XY``: Hopper's instructions on an H100/H200) and
cached under a hash of the source, the flags, nvcc's version and the architecture. No nvcc (``$CUDA_HOME/bin``,
``PATH`` or ``/usr/local/cuda/bin``), no CUDA device, or a failed build: :func:`load_cuda` gives None and callers
keep their Triton kernels, with :func:`cuda_unavailable_reason` saying why.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
from pathlib import Path

from trident.errors import TridentError
from trident.native.build import DISABLE_ENV, SOURCE_DIR, cached_library_path, compile_cached, tool_version

CUDA_LIBRARIES = {"tqgemv": ("gemv_cuda.cu",), "tqmoe": ("moe_gemv_cuda.cu", "moe_route_cuda.cu"),
                  "tqmoeb": ("moe_batched_cuda.cu",), "tqdecode8": ("paged_decode_cuda.cu",)}
"""Library name -> its CUDA sources (gemv_cuda.cu: the batch-1 integer weight-only matmul; moe_gemv_cuda.cu and
moe_route_cuda.cu: an MoE layer's int8 experts and its router for one token; moe_batched_cuda.cu: int4 experts for a
batch of tokens; paged_decode_cuda.cu: decode attention over an 8-bit KV cache). Every ``*.cuh`` header of the folder
is part of each library's cache key."""
NVCC_FLAGS = ("-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "--expt-relaxed-constexpr")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    found = shutil.which("nvcc")
    candidates += [Path(found)] if found else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


@functools.cache
def _build(name: str, arch: str, defines: tuple[tuple[str, int], ...] = ()) -> tuple[ctypes.CDLL | None, str | None]:
    if name not in CUDA_LIBRARIES:
        raise TridentError(f"no CUDA library {name!r}; have {', '.join(CUDA_LIBRARIES)}")
    nvcc = _nvcc()
    if nvcc is None:
        return None, "no nvcc ($CUDA_HOME/bin, PATH or /usr/local/cuda/bin)"
    version, why = tool_version(nvcc)
    if version is None:
        return None, why
    sources = [SOURCE_DIR / file for file in CUDA_LIBRARIES[name]]
    flags = (*NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", *(f"-D{k}={v}" for k, v in defines))
    variant = "".join(f"-{k}{v}" for k, v in defines)
    library = cached_library_path(f"{name}{variant}-sm{arch}", sources, "*.cuh", flags, version)
    return compile_cached(name, library, lambda out: [nvcc, *flags, *map(str, sources), "-o", out])


@functools.cache
def _arch() -> str | None:
    """The current GPU's architecture as nvcc names it (looked up once: callers ask on every eager product)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}{'a' if major == 9 else ''}"


def load_cuda(name: str) -> ctypes.CDLL | None:
    """The compiled CUDA library ``name`` of CUDA_LIBRARIES for this GPU (built on first use), or None where it
    cannot be or ``$TRIDENT_NO_NATIVE`` is 1."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    arch = _arch()
    return None if arch is None else _build(name, arch)[0]


def load_cuda_variant(name: str, defines: dict[str, int]) -> tuple[ctypes.CDLL | None, str | None]:
    """The CUDA library ``name`` built with its compile-time constants set by ``defines`` (``-DKEY=VALUE``, for the
    benchmarks' sweeps of a kernel's ``#ifndef`` tiles), cached apart from the default build; (None, why) where it
    cannot be built."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None, f"{DISABLE_ENV}=1"
    arch = _arch()
    return (None, "no CUDA device") if arch is None else _build(name, arch, tuple(sorted(defines.items())))


def cuda_unavailable_reason(name: str) -> str | None:
    """Why :func:`load_cuda` gives None (None when it gives the library)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return f"{DISABLE_ENV}=1"
    arch = _arch()
    return "no CUDA device" if arch is None else _build(name, arch)[1]
