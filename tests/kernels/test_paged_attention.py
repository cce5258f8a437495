"""The Triton paged-attention kernels (decode and prefill) equal their fp32 torch references on random
inputs of many shapes: GQA ratios 1 to 8, head dims 24 to 256, block sizes 4 to 32, contexts that end
on, before and after block boundaries, prefill chunks that start mid-context (prefix hits), sliding
windows, soft-capping, split contexts (combined by the reduce kernel or by their last program), fp32 / bf16 /
fp16. The references are checked against the reference backend (TorchAttention) too."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close
from paged_inputs import PagedContext, Shape, paged_context, strided_queries

from trident.kernels.paged_decode import choose_num_splits, paged_decode, paged_decode_reference
from trident.kernels.paged_prefill import paged_prefill, paged_prefill_reference

pytestmark = pytest.mark.gpu
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# (shape, decode splits): each dimension's values meet several of the others'
CASES = [
    (Shape(bf16, 8, 8, 64, 16), 1),
    (Shape(bf16, 16, 4, 128, 16), 4),
    (Shape(bf16, 32, 4, 128, 32), 1),  # Llama-3-8B's GQA ratio
    (Shape(fp32, 8, 2, 64, 32, window=20), 1),
    (Shape(fp32, 32, 4, 128, 16, softcap=5.0), 3),
    (Shape(bf16, 16, 2, 64, 16, window=24, softcap=5.0), 5),
    (Shape(fp32, 4, 4, 128, 16, window=40), 8),
    (Shape(bf16, 12, 4, 256, 16), 2),  # group of 3, gemma's head dim
    (Shape(fp16, 8, 1, 32, 16, window=17), 2),
    (Shape(fp32, 6, 2, 24, 4, window=6, softcap=5.0), 1),  # gemma2-like tiny test model
]


def _long(device: torch.device) -> int:
    """The longest context of a case: shorter under the (slow) interpreter."""
    return 1500 if device.type == "cuda" else 90


def _run_decode(shape: Shape, ctx: PagedContext, splits: int, device: torch.device, g: torch.Generator) -> None:
    """A split decode runs twice: splits combined by the reduce kernel, then by their last program (tickets, which
    must be left at zero)."""
    batch = ctx.block_tables.shape[0]
    num_rows = batch + 3
    query = strided_queries(shape, num_rows, device, g)
    token_indices = torch.randperm(num_rows, generator=g)[:batch].to(device)  # scattered rows of a mixed batch
    ref = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=device)
    options = dict(scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap)
    paged_decode_reference(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, token_indices,
                           ref, **options)
    ways = [None] if splits == 1 else [None, torch.zeros(batch * shape.num_kv_heads + 3, dtype=torch.int32,
                                                         device=device)]
    for tickets in ways:
        what = f"decode {shape} x{splits}{'' if tickets is None else ' combined by tickets'}"
        out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=device)
        paged_decode(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, token_indices, out,
                     num_splits=splits, tickets=tickets, **options)
        assert_close(out[token_indices].float(), ref[token_indices].float(), shape.dtype, what)
        others = torch.ones(num_rows, dtype=torch.bool, device=device)
        others[token_indices] = False
        assert out[others].isnan().all(), f"{what}: wrote rows outside token_indices"
        if tickets is not None:
            assert not tickets.any(), f"{what}: tickets left non-zero"


def _run_prefill(shape: Shape, chunks: list[tuple[int, int]], device: torch.device, g: torch.Generator) -> None:
    """chunks: (cached prefix length, query length) per sequence; a spare row between chunks (where a
    decode token would sit) must stay untouched."""
    lengths = [prefix + n for prefix, n in chunks]
    ctx = paged_context(shape, lengths, device, g)
    starts, row = [], 1
    for _, n in chunks:
        starts.append(row)
        row += n + 1
    query = strided_queries(shape, row, device, g)
    out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=device)
    ref = out.clone()
    query_starts = torch.tensor(starts, dtype=torch.int32, device=device)
    query_lens = torch.tensor([n for _, n in chunks], dtype=torch.int32, device=device)
    context_lens = ctx.context_lens.to(torch.int32)
    tables = ctx.block_tables.to(torch.int32)
    max_query_len = max(n for _, n in chunks)
    options = dict(scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap)
    paged_prefill(query, ctx.k_cache, ctx.v_cache, query_starts, query_lens, context_lens, tables, max_query_len,
                  out, **options)
    paged_prefill_reference(query, ctx.k_cache, ctx.v_cache, query_starts, query_lens, context_lens, tables,
                            max_query_len, ref, **options)
    written = torch.zeros(row, dtype=torch.bool, device=device)
    for start, (_, n) in zip(starts, chunks):
        written[start: start + n] = True
    assert_close(out[written].float(), ref[written].float(), shape.dtype, f"prefill {shape} {chunks}")
    assert out[~written].isnan().all(), "prefill wrote rows outside its chunks"


@pytest.mark.parametrize("index", range(len(CASES)))
def test_decode_matches_reference(kernel_device, index: int) -> None:
    shape, splits = CASES[index]
    g = torch.Generator().manual_seed(index)
    bs, long = shape.block_size, _long(kernel_device)
    lengths = [1, bs - 1, bs, bs + 1, 2 * bs + 3, long, long // 3 + 5]
    _run_decode(shape, paged_context(shape, lengths, kernel_device, g), splits, kernel_device, g)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_prefill_matches_reference(kernel_device, index: int) -> None:
    shape, _ = CASES[index]
    g = torch.Generator().manual_seed(100 + index)
    bs, long = shape.block_size, _long(kernel_device)
    chunks = [(0, 2), (0, bs + 1), (bs - 1, bs + 2), (37, long // 2), (2 * bs, 1), (long // 2, long // 3 + 1),
              (0, long)]
    _run_prefill(shape, chunks, kernel_device, g)


def _examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_examples(25)
@given(lengths=st.lists(st.integers(1, 700), min_size=1, max_size=9), splits=st.integers(1, 9),
       window=st.none() | st.integers(1, 300), softcap=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_random(kernel_device, lengths, splits, window, softcap, seed) -> None:
    if kernel_device.type != "cuda":
        lengths = [min(n, 80) for n in lengths[:3]]
    shape = Shape(bf16, 16, 4, 64, 16, window=window, softcap=5.0 if softcap else None)
    g = torch.Generator().manual_seed(seed)
    _run_decode(shape, paged_context(shape, lengths, kernel_device, g), splits, kernel_device, g)


@_examples(25)
@given(chunks=st.lists(st.tuples(st.integers(0, 500), st.integers(1, 300)), min_size=1, max_size=6),
       window=st.none() | st.integers(1, 200), softcap=st.booleans(), seed=st.integers(0, 2**16))
def test_prefill_random(kernel_device, chunks, window, softcap, seed) -> None:
    if kernel_device.type != "cuda":
        chunks = [(min(p, 40), min(n, 40)) for p, n in chunks[:3]]
    shape = Shape(bf16, 16, 4, 64, 16, window=window, softcap=5.0 if softcap else None)
    _run_prefill(shape, chunks, kernel_device, torch.Generator().manual_seed(seed))


def test_decode_padding_rows_give_zeros(kernel_device) -> None:
    """A batch row with context length 0 (how a CUDA-graph batch is padded) yields zeros, split or not."""
    shape = Shape(bf16, 8, 2, 64, 16)
    g = torch.Generator().manual_seed(5)
    ctx = paged_context(shape, [40, 1, 70], kernel_device, g, fill=0.0)
    ctx.context_lens[1] = 0
    query = strided_queries(shape, 3, kernel_device, g)
    tickets = torch.zeros(6, dtype=torch.int32, device=kernel_device)
    for splits, combine in ((1, None), (4, None), (4, tickets)):
        out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=kernel_device)
        paged_decode(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens,
                     torch.arange(3, device=kernel_device), out, scale=shape.scale, sliding_window=None,
                     logit_softcap=None, num_splits=splits, tickets=combine)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out.isnan().any()


def test_num_splits_rule() -> None:
    assert choose_num_splits(1, 8, 4096, 132) == 32  # one long sequence: spread over the chip
    assert choose_num_splits(1, 8, 512, 132) == 8  # no split shorter than one key tile
    assert choose_num_splits(1, 8, 64, 132) == 1
    assert choose_num_splits(8, 8, 4096, 132) == 6  # at most 3 programs per multiprocessor
    assert choose_num_splits(64, 8, 512, 132) == 1  # enough programs already
    assert choose_num_splits(64, 4, 768, 132) == 1  # 256 programs: unsplit ran faster than 2 splits


def test_references_match_torch_attention(kernel_device) -> None:
    """The kernels' references agree with the reference backend (different layout, other code)."""
    from trident.attention.base import AttentionMetadata, DecodeBatch, LayerKVCache, PrefillSeq
    from trident.attention.torch_ref import TorchAttention

    shape = Shape(fp32, 8, 2, 32, 4, window=7, softcap=5.0)
    g = torch.Generator().manual_seed(9)
    lengths, query_lens = [9, 23], [9, 6]
    ctx = paged_context(shape, lengths, kernel_device, g, fill=0.0)
    query = strided_queries(shape, 16, kernel_device, g)  # rows 0-8 chunk 0, 9-14 chunk 1, 15 decode of seq 1
    decode_ctx = paged_context(shape, [13], kernel_device, g, fill=0.0)
    k_cache, v_cache = torch.cat([ctx.k_cache, decode_ctx.k_cache]), torch.cat([ctx.v_cache, decode_ctx.v_cache])
    decode_tables = decode_ctx.block_tables + ctx.k_cache.shape[0]
    options = dict(scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap)
    ref = torch.zeros_like(query)
    starts = torch.tensor([0, 9], device=kernel_device)
    paged_prefill_reference(query, k_cache, v_cache, starts, torch.tensor(query_lens, device=kernel_device),
                            ctx.context_lens, ctx.block_tables, 9, ref, **options)
    decode_rows = torch.tensor([15], device=kernel_device)
    paged_decode_reference(query, k_cache, v_cache, decode_tables, decode_ctx.context_lens, decode_rows, ref,
                           **options)
    prefills = tuple(
        PrefillSeq(token_start=s, num_query_tokens=n, context_len=c, block_table=ctx.block_tables[i],
                   query_positions=torch.arange(c - n, c, device=kernel_device))
        for i, (s, n, c) in enumerate(zip([0, 9], query_lens, lengths)))
    decode = DecodeBatch(token_indices=decode_rows, block_tables=decode_tables, context_lens=decode_ctx.context_lens,
                         query_positions=decode_ctx.context_lens - 1)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), prefills=prefills, decode=decode,
                             num_tokens=16)
    head_major = LayerKVCache(k_cache.transpose(0, 1).contiguous(), v_cache.transpose(0, 1).contiguous())
    torch_out = TorchAttention().forward(query, head_major, meta, **options)
    assert_close(ref, torch_out, fp32, "references vs TorchAttention")
