"""The CUDA paged-attention decode for 8-bit KV caches (``paged_decode_cuda.cu``): int8 / fp8 codes with per-token
scales, converted in registers straight into the tensor cores' operand layout (the Triton kernel's tensor-core
products spend the time moving the converted codes through shared memory). Same contract as
:func:`trident.kernels.paged_decode.paged_decode`, whose reduce kernel combines the splits, and the same torch
reference (:func:`~trident.kernels.paged_decode.paged_decode_reference`).

Built with ``nvcc`` for the GPU it runs on, on first use (trident/native/cuda_build.py); :func:`takes` says whether
a call can run it, else the backend keeps the Triton kernel.
"""

from __future__ import annotations

import ctypes

import torch

from trident.kernels.paged_common import score_factors
from trident.kernels.paged_decode import MAX_SPLITS, reduce_splits, split_buffers
from trident.kernels.pdl import pdl_launch
from trident.native.cuda_build import cuda_unavailable_reason, load_cuda

LIBRARY = "tqdecode8"
HEAD_DIMS = (64, 128)
MAX_ROWS = 16
"""Query heads a block multiplies at once (the rows of its products): a kv head's group of at most this many, or a
multiple of it."""
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
CODES = {torch.int8: 0, torch.float8_e4m3fn: 1}


def typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (this library, or a variant of it built by scripts/decode8_variants.py) with its entry points'
    argument types set."""
    if not getattr(lib, "_typed", False):
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.tq_decode8.argtypes = [i, i, i, i, p, p, p, p, p, p, p, p, p, p, p, p, f, f, i, i, i, i, i, i, i, p]
        lib.tq_decode8.restype = i
        lib._typed = True
    return lib


def library() -> ctypes.CDLL | None:
    lib = load_cuda(LIBRARY)
    return None if lib is None else typed(lib)


def why_unavailable() -> str | None:
    return cuda_unavailable_reason(LIBRARY)


def takes(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
          v_scale: torch.Tensor | None, block_tables: torch.Tensor, context_lens: torch.Tensor,
          token_indices: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_cuda` runs this decode: bfloat16 / float16 queries on CUDA with unit stride over
    a head dim of 64 or 128 and 16-byte aligned rows, at most MAX_ROWS query heads per kv head or a multiple of it;
    int8 or fp8 caches of one layout [num_blocks, kv_heads, block_size, D] with a power-of-two block size, unit
    stride over D and 16-byte aligned rows, fewer than 2^31 blocks and block strides below 2^31; float32 scales of
    one layout with unit stride over the slots; int64 block tables (unit stride over blocks), context lengths and
    query rows; and the library built. Shapes, dtypes, strides and addresses only: the choice holds across
    CUDA-graph capture."""
    if k_scale is None or v_scale is None or not query.is_cuda or query.dtype not in DTYPES:
        return False
    head_dim, block_size = query.shape[-1], k_cache.shape[2]
    if not (head_dim in HEAD_DIMS and k_cache.shape[-1] == head_dim and k_cache.dtype in CODES
            and v_cache.dtype == k_cache.dtype and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
            and query.shape[1] % k_cache.shape[1] == 0 and block_size & (block_size - 1) == 0):
        return False
    group = query.shape[1] // k_cache.shape[1]
    if group > MAX_ROWS and group % MAX_ROWS != 0:
        return False
    aligned = all(t.data_ptr() % 16 == 0 for t in (query, k_cache, v_cache))
    row_strides = (query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    # query rows in elements of 2 bytes, cache rows in bytes: 16-byte aligned rows
    if not (aligned and query.stride(2) == 1 and all(s % 16 == 0 for s in row_strides[2:])
            and all(s % 8 == 0 for s in row_strides[:2])):
        return False
    if not (k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.stride() == v_scale.stride()
            and k_scale.stride(2) == 1):
        return False
    # the kernel computes a page's offset as a 32 x 32 -> 64-bit product: page numbers and strides below 2^31
    if max(k_cache.shape[0], k_cache.stride(0), k_scale.stride(0)) >= 2**31:
        return False
    if not all(t.dtype == torch.int64 for t in (block_tables, context_lens, token_indices)) or \
            block_tables.stride(1) != 1 or not context_lens.is_contiguous() or not token_indices.is_contiguous():
        return False
    return library() is not None


def paged_decode_cuda(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, token_indices: torch.Tensor, out: torch.Tensor, *, scale: float,
                      sliding_window: int | None, logit_softcap: float | None, num_splits: int,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """Attend the rows ``token_indices`` [B] of query [T, H, D] over their cached 8-bit context, writing the same
    rows of out [T, H, D] (query's dtype and strides over D); the caller checked :func:`takes`. ``lib``: a
    variant build (scripts/decode8_variants.py; :func:`typed`) instead of the built one."""
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_decode_cuda: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    assert out.dtype == query.dtype and out.stride(2) == 1
    batch = block_tables.shape[0]
    if batch == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size = k_cache.shape[2]
    if num_splits > 1:
        partial_out, partial_lse = split_buffers(batch, num_heads, num_splits, head_dim, out.device)
    else:
        partial_out = partial_lse = None
    scale_in, scale_out = score_factors(scale, logit_softcap)
    strides = (ctypes.c_int64 * 10)(query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                                    block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                    k_scale.stride(0), k_scale.stride(1))
    ptr = torch.Tensor.data_ptr
    if lib is None:
        lib = library()
    err = lib.tq_decode8(
        DTYPES[query.dtype], CODES[k_cache.dtype], head_dim, batch, ptr(query), ptr(k_cache), ptr(v_cache),
        ptr(k_scale), ptr(v_scale), ptr(block_tables), ptr(context_lens), ptr(token_indices), ptr(out),
        None if partial_out is None else ptr(partial_out), None if partial_lse is None else ptr(partial_lse),
        strides, scale_in, scale_out, int(logit_softcap is not None), sliding_window or 0,
        block_size.bit_length() - 1, num_heads, num_heads // k_cache.shape[1], num_splits,
        int(pdl_launch(query.device)), torch.cuda.current_stream(query.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_decode8 launch failed with error {err}")
    if num_splits > 1:
        reduce_splits(partial_out, partial_lse, token_indices, out)
