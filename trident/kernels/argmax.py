"""Greedy sampling's argmax over each logits row, in two Triton launches, and its torch reference.

torch reduces one long row in one thread block (27 us for Llama-3's 128,256 logits on an H200); its two-pass form
(slices, then the slices' maxima: trident/engine/sampler.py's two_pass_argmax) takes five small launches, ~20 us of
a batch-1 step. Here the first launch has one program per (row, slice of SLICE logits) write the slice's maximum and
the first index holding it, the second one program per row pick the first slice holding the row's maximum. As
torch.argmax: the first index among equal maxima, and a NaN counts as the maximum (the first NaN wins); a row of
-inf gives 0. The launches depend on shapes only: CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid

SLICE = 2048
"""Logits one program of the first launch reduces (16 a thread at four warps)."""


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: torch.argmax over the last axis."""
    return logits.argmax(dim=-1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The Triton kernels: :func:`argmax_reference`'s result. logits [rows, vocab] with unit stride over the
    vocabulary (any row stride), float32 / bfloat16 / float16."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and vocab > 0
    slices = triton.cdiv(vocab, SLICE)
    values = torch.empty((rows, slices), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, slices), dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    pdl = pdl_launch(logits.device)
    _slice_kernel[(rows, slices)](logits, values, indices, logits.stride(0), vocab, slices, BLOCK=SLICE,
                                  USE_PDL=pdl, launch_pdl=pdl, num_warps=4)
    _rows_kernel[(rows,)](values, indices, out, slices, BLOCK=triton.next_power_of_2(slices), USE_PDL=pdl,
                          launch_pdl=pdl, num_warps=1)
    return out


@triton.jit
def _first_maximum(x, index, limit):
    """(the maximum of x, NaN if any is NaN; the first ``index`` holding it, or the first NaN's), ``limit`` above
    every index."""
    nan = x != x
    top = tl.max(tl.where(nan, float("-inf"), x), 0)
    first_nan = tl.min(tl.where(nan, index, limit), 0)
    first_top = tl.min(tl.where(x == top, index, limit), 0)
    has_nan = first_nan < limit
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)


@triton.jit
def _slice_kernel(logits_ptr, values_ptr, indices_ptr, stride_row, vocab, slices, BLOCK: tl.constexpr,
                  USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    cols = piece * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    top, where = _first_maximum(x, tl.minimum(cols, vocab - 1).to(tl.int64), vocab)
    tl.store(values_ptr + row * slices + piece, top)
    tl.store(indices_ptr + row * slices + piece, where)


@triton.jit
def _rows_kernel(values_ptr, indices_ptr, out_ptr, slices, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    pieces = tl.arange(0, BLOCK)
    inside = pieces < slices
    top = tl.load(values_ptr + row * slices + pieces, mask=inside, other=float("-inf"))
    where = tl.load(indices_ptr + row * slices + pieces, mask=inside, other=0)
    # the slices are in index order: the first slice holding the maximum (or a NaN) holds its first index
    _, piece = _first_maximum(top, pieces.to(tl.int64), BLOCK)
    tl.store(out_ptr + row, tl.sum(tl.where(pieces == piece, where, 0), 0))
