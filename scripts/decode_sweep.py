"""Paged decode kernel on the nano workload's real context mix (Qwen3-0.6B attention: 16 query heads, 8 kv heads,
head dim 128, bf16, block size 16): time per call of tile/split variants, timed from CUDA-graph replays, against
the bandwidth bound (K and V read once). Run on the GPU machine: python scripts/decode_sweep.py"""
import torch
import triton

from trident.bench.workloads import nano_workload
from trident.kernels.bench_attention import graph_ms
from trident.kernels.paged_decode import choose_num_splits, paged_decode

HEADS, KV_HEADS, DIM, BLOCK = 16, 8, 128, 16
wl = nano_workload(256, None, None, 151936)
num_sms = torch.cuda.get_device_properties(0).multi_processor_count


def call(q, caches, tables, lens, idx, out, splits, block_n, warps, stages):
    return lambda i: paged_decode(q, *caches[i], tables, lens, idx, out, scale=0.088, sliding_window=None,
                                  logit_softcap=None, num_splits=splits, block_n=block_n, num_warps=warps,
                                  num_stages=stages)


for step in (1, 300, 600):
    ctxs = [p + step for p, o in zip(wl.prompt_lens, wl.output_lens) if o > step]
    batch = len(ctxs)
    width = triton.cdiv(max(ctxs), BLOCK)
    total_blocks = sum(triton.cdiv(c, BLOCK) for c in ctxs)
    caches = [(torch.randn(total_blocks + 1, KV_HEADS, BLOCK, DIM, device="cuda", dtype=torch.bfloat16),
               torch.randn(total_blocks + 1, KV_HEADS, BLOCK, DIM, device="cuda", dtype=torch.bfloat16))
              for _ in range(2)]
    perm = torch.randperm(total_blocks).tolist()
    rows, k = [], 0
    for c in ctxs:
        n = triton.cdiv(c, BLOCK)
        rows.append(perm[k:k + n] + [0] * (width - n))
        k += n
    tables = torch.tensor(rows, device="cuda")
    lens = torch.tensor(ctxs, device="cuda")
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    idx = torch.arange(batch, device="cuda")
    bound_ms = sum(ctxs) * KV_HEADS * DIM * 2 * 2 / 4.3e12 * 1e3
    auto = choose_num_splits(batch, KV_HEADS, 40960, num_sms)
    print(f"step {step}: batch {batch}, mean ctx {sum(ctxs) / batch:.0f}, max {max(ctxs)}, bound {bound_ms:.3f} ms "
          f"at 4.3 TB/s, auto splits (max_model_len 40960) {auto}")
    results = []
    for splits in (1, 2, 4, 8):
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    try:
                        fn = call(q, caches, tables, lens, idx, out, splits, block_n, warps, stages)
                        ms = graph_ms(fn, 2, 10, 60)
                    except Exception as e:
                        print("  fail", splits, block_n, warps, stages, type(e).__name__)
                        continue
                    results.append((ms, splits, block_n, warps, stages))
    results.sort()
    cur = [r for r in results if r[1:] == (1 if batch * KV_HEADS >= 3 * num_sms else auto, 64, 4, 2)]
    print("  current-ish:", cur)
    for ms, *cfg in results[:8]:
        print(f"  {ms:.3f} ms ({bound_ms / ms:.0%} of bound) splits/block_n/warps/stages {cfg}")
