"""Paged-attention prefill: variable-length query chunks attending to their whole cached context (the
prefix-cached or earlier-chunk tokens before the chunk, and the chunk itself), in Triton, with its torch
reference.

Chunk ``s`` has ``query_lens[s]`` query tokens starting at row ``query_starts[s]`` of the flat batch; its
keys are the first ``context_lens[s]`` tokens of its block table, the chunk's own keys last, so its
query ``i`` sits at position ``context_lens[s] - query_lens[s] + i``. One program handles one
(query tile, chunk, kv head); the rows of its tile are (token, query head of the group) pairs, so each
K/V tile is loaded once for the whole GQA group. Causal mask, optional sliding window and tanh
soft-capping; online softmax in the log2 domain; tl.dot on [block_m, D] x [D, block_n] tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.paged_common import (
    attend_reference,
    compute_dtype,
    dot_precision,
    gather_sequence,
    kv_scale_args,
    padded_head_dim,
    scaled_scores,
    score_factors,
)
from trident.kernels.pdl import pdl_launch, wait_for_previous_grid


def prefill_tile_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a (padded) head dim and cache dtype: large tiles that
    compile for sm_90 without register spills (ptxas -v), the fastest measured where measured. fp32
    products run on plain FMAs (exact), so fp32 tiles are small."""
    if dtype == torch.float32:
        return 16, 16, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 2
    if head_dim <= 128:
        return 128, 128, 8, 2  # H200, D=128: 270 TFLOP/s on a 4096-token prompt, 6% ahead of 128 x 64
    return 64, 32, 8, 2


def paged_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_starts: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                  max_query_len: int, out: torch.Tensor, *, scale: float, sliding_window: int | None,
                  logit_softcap: float | None, block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Attend every chunk's query rows of query [T, H, D]; write them into the same rows of out [T, H, D].

    query_starts/query_lens/context_lens [N], block_tables [N, max_blocks] (padded), max_query_len >= every
    query_lens[s]; caches [num_blocks, kv_heads, block_size, D]; for int8 / fp8 caches their scales k_scale /
    v_scale [num_blocks, kv_heads, block_size] (float32).
    """
    num_seqs = block_tables.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert block_tables.stride(1) == 1
    group = num_heads // num_kv_heads
    dim_pad = padded_head_dim(head_dim)
    dtype = compute_dtype(query, k_cache)
    quantized, k_scale, v_scale = kv_scale_args(k_cache, k_scale, v_scale)
    default_m, default_n, default_warps, default_stages = prefill_tile_config(dim_pad, dtype)
    block_m = max(block_m or default_m, triton.next_power_of_2(group))
    block_n = block_n or default_n
    block_q = block_m // group  # query tokens per tile
    scale_in, scale_out = score_factors(scale, logit_softcap)
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    pdl = pdl_launch(query.device)
    _prefill_kernel[grid](
        query, k_cache, v_cache, k_scale, v_scale, out, query_starts, query_lens, context_lens, block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        scale_in, scale_out, sliding_window or 0, block_size, head_dim,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, DIM_PAD=dim_pad,
        USE_SOFTCAP=logit_softcap is not None, USE_WINDOW=sliding_window is not None, QUANTIZED=quantized,
        DOT_PRECISION=dot_precision(dtype),
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages, USE_PDL=pdl, launch_pdl=pdl
    )


def paged_prefill_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_starts: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, max_query_len: int, out: torch.Tensor, *, scale: float,
                            sliding_window: int | None, logit_softcap: float | None,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Same contract as :func:`paged_prefill`, one chunk at a time in plain fp32 torch."""
    for s, (start, n, length) in enumerate(zip(query_starts.tolist(), query_lens.tolist(), context_lens.tolist())):
        assert n <= max_query_len
        key = gather_sequence(k_cache, block_tables[s], length, k_scale)
        value = gather_sequence(v_cache, block_tables[s], length, v_scale)
        positions = torch.arange(length - n, length, device=query.device)
        o = attend_reference(query[start: start + n], key, value, positions, scale, sliding_window, logit_softcap)
        out[start: start + n] = o.to(out.dtype)


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes every step (see paged_decode)
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, query_starts_ptr,
                    query_lens_ptr, context_lens_ptr, block_tables_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_bt, stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, scale_in, scale_out, window,
                    block_size, head_dim,
                    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DIM_PAD: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                    QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_len = tl.load(query_lens_ptr + seq).to(tl.int32)
    if tile * BLOCK_Q < query_len:  # tiles past this chunk's end have nothing to do
        context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
        query_start = tl.load(query_starts_ptr + seq).to(tl.int64)
        first_position = context_len - query_len

        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, DIM_PAD)
        tokens = tile * BLOCK_Q + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_mask = (rows < BLOCK_Q * GROUP) & (tokens < query_len)
        dim_mask = dims < head_dim
        positions = first_position + tokens
        io_mask = row_mask[:, None] & dim_mask[None, :]
        q = tl.load(q_ptr + (query_start + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=io_mask, other=0.0)
        if not QUANTIZED:  # products in the cache's dtype; with int8 / fp8 codes in the queries' dtype
            q = q.to(k_cache_ptr.dtype.element_ty)

        hi = first_position + tl.minimum(query_len, (tile + 1) * BLOCK_Q)  # past the tile's last query
        # Rows that see no key of a tile get -inf scores; a finite floor keeps exp2 free of (-inf) - (-inf).
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_offset = kv_head.to(tl.int64) * stride_ch
        scale_head_offset = kv_head.to(tl.int64) * stride_sh
        if USE_WINDOW:
            masked_from = tl.maximum(first_position + tile * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
        else:
            # Key tiles wholly before the tile's first query are visible to every row: no mask needed there.
            masked_from = (first_position + tile * BLOCK_Q) // BLOCK_N * BLOCK_N
            for n0 in range(0, masked_from, BLOCK_N):
                m, l, acc = _attend_key_tile(
                    q, m, l, acc, n0, hi, positions, window, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table,
                    head_offset, scale_head_offset, dims, dim_mask, stride_cb, stride_cs, stride_sb, block_size,
                    scale_in, scale_out, BLOCK_N=BLOCK_N, MASKED=False, USE_SOFTCAP=USE_SOFTCAP, USE_WINDOW=False,
                    QUANTIZED=QUANTIZED, DOT_PRECISION=DOT_PRECISION)
        for n0 in range(masked_from, hi, BLOCK_N):
            m, l, acc = _attend_key_tile(
                q, m, l, acc, n0, hi, positions, window, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table,
                head_offset, scale_head_offset, dims, dim_mask, stride_cb, stride_cs, stride_sb, block_size,
                scale_in, scale_out, BLOCK_N=BLOCK_N, MASKED=True, USE_SOFTCAP=USE_SOFTCAP, USE_WINDOW=USE_WINDOW,
                QUANTIZED=QUANTIZED, DOT_PRECISION=DOT_PRECISION)
        acc = acc * tl.where(l > 0, 1.0 / l, 0.0)[:, None]
        tl.store(out_ptr + (query_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _attend_key_tile(q, m, l, acc, n0, hi, positions, window, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                     table, head_offset, scale_head_offset, dims, dim_mask, stride_cb, stride_cs, stride_sb,
                     block_size, scale_in, scale_out, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                     USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, QUANTIZED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N: unmasked when every key of the tile exists
    and is visible to every row (MASKED=False), else causal (and window) masked. Codes of a quantized cache
    are converted to the queries' dtype; the key scales multiply the scores, the value scales the
    probabilities."""
    n = n0 + tl.arange(0, BLOCK_N)
    valid = n < hi
    if MASKED:
        page = tl.load(table + n // block_size, mask=valid, other=0).to(tl.int64)
        kv_mask = valid[:, None] & dim_mask[None, :]
    else:
        page = tl.load(table + n // block_size).to(tl.int64)
        kv_mask = dim_mask[None, :]
    offsets = (page * stride_cb + head_offset + (n % block_size) * stride_cs)[:, None] + dims[None, :]
    scale_offsets = page * stride_sb + scale_head_offset + n % block_size  # used by quantized caches
    k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
    if QUANTIZED:
        # codes -> float32 -> the queries' dtype: exact (Triton 3.6's interpreter mis-converts int8 -> bf16)
        raw = tl.dot(q, tl.trans(k.to(tl.float32).to(q.dtype)), input_precision=DOT_PRECISION)
        if MASKED:
            k_scale = tl.load(k_scale_ptr + scale_offsets, mask=valid, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptr + scale_offsets)
        raw = raw * k_scale[None, :]
    else:
        raw = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = scaled_scores(raw, scale_in, scale_out, USE_SOFTCAP)
    if MASKED:
        allowed = valid[None, :] & (n[None, :] <= positions[:, None])
        if USE_WINDOW:
            allowed = allowed & (n[None, :] > positions[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
    if QUANTIZED:
        if MASKED:
            v_scale = tl.load(v_scale_ptr + scale_offsets, mask=valid, other=0.0)
        else:
            v_scale = tl.load(v_scale_ptr + scale_offsets)
        p = p * v_scale[None, :]
        v = v.to(tl.float32).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc
