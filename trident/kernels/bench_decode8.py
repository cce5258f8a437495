"""Time the paged decode over 8-bit (int8 / fp8) KV caches: the Triton kernel against the CUDA kernel of
trident/native/paged_decode_cuda.cu, with the bfloat16 cache's Triton decode beside them, on a CUDA device.

``python -m trident.kernels.bench_decode8 [--json FILE]``: one Qwen3-0.6B attention layer (16 query heads, 8 kv
heads, head dim 128, bfloat16 queries) over four context mixes: 188 sequences of 100-1625 tokens
(the nano workload's mean batch and context in mid-run), 256 of 100-1019, 64 of 1000-2999 and one of 4096 (split
over the chip by the backend's rule). Calls are captured in a CUDA graph and timed by its replays
(trident.kernels.bench_attention.graph_ms), rotating over copies of the cache beyond the L2. TB/s counts the codes
and scales (or bfloat16 values) of every context token's key and value once. The CUDA kernel's output is checked
against the Triton kernel's on the same cache before it is timed (relative difference of the two, both against
float32 math on float16 operands). ``--block-size`` sets the cache's tokens per block (16, the engine's default).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

import torch
import triton

from trident.kernels.bench_attention import graph_ms
from trident.kernels.paged_decode import choose_num_splits, paged_decode
from trident.native import paged_decode_cuda
from trident.quant.kv import kv_cache_format, quantize_kv

HEADS, KV_HEADS, DIM = 16, 8, 128
MIXES = ((188, 100, 1626), (256, 100, 1020), (64, 1000, 3000), (1, 4096, 4097))
"""(sequences, shortest context, longest context + 1) drawn uniformly."""
ROTATION_BYTES = 400 << 20


def random_tables(lengths: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """Shuffled block tables (on the GPU) for the contexts, and the number of blocks they use."""
    width = triton.cdiv(int(lengths.max()), block)
    needed = [triton.cdiv(int(n), block) for n in lengths]
    physical = torch.randperm(sum(needed))
    tables = torch.zeros(len(needed), width, dtype=torch.long)
    at = 0
    for b, n in enumerate(needed):
        tables[b, :n] = physical[at: at + n]
        at += n
    return tables.cuda(), sum(needed)


def random_caches(name: str, shape: tuple[int, ...], copies: int) -> list[tuple]:
    """``copies`` random (keys, values, key scales, value scales) in the format ``name`` (scales None for bfloat16)."""
    caches = []
    for _ in range(copies):
        k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if name == "bfloat16":
            caches.append((k, v, None, None))
        else:
            fmt = kv_cache_format(name, torch.bfloat16)
            (kc, ks), (vc, vs) = quantize_kv(k, fmt), quantize_kv(v, fmt)
            caches.append((kc, vc, ks, vs))
    return caches


def bench_mix(batch: int, shortest: int, longest: int, block: int,
              cuda_kernels: Sequence[tuple[str, Callable]] = (("cuda", paged_decode_cuda.paged_decode_cuda),),
              formats: Sequence[str] = ("bfloat16", "int8", "fp8")) -> list[dict]:
    """One row per cache format and kernel: Triton's decode, then (8-bit caches) each of ``cuda_kernels`` (label,
    a function with paged_decode_cuda's signature), checked against Triton's output and timed."""
    lengths = torch.randint(shortest, longest, (batch,))
    tables, num_blocks = random_tables(lengths, block)
    lens = lengths.cuda()
    rows = torch.arange(batch, device="cuda")
    query = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    splits = choose_num_splits(batch, KV_HEADS, tables.shape[1] * block,
                               torch.cuda.get_device_properties(0).multi_processor_count)
    tokens = int(lengths.sum())
    shape = (num_blocks, KV_HEADS, block, DIM)
    copies = max(2, triton.cdiv(ROTATION_BYTES, 2 * num_blocks * KV_HEADS * block * DIM * 2))
    options = dict(scale=DIM ** -0.5, sliding_window=None, logit_softcap=None, num_splits=splits)
    base = {"sequences": batch, "mean_context": tokens / batch, "splits": splits}
    results = []
    for name in formats:
        caches = random_caches(name, shape, copies)
        element = 2 if name == "bfloat16" else 1
        nbytes = tokens * KV_HEADS * 2 * (DIM * element + (0 if name == "bfloat16" else 4))

        def call(kernel, i, caches=caches):
            kc, vc, ks, vs = caches[i]
            kernel(query, kc, vc, tables, lens, rows, out, k_scale=ks, v_scale=vs, **options)

        kernels = [("triton", paged_decode)]
        if name != "bfloat16" and paged_decode_cuda.takes(query, *caches[0], tables, lens, rows):
            kernels += cuda_kernels
        reference = None
        for label, kernel in kernels:
            call(kernel, 0)
            torch.cuda.synchronize()
            if reference is None:
                reference = out.float().clone()
                difference = 0.0
            else:
                difference = ((out.float() - reference).norm() / reference.norm()).item()
            ms = graph_ms(lambda i, k=kernel: call(k, i), copies)
            results.append({**base, "cache": name, "kernel": label, "us": ms * 1e3, "TBps": nbytes / ms / 1e9,
                            "relative_difference": difference})
    return results


def print_table(results: list[dict]) -> None:
    """The rows, each kernel's speed against the Triton kernel on the same cache."""
    header = ("seqs", "mean ctx", "splits", "cache", "kernel", "us", "TB/s", "vs triton", "rel diff")
    print(" ".join(f"{h:>9}" for h in header))
    triton_us = {}
    for r in results:
        key = (r["sequences"], r["cache"])
        triton_us.setdefault(key, r["us"])
        print(f"{r['sequences']:>9} {r['mean_context']:>9.0f} {r['splits']:>9} {r['cache']:>9} {r['kernel']:>9} "
              f"{r['us']:>9.1f} {r['TBps']:>9.2f} {triton_us[key] / r['us']:>8.2f}x {r['relative_difference']:>9.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default 16)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.manual_seed(0)
    results = []
    for mix in MIXES:
        results += bench_mix(*mix, args.block_size)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
