"""The CUDA decode kernel for 8-bit KV caches (trident/native/paged_decode_cuda.cu) against the float32 torch
reference over the dequantized cache: both head dims it is built for, query-head groups of 1-32 (one or both row
halves of its products, a group of 32 cut into two blocks), splits, sliding windows, soft-capping, padding rows,
contexts that end mid-block and span many tiles; unused slots carry NaN scales, so a read outside a context shows.
Also captured in a CUDA graph and replayed on new contexts."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TOLERANCE, assert_close
from paged_inputs import Shape, paged_context, quantized_context, strided_queries

from trident.kernels.paged_decode import paged_decode_reference

pytestmark = pytest.mark.gpu
bf16, f16 = torch.bfloat16, torch.float16

CASES = [  # (codes, shape, splits)
    ("int8", Shape(bf16, 16, 8, 128, 16), 1),  # Qwen3-0.6B's attention (the nano workload)
    ("fp8", Shape(bf16, 16, 8, 128, 16), 4),
    ("int8", Shape(f16, 32, 8, 128, 16), 7),  # Llama-3-8B's groups of 4
    ("fp8", Shape(bf16, 32, 4, 128, 32), 1),  # groups of 8
    ("int8", Shape(bf16, 12, 4, 64, 32, window=40, softcap=5.0), 3),  # groups of 3
    ("fp8", Shape(f16, 4, 4, 64, 8, window=9), 1),  # no grouping; blocks smaller than a 16-token tile
    ("int8", Shape(bf16, 32, 2, 128, 16, softcap=30.0), 2),  # groups of 16: both row halves of the products
    ("fp8", Shape(f16, 64, 2, 64, 64), 32),  # groups of 32: two blocks of 16 heads
    ("int8", Shape(bf16, 12, 1, 128, 4), 5),  # a group of 12: rows 12-15 empty
]


def _inputs(index: int, device: torch.device, lengths: list[int] | None = None):
    name, shape, splits = CASES[index]
    g = torch.Generator().manual_seed(500 + index)
    bs = shape.block_size
    lengths = lengths or [1, bs - 1, 0, bs + 1, 2 * bs + 3, 333, 70, 1000]
    ctx, k_scale, v_scale = quantized_context(paged_context(shape, lengths, device, g), name)
    batch = ctx.block_tables.shape[0]
    query = strided_queries(shape, batch + 2, device, g)
    rows = torch.randperm(batch + 2, generator=g)[:batch].to(device)
    return shape, splits, ctx, k_scale, v_scale, query, rows


def _reference(shape: Shape, ctx, k_scale, v_scale, query, rows) -> torch.Tensor:
    ref = torch.full(query.shape, float("nan"), dtype=torch.float32, device=query.device)
    paged_decode_reference(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, rows, ref,
                           scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap,
                           k_scale=k_scale, v_scale=v_scale)
    return ref


@pytest.fixture(scope="module")
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.fail("the CUDA decode kernel needs a CUDA device")
    from trident.native import paged_decode_cuda

    assert paged_decode_cuda.why_unavailable() is None, paged_decode_cuda.why_unavailable()
    return paged_decode_cuda


@pytest.mark.parametrize("index", range(len(CASES)))
def test_cuda_decode_matches_reference(cuda_kernel, index: int) -> None:
    device = torch.device("cuda")
    shape, splits, ctx, k_scale, v_scale, query, rows = _inputs(index, device)
    args = (query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, rows)
    assert cuda_kernel.takes(*args[:3], k_scale, v_scale, *args[3:])
    out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=device)
    cuda_kernel.paged_decode_cuda(*args, out, scale=shape.scale, sliding_window=shape.window,
                                  logit_softcap=shape.softcap, num_splits=splits, k_scale=k_scale, v_scale=v_scale)
    ref = _reference(shape, ctx, k_scale, v_scale, query, rows)
    what = f"{CASES[index][0]} {shape} x{splits}"
    assert_close(out[rows].float(), ref[rows], shape.dtype, what)
    # row by row too: a short context's error must not hide in the norm of the long ones
    for b in range(rows.numel()):
        r = rows[b]
        scale = ref[r].norm().clamp_min(1e-6)
        assert ((out[r].float() - ref[r]).norm() / scale).item() < 2 * TOLERANCE[shape.dtype], \
            f"{what}: row {b} (context {ctx.context_lens[b].item()})"
    untouched = torch.ones(query.shape[0], dtype=torch.bool, device=device)
    untouched[rows] = False
    assert out[untouched].isnan().all(), f"{what}: rows outside token_indices were written"


def test_cuda_decode_refuses_what_it_is_not_built_for(cuda_kernel) -> None:
    """Head dim 256 and groups past 16 that are no multiple of 16 stay with the Triton kernel."""
    device = torch.device("cuda")
    for shape in (Shape(bf16, 8, 2, 256, 16), Shape(bf16, 48, 2, 128, 16)):
        g = torch.Generator().manual_seed(0)
        ctx, k_scale, v_scale = quantized_context(paged_context(shape, [5, 20], device, g), "int8")
        query = strided_queries(shape, 2, device, g)
        rows = torch.arange(2, device=device)
        assert not cuda_kernel.takes(query, ctx.k_cache, ctx.v_cache, k_scale, v_scale, ctx.block_tables,
                                     ctx.context_lens, rows), shape


def test_cuda_decode_replays_in_a_graph(cuda_kernel) -> None:
    """Captured once with splits, replayed after the caches, tables, lengths and queries change in place (the same
    lengths in another order: same buffer shapes, other sequences in every row)."""
    device = torch.device("cuda")
    lengths = [1, 15, 0, 17, 35, 333, 70, 1000]
    first = _inputs(2, device, lengths)
    second = _inputs(2, device, lengths[::-1])
    shape, splits, ctx, k_scale, v_scale, query, rows = first
    buffers = [t.clone() for t in (query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, k_scale,
                                   v_scale)]
    q, k, v, tables, lens, ks, vs = buffers
    out = torch.zeros(query.shape, dtype=shape.dtype, device=device)

    def call():
        cuda_kernel.paged_decode_cuda(q, k, v, tables, lens, rows, out, scale=shape.scale, sliding_window=None,
                                      logit_softcap=None, num_splits=splits, k_scale=ks, v_scale=vs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for n, (_, _, c, kscale, vscale, query_n, _) in enumerate((second, first)):
        for buffer, new in zip(buffers, (query_n, c.k_cache, c.v_cache, c.block_tables, c.context_lens, kscale,
                                         vscale)):
            assert buffer.shape == new.shape
            buffer.copy_(new)
        out.zero_()
        graph.replay()
        ref = _reference(shape, c, kscale, vscale, query_n, rows)
        assert_close(out[rows].float(), ref[rows], shape.dtype, f"graph replay {n}")
