"""Paged-attention decode: one query token per sequence over its cached context, in Triton, with its
torch reference.

One program handles one (sequence, kv head, split): the ``group`` query heads that share the kv head are
the rows of one tile, so every K/V tile is read once for the whole group (GQA). Keys are read through
the block table in tiles of ``block_n`` tokens (independent of the cache's block size), with an online
softmax in the log2 domain. Long contexts with few sequences are split over ``num_splits`` programs
(flash-decoding): each writes its partial output and log-sum-exp, and a reduce kernel combines them.

Given ``tickets`` (zeroed int32 counters, one per (sequence, kv head)), the split programs combine themselves: each
counts itself done on its counter after storing its partial result, and the last one of a (sequence, kv head) reads
the others' and writes the output (and sets the counter back to zero): no reduce launch.

Launched with programmatic dependent launch (trident/kernels/pdl.py), a program reads its context length, its first
key tile's pages and, over a 16-bit cache, that tile's keys and values but the newest token's before it waits for the
kernel before (which writes the queries and the newest key and value): at batch 1 a split is about one tile, so
little is left to read after the wait.

Graph-capturable: the launch depends only on tensor shapes (batch, block-table width) and host
constants, never on tensor values; each program reads its own context length and finds its slice of the
context in the kernel. A sequence with context length 0 (a padding row) gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.paged_common import (
    INT8_MAGIC,
    attend_reference,
    codes_f16,
    compute_dtype,
    dot_precision,
    gather_sequence,
    kv_scale_args,
    padded_head_dim,
    scaled_scores,
    score_factors,
)
from trident.kernels.pdl import pdl_launch, wait_for_previous_grid

MIN_SPLIT_TOKENS = 64
"""A split covers at least one key tile of the longest possible context."""
MAX_SPLITS = 32
SPLITS_PAD = triton.next_power_of_2(MAX_SPLITS)
"""The reduce kernel's split axis: one padded width for every split count (one compiled variant)."""
COMBINE_ELEMENTS = 4096
"""Partial-output elements the combining program loads at once (heads x splits x DIM_PAD; 32 registers a thread at
four warps)."""
PROGRAMS_PER_SM = 3
"""Splitting stops once there are this many programs per multiprocessor (a few resident at once hide the
latency of the page-table and K/V loads)."""


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence: the most that keep batch x kv heads x splits programs within PROGRAMS_PER_SM per
    multiprocessor (1 once the unsplit programs pass half of that), no split shorter than MIN_SPLIT_TOKENS of the
    longest possible context, at most MAX_SPLITS. Depends on shapes only.

    Measured on an H200 (Llama-3-8B shape, bf16, CUDA-graph replays): batch 1 with 512 / 4096 tokens
    runs fastest at 8 / 32 splits (6.6 / 12 us against 18 / 128 us unsplit); batch 64 runs fastest
    unsplit (512 programs already), at 4.35 TB/s with 4096 tokens. Qwen3-30B-A3B's 4 kv heads at batch 64 and 320
    tokens (256 programs): unsplit 16.0 us against 21.2 with 2 splits, the count rounding up gave
    (bench_attention --kv-heads 4, 2026-11-30)."""
    programs = batch * num_kv_heads
    wanted = PROGRAMS_PER_SM * num_sms // programs
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS), MAX_SPLITS))


def decode_tile(head_dim: int, dtype: torch.dtype, num_splits: int = 1) -> int:
    """Keys per tile for a (padded) head dim, cache dtype and split count. 16-bit, D <= 128: 128 unsplit (on an
    H200, the nano workload's mixed contexts at batch 100-256 ran 6-10% faster than with 64, at 88-95% of
    the bandwidth bound: scripts/decode_sweep.py), 64 when split (105 registers, no spills on sm_90 by
    ptxas -v; with the split rule within 5% of the fastest split); 32 for D = 256. fp32 products run on
    plain FMAs (exact) and need more registers: half of 64."""
    if dtype == torch.float32:
        return 32 if head_dim <= 128 else 16
    if head_dim <= 128:
        return 128 if num_splits == 1 else 64
    return 32


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, token_indices: torch.Tensor, out: torch.Tensor, *, scale: float,
                 sliding_window: int | None, logit_softcap: float | None, num_splits: int = 1,
                 block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 tickets: torch.Tensor | None = None) -> None:
    """Attend the rows ``token_indices`` [B] of query [T, H, D] (position context_len - 1) over their
    cached context; write the results into the same rows of out [T, H, D].

    block_tables [B, max_blocks] (padded), context_lens [B]; caches [num_blocks, kv_heads, block_size, D]; for
    int8 / fp8 caches their scales k_scale / v_scale [num_blocks, kv_heads, block_size] (float32). ``tickets``:
    int32 counters, all zero, at least B * kv_heads (:func:`split_tickets`), left at zero: a split decode combines
    its splits in its last program instead of a reduce launch.
    """
    batch = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if batch == 0:
        return
    assert num_heads % num_kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert query.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert block_tables.stride(1) == 1
    group = num_heads // num_kv_heads
    dim_pad = padded_head_dim(head_dim)
    dtype = compute_dtype(query, k_cache)
    quantized, k_scale, v_scale = kv_scale_args(k_cache, k_scale, v_scale)
    block_n = block_n or decode_tile(dim_pad, dtype, num_splits)
    scale_in, scale_out = score_factors(scale, logit_softcap)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_decode: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    split = num_splits > 1
    if split:
        partial_out, partial_lse = split_buffers(batch, num_heads, num_splits, head_dim, out.device)
    else:
        partial_out = partial_lse = out  # unused
    combine = split and tickets is not None
    if combine:
        assert tickets.dtype == torch.int32 and tickets.is_contiguous() and tickets.numel() >= batch * num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    pdl = pdl_launch(query.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, token_indices, out, partial_out,
        partial_lse, tickets if combine else context_lens, query.stride(0), query.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), scale_in, scale_out, sliding_window or 0, block_size, head_dim,
        num_heads, num_kv_heads, num_splits,
        GROUP=group, GROUP_PAD=max(16, group_p2), DIM_PAD=dim_pad, BLOCK_N=block_n,
        SPLIT=split, USE_SOFTCAP=logit_softcap is not None, USE_WINDOW=sliding_window is not None,
        QUANTIZED=quantized, F16_CODES=quantized and dtype != torch.float32, INT8_CODES=k_cache.dtype == torch.int8,
        DOT_PRECISION=dot_precision(dtype), COMBINE=combine, GROUP_P2=group_p2, SPLITS_PAD=SPLITS_PAD,
        SPLIT_CHUNK=max(1, min(SPLITS_PAD, COMBINE_ELEMENTS // (group_p2 * dim_pad))),
        num_warps=num_warps, num_stages=num_stages, USE_PDL=pdl, launch_pdl=pdl,
    )
    if split and not combine:
        reduce_splits(partial_out, partial_lse, token_indices, out)


def split_tickets(num_sms: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters for every split decode on a device of ``num_sms`` multiprocessors (``tickets``): one per
    (sequence, kv head), and :func:`choose_num_splits` splits only while there are fewer than PROGRAMS_PER_SM x
    num_sms of them. Each decode leaves them at zero: one set serves every layer and step."""
    return torch.zeros(PROGRAMS_PER_SM * num_sms, dtype=torch.int32, device=device)


def split_buffers(batch: int, num_heads: int, num_splits: int, head_dim: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial outputs [batch, num_heads, num_splits, DIM_PAD] float32, their log2-domain log-sum-exps [batch,
    num_heads, num_splits]) for a split decode: what :func:`reduce_splits` combines."""
    dim_pad = padded_head_dim(head_dim)
    return (torch.empty((batch, num_heads, num_splits, dim_pad), dtype=torch.float32, device=device),
            torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device))


def reduce_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, token_indices: torch.Tensor,
                  out: torch.Tensor) -> None:
    """Combine a split decode's partial outputs (:func:`split_buffers`, an empty split's log-sum-exp -inf) into the
    rows ``token_indices`` of out [T, H, D]: weights 2^(lse_s - max lse)."""
    batch, num_heads, num_splits, dim_pad = partial_out.shape
    pdl = pdl_launch(out.device)
    _reduce_kernel[(batch, num_heads)](
        partial_out, partial_lse, token_indices, out, out.stride(0), out.stride(1), out.shape[2], num_heads,
        num_splits, SPLITS_PAD=SPLITS_PAD, DIM_PAD=dim_pad, USE_PDL=pdl, launch_pdl=pdl
    )


def paged_decode_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, token_indices: torch.Tensor,
                           out: torch.Tensor, *, scale: float, sliding_window: int | None,
                           logit_softcap: float | None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> None:
    """Same contract as :func:`paged_decode`, one sequence at a time in plain fp32 torch."""
    for b, (row, length) in enumerate(zip(token_indices.tolist(), context_lens.tolist())):
        if length == 0:
            out[row] = 0
            continue
        key = gather_sequence(k_cache, block_tables[b], length, k_scale)
        value = gather_sequence(v_cache, block_tables[b], length, v_scale)
        position = torch.tensor([length - 1], device=query.device)
        o = attend_reference(query[row: row + 1], key, value, position, scale, sliding_window, logit_softcap)
        out[row] = o[0].to(out.dtype)


# Arguments that change from step to step are not specialised on (Triton would otherwise compile a variant
# for each new value that is 1 or a multiple of 16: seconds of compilation in the middle of serving).
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr,
                   token_indices_ptr, out_ptr, partial_out_ptr, partial_lse_ptr, tickets_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_ch, stride_cs,
                   stride_sb, stride_sh, scale_in, scale_out, window, block_size, head_dim, num_heads, num_kv_heads,
                   num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
                   QUANTIZED: tl.constexpr, F16_CODES: tl.constexpr, INT8_CODES: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, COMBINE: tl.constexpr, GROUP_P2: tl.constexpr,
                   SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait: the step's inputs (written before its first kernel) and the first key tile's pages, and with
    # a 16-bit cache its keys and values but the newest token's (the kernel before writes that one).
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(context_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(context_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, context_len)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    row_mask = rows < GROUP
    dim_mask = dims < head_dim
    heads = kv_head * GROUP + rows
    token = tl.load(token_indices_ptr + seq).to(tl.int64)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head.to(tl.int64) * stride_ch
    scale_head_offset = kv_head.to(tl.int64) * stride_sh
    n = lo + tl.arange(0, BLOCK_N)
    valid = n < hi
    page = tl.load(table + n // block_size, mask=valid, other=0).to(tl.int64)
    offsets = (page * stride_cb + head_offset + (n % block_size) * stride_cs)[:, None] + dims[None, :]
    newest = n == context_len - 1
    if not QUANTIZED:
        older = (valid & (n < context_len - 1))[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=older, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=older, other=0.0)
    wait_for_previous_grid(USE_PDL)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    q_sum = 0.0
    if not QUANTIZED:  # products in the cache's dtype; with int8 / fp8 codes see F16_CODES_NOTE
        q = q.to(k_cache_ptr.dtype.element_ty)
    if F16_CODES:
        q = q.to(tl.float16)
        q_sum = tl.sum(q.to(tl.float32), 1)  # takes the int8 codes' MAGIC back off the scores

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    if lo < hi:  # the first tile: with a 16-bit cache only the newest token's row is still to read
        kv_mask = valid[:, None] & dim_mask[None, :]
        if QUANTIZED:
            k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        else:
            fresh = newest[:, None] & dim_mask[None, :]
            k = tl.where(fresh, tl.load(k_cache_ptr + offsets, mask=fresh, other=0.0), k)
            v = tl.where(fresh, tl.load(v_cache_ptr + offsets, mask=fresh, other=0.0), v)
        m, l, acc = _attend_tile(q, q_sum, k, v, valid, page * stride_sb + scale_head_offset + n % block_size, m, l,
                                 acc, k_scale_ptr, v_scale_ptr, scale_in, scale_out, USE_SOFTCAP, QUANTIZED,
                                 F16_CODES, INT8_CODES, DOT_PRECISION)
    for n0 in range(lo + BLOCK_N, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        page = tl.load(table + n // block_size, mask=valid, other=0).to(tl.int64)
        offsets = (page * stride_cb + head_offset + (n % block_size) * stride_cs)[:, None] + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        m, l, acc = _attend_tile(q, q_sum, k, v, valid, page * stride_sb + scale_head_offset + n % block_size, m, l,
                                 acc, k_scale_ptr, v_scale_ptr, scale_in, scale_out, USE_SOFTCAP, QUANTIZED,
                                 F16_CODES, INT8_CODES, DOT_PRECISION)

    inv_l = tl.where(l > 0, 1.0 / l, 0.0)  # an empty split (or a padding row) yields zeros, not NaN
    acc = acc * inv_l[:, None]
    if SPLIT:
        partial = (seq * num_heads + heads).to(tl.int64) * num_splits + split
        tl.store(partial_out_ptr + partial[:, None] * DIM_PAD + dims[None, :], acc, mask=row_mask[:, None])
        tl.store(partial_lse_ptr + partial, m + tl.log2(l), mask=row_mask)  # -inf when empty
        if COMBINE:
            tl.debug_barrier()  # every thread's partial stores before the release below
            ticket = tickets_ptr + seq * num_kv_heads + kv_head
            if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.store(ticket, 0)
                used = tl.cdiv(context_len - start, tl.maximum(per_split, 1))  # splits with keys: the rest are empty
                _combine_splits(partial_out_ptr, partial_lse_ptr, out_ptr, token, seq, kv_head, num_heads,
                                num_splits, used, stride_ot, stride_oh, head_dim, GROUP, GROUP_P2, DIM_PAD,
                                SPLITS_PAD, SPLIT_CHUNK)
    else:
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def _attend_tile(q, q_sum, k, v, valid, scale_offsets, m, l, acc, k_scale_ptr, v_scale_ptr, scale_in, scale_out,
                 USE_SOFTCAP: tl.constexpr, QUANTIZED: tl.constexpr, F16_CODES: tl.constexpr,
                 INT8_CODES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile (k, v [BLOCK_N, DIM_PAD], zero past ``valid``; int8 / fp8 codes with their scales at
    ``scale_offsets``) into the online softmax (m, l, acc) of the query rows q."""
    if F16_CODES:
        raw = tl.dot(q, tl.trans(codes_f16(k, INT8_CODES)), input_precision=DOT_PRECISION)
        if INT8_CODES:
            raw -= INT8_MAGIC * q_sum[:, None]
        raw = raw * tl.load(k_scale_ptr + scale_offsets, mask=valid, other=0.0)[None, :]
    elif QUANTIZED:
        # float32 queries: codes -> float32, exact (Triton 3.6's interpreter mis-converts int8 -> bf16)
        raw = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
        raw = raw * tl.load(k_scale_ptr + scale_offsets, mask=valid, other=0.0)[None, :]
    else:
        raw = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = scaled_scores(raw, scale_in, scale_out, USE_SOFTCAP)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one valid key
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if QUANTIZED:  # the value scales weight the probabilities of their keys
        p = p * tl.load(v_scale_ptr + scale_offsets, mask=valid, other=0.0)[None, :]
    if F16_CODES:
        pv = p.to(tl.float16)
        update = tl.dot(pv, codes_f16(v, INT8_CODES), input_precision=DOT_PRECISION)
        if INT8_CODES:
            update -= INT8_MAGIC * tl.sum(pv.to(tl.float32), 1)[:, None]
    elif QUANTIZED:
        update = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        update = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc * alpha[:, None] + update


@triton.jit
def _combine_splits(partial_out_ptr, partial_lse_ptr, out_ptr, token, seq, kv_head, num_heads, num_splits, used,
                    stride_ot, stride_oh, head_dim, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
                    DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """The reduce kernel's arithmetic for the GROUP heads of one (sequence, kv head), over its first ``used`` splits
    (the others are empty), by the program that finished last: the partials come from other programs, so they are
    read from L2 (.cg), never from this multiprocessor's L1."""
    rows = tl.arange(0, GROUP_P2)
    dims = tl.arange(0, DIM_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    base = (seq * num_heads + heads).to(tl.int64) * num_splits
    splits = tl.arange(0, SPLITS_PAD)
    lse = tl.load(partial_lse_ptr + base[:, None] + splits[None, :], mask=row_ok[:, None] & (splits < used)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse - top[:, None]), 1)
    o = tl.zeros([GROUP_P2, DIM_PAD], tl.float32)
    for s0 in range(0, used, SPLIT_CHUNK):
        chunk = s0 + tl.arange(0, SPLIT_CHUNK)
        ok = row_ok[:, None] & (chunk < used)[None, :]
        part = base[:, None] + chunk[None, :]
        weight = tl.exp2(tl.load(partial_lse_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
                         - top[:, None])
        values = tl.load(partial_out_ptr + (part * DIM_PAD)[:, :, None] + dims[None, None, :], mask=ok[:, :, None],
                         other=0.0, cache_modifier=".cg")
        o += tl.sum(values * weight[:, :, None], 1)
    o = o / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < head_dim)[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(partial_out_ptr, partial_lse_ptr, token_indices_ptr, out_ptr, stride_ot, stride_oh,
                   head_dim, num_heads, num_splits, SPLITS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Combine the splits of one (sequence, head): weights 2^(lse_s - max lse)."""
    wait_for_previous_grid(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    base = (seq * num_heads + head).to(tl.int64) * num_splits
    lse = tl.load(partial_lse_ptr + base + splits, mask=splits < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, 0)
    parts = tl.load(partial_out_ptr + (base + splits)[:, None] * DIM_PAD + dims[None, :],
                    mask=(splits < num_splits)[:, None], other=0.0)
    o = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    token = tl.load(token_indices_ptr + seq).to(tl.int64)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)
