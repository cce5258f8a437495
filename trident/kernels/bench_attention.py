"""Time the paged-attention kernels against the reference backend on a CUDA device.

``python -m trident.kernels.bench_attention [--json FILE] [--kv-heads N] [--decode BATCH:CONTEXT ...]``: Llama-3-8B
attention shape (32 query heads, 8 kv heads, head dim 128, bf16, block size 16; ``--kv-heads 4`` for Qwen3-30B-A3B's).
Decode: batch 1, 4, 16, 64, contexts 512 and 4096 (or the ``--decode`` shapes alone, no prefill), the backend's own
choice of splits beside fixed variants (splits x keys per tile); achieved bandwidth counts K and V read once.
Prefill: 4 fresh 512-token prompts, one 512-token chunk after 3584 cached tokens, one 4096-token prompt;
achieved TFLOP/s counts the causal part of QK^T and PV. Calls are captured in a CUDA graph and timed by
its replays (medians of triton.testing.do_bench), so launch overhead stays out (``eager_ms`` keeps one
eager figure with it); consecutive calls rotate over several caches so repeats do not time the L2.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from trident.attention.base import AttentionMetadata, DecodeBatch, LayerKVCache, PrefillBatch, PrefillSeq
from trident.attention.torch_ref import TorchAttention
from trident.attention.triton_paged import TritonPagedAttention
from trident.kernels.paged_decode import choose_num_splits, paged_decode
from trident.kernels.paged_prefill import paged_prefill

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = DIM ** -0.5


def _caches(tokens: int, copies: int, kv_heads: int = KV_HEADS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``copies`` block-major cache pairs holding ``tokens`` tokens each, random values."""
    blocks = triton.cdiv(tokens, BLOCK) + 1
    shape = (blocks, kv_heads, BLOCK, DIM)
    return [(torch.randn(shape, device="cuda", dtype=DTYPE), torch.randn(shape, device="cuda", dtype=DTYPE))
            for _ in range(copies)]


def _median_ms(fn, rotations: int) -> float:
    state = {"i": 0}

    def step():
        fn(state["i"] % rotations)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def graph_ms(fn, rotations: int, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Per-call time (ms) of calls captured in one CUDA graph (cycling through the rotations): launch overhead
    stays out; the median of triton.testing.do_bench over ``rep_ms`` after ``warmup_ms``."""
    calls = max(10, min(rotations, 50))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile, and build anything cached, outside the capture
        for i in range(3):
            fn(i % rotations)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % rotations)
    return triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") / calls


def _variant_ms(fn, rotations: int) -> float | str:
    """A tile variant's median, or why it did not run (one that fails to compile must not end the sweep)."""
    try:
        return graph_ms(fn, rotations)
    except Exception as e:  # any compile or launch failure is a result here
        return f"{type(e).__name__}: {str(e)[:120]}"


def bench_decode(batch: int, context: int, kv_heads: int = KV_HEADS) -> dict:
    width = triton.cdiv(context, BLOCK)
    copies = max(2, triton.cdiv(400 << 20, batch * context * kv_heads * DIM * 4))  # > 2x the L2 in rotation
    caches = _caches(batch * width * BLOCK, copies, kv_heads)  # every block a table names
    tables = torch.randperm(batch * width, device="cuda").view(batch, width)
    lens = torch.full((batch,), context, device="cuda")
    query = torch.randn(batch, HEADS, DIM, device="cuda", dtype=DTYPE)
    decode = DecodeBatch(token_indices=torch.arange(batch, device="cuda"), block_tables=tables, context_lens=lens,
                         query_positions=lens - 1, token_indices_are_all=True)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device="cuda"), prefills=(),
                             decode=decode, num_tokens=batch)
    options = dict(scale=SCALE, sliding_window=None, logit_softcap=None)
    triton_backend, torch_backend = TritonPagedAttention(), TorchAttention()
    head_major = [LayerKVCache(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()) for k, v in caches]
    layer_caches = [LayerKVCache(k, v) for k, v in caches]
    num_sms = triton_backend.num_sms(query.device)
    row = {"batch": batch, "context": context, "kv_heads": kv_heads,
           "auto_splits": choose_num_splits(batch, kv_heads, width * BLOCK, num_sms)}
    row["eager_ms"] = _median_ms(lambda i: triton_backend.forward(query, layer_caches[i], meta, **options), copies)
    row["triton_ms"] = graph_ms(lambda i: triton_backend.forward(query, layer_caches[i], meta, **options), copies)
    row["torch_ms"] = _variant_ms(lambda i: torch_backend.forward(query, head_major[i], meta, **options), copies)
    out = torch.empty_like(query)
    for splits in (1, 2, 4, 8, 16, 32):
        for block_n, warps in ((32, 4), (64, 4), (128, 4), (128, 8)):
            row[f"s{splits}_n{block_n}_w{warps}_ms"] = _variant_ms(
                lambda i, s=splits, n=block_n, w=warps: paged_decode(
                    query, *caches[i], tables, lens, decode.token_indices, out, num_splits=s, block_n=n,
                    num_warps=w, **options), copies)
    kv_bytes = 2 * batch * context * kv_heads * DIM * 2
    row["triton_TBps"] = kv_bytes / row["triton_ms"] / 1e9
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"] if isinstance(row["torch_ms"], float) else None
    return row


def bench_prefill(chunks: list[tuple[int, int]]) -> dict:
    """chunks: (cached tokens, new tokens)."""
    lengths = [c + n for c, n in chunks]
    width = max(triton.cdiv(n, BLOCK) for n in lengths)
    caches = _caches(sum(lengths) + width * BLOCK, 2)
    tables = torch.randperm(len(chunks) * width, device="cuda").view(len(chunks), width).int()
    num_tokens = sum(n for _, n in chunks)
    query = torch.randn(num_tokens, HEADS, DIM, device="cuda", dtype=DTYPE)
    starts, prefills, row_start = [], [], 0
    for s, ((cached, n), length) in enumerate(zip(chunks, lengths)):
        starts.append(row_start)
        prefills.append(PrefillSeq(token_start=row_start, num_query_tokens=n, context_len=length,
                                   block_table=tables[s, : triton.cdiv(length, BLOCK)].long(),
                                   query_positions=torch.arange(cached, length, device="cuda")))
        row_start += n
    batch = PrefillBatch(query_starts=torch.tensor(starts, device="cuda", dtype=torch.int32),
                         query_lens=torch.tensor([n for _, n in chunks], device="cuda", dtype=torch.int32),
                         context_lens=torch.tensor(lengths, device="cuda", dtype=torch.int32), block_tables=tables,
                         max_query_len=max(n for _, n in chunks))
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device="cuda"), prefills=tuple(prefills),
                             decode=None, num_tokens=num_tokens, prefill_batch=batch)
    options = dict(scale=SCALE, sliding_window=None, logit_softcap=None)
    head_major = [LayerKVCache(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()) for k, v in caches]
    layer_caches = [LayerKVCache(k, v) for k, v in caches]
    row = {"chunks": chunks}
    triton_backend, torch_backend = TritonPagedAttention(), TorchAttention()
    row["eager_ms"] = _median_ms(lambda i: triton_backend.forward(query, layer_caches[i], meta, **options), 2)
    row["triton_ms"] = graph_ms(lambda i: triton_backend.forward(query, layer_caches[i], meta, **options), 2)
    row["torch_ms"] = _variant_ms(lambda i: torch_backend.forward(query, head_major[i], meta, **options), 2)
    out = torch.empty_like(query)
    for block_m, block_n, warps, stages in ((128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3),
                                            (64, 64, 4, 3), (128, 32, 4, 2)):
        row[f"m{block_m}_n{block_n}_w{warps}_st{stages}_ms"] = _variant_ms(
            lambda i, m=block_m, n=block_n, w=warps, st=stages: paged_prefill(
                query, *caches[i], batch.query_starts, batch.query_lens, batch.context_lens, tables,
                batch.max_query_len, out, block_m=m, block_n=n, num_warps=w, num_stages=st, **options), 2)
    # causal: each query sees (cached + its index + 1) keys; QK^T and PV each 2 * D flops per pair and head
    pairs = sum(n * cached + n * (n + 1) // 2 for cached, n in chunks)
    row["triton_TFLOPs"] = 4 * pairs * DIM * HEADS / row["triton_ms"] / 1e9
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"] if isinstance(row["torch_ms"], float) else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS, help=f"kv heads of {HEADS} query heads")
    parser.add_argument("--decode", nargs="+", default=None, metavar="BATCH:CONTEXT",
                        help="only these decode shapes (no prefill)")
    args = parser.parse_args()
    decode_shapes = ([tuple(int(v) for v in shape.split(":")) for shape in args.decode] if args.decode else
                     [(batch, context) for batch in (1, 4, 16, 64) for context in (512, 4096)])
    rows = []
    for batch, context in decode_shapes:
        rows.append({"kind": "decode", **bench_decode(batch, context, args.kv_heads)})
        print(json.dumps(rows[-1]), flush=True)
    for chunks in (() if args.decode else ([(0, 512)] * 4, [(3584, 512)], [(0, 4096)])):
        rows.append({"kind": "prefill", **bench_prefill(chunks)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'kind':8} {'shape':>22} {'triton ms':>10} {'torch ms':>10} {'x':>6}  achieved   (CUDA-graph replays)")
    for r in rows:
        shape = f"B={r['batch']} ctx={r['context']}" if r["kind"] == "decode" else str(r["chunks"][:1]) + (
            f"x{len(r['chunks'])}")
        achieved = (f"{r['triton_TBps']:.2f} TB/s" if r["kind"] == "decode" else f"{r['triton_TFLOPs']:.0f} TFLOP/s")
        torch_ms = f"{r['torch_ms']:10.4f}" if r["speedup_vs_torch"] else f"{'failed':>10}"
        speedup = f"{r['speedup_vs_torch']:6.1f}" if r["speedup_vs_torch"] else f"{'-':>6}"
        print(f"{r['kind']:8} {shape:>22} {r['triton_ms']:10.4f} {torch_ms} {speedup}  {achieved}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
