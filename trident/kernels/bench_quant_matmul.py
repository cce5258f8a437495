"""Time the weight-only quantized matmul kernel against the bf16 kernels (gemv, cuBLAS) on a CUDA device.

``python -m trident.kernels.bench_quant_matmul [--json FILE] [--rows 1 16 64 256] [--formats int8 int4-g128]``:
the projections of Llama-3-8B (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336), each row count and
format: cuBLAS (F.linear) and, up to 16 rows, trident's bf16 gemv on the same shape in bfloat16; the kernel with
quant_matmul_config's tiles; and a sweep of tile variants (GEMV_VARIANTS up to 16 rows, GEMM_VARIANTS beyond, some
splitting K: named ..._sk{split_k}); at one row also the CUDA integer kernel (trident/native/gemv_cuda.cu) where
nvcc built it, which is what the models run then. Calls are captured in a CUDA graph and timed by its replays
(bench_gemv.graph_us), rotating over weight copies of ROTATION_BYTES together so that each call reads its weight
from memory. GB/s counts the weight bytes each call reads once (bf16: 2 bytes per weight; quantized: codes, scales
and offsets); TFLOP/s 2 M N K. Every output is checked against the reference (float32 dequantization and matmul)
before it is timed; a variant that fails to compile, launch or match is recorded with the reason, and the sweep goes
on.

``--dry-run`` runs the same code on tiny float16 shapes with wall-clock timing, to check the script without a
GPU (on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from trident.kernels.bench_gemv import (
    ROTATION_BYTES,
    TimeUs,
    _checked_us,
    bench_device,
    graph_us,
    wall_us,
    write_results,
)
from trident.kernels.bench_gemv import dash_cell as _cell
from trident.kernels.gemv import gemv
from trident.kernels.quant_matmul import QGEMV_MAX_ROWS, TileConfig, quant_matmul, quant_matmul_config
from trident.native import gemv_cuda
from trident.quant.affine import AffineWeight, affine_matmul_reference

SHAPES = (("llama3-8b", "qkv", 6144, 4096), ("llama3-8b", "o", 4096, 4096), ("llama3-8b", "gate_up", 28672, 4096),
          ("llama3-8b", "down", 4096, 14336), ("qwen3-30b-a3b", "qkv", 5120, 2048), ("qwen3-30b-a3b", "o", 2048, 4096))
"""(model, projection, N, K) of the weights [N, K]: Llama-3-8B's projections and Qwen3-30B-A3B's attention ones
(its MLPs are routed experts, trident/kernels/bench_moe_experts.py)."""
ROWS = (1, 16, 64, 256)
FORMATS = {"int8": (8, None, False), "int8-g128": (8, 128, False), "int4-g128": (4, 128, True),
           "int4-g32": (4, 32, True)}
"""Name -> (bits, group size or None per channel, offsets): int8 per channel symmetric and int4 group-128
symmetric (offset -8 s) are what `trident bench --weights int8|int4` runs by default."""
DEFAULT_FORMATS = ("int8", "int4-g128")
GEMV_VARIANTS = tuple(TileConfig(16, *v) for v in (
    (8, 512, 1, 4), (8, 1024, 1, 4), (16, 256, 2, 4), (16, 512, 2, 4), (16, 512, 2, 3), (16, 1024, 2, 3),
    (32, 256, 4, 4), (32, 512, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3)))
"""Matrix-vector tiles swept up to 16 rows (block_m replaced by the row count's power of two)."""
GEMM_VARIANTS = tuple(TileConfig(*v) for v in (
    (32, 64, 64, 4, 4), (64, 32, 128, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
    (32, 32, 256, 4, 4), (32, 64, 256, 4, 3), (64, 32, 256, 4, 4), (64, 64, 256, 4, 3), (64, 64, 128, 4, 4),
    (64, 128, 128, 8, 3), (64, 32, 64, 4, 3),
    (64, 64, 128, 8, 4), (64, 32, 128, 8, 4), (64, 32, 64, 4, 4), (64, 128, 64, 8, 4), (32, 64, 128, 8, 4))) + tuple(
    TileConfig(*v, split_k) for v in ((32, 32, 256, 4, 4), (64, 32, 256, 4, 4), (64, 64, 256, 4, 3))
    for split_k in (2, 4, 8)) + tuple(
    TileConfig(*v, split_k) for v in ((64, 64, 128, 8, 4), (64, 32, 128, 8, 4)) for split_k in (2, 4)) + (
    TileConfig(64, 32, 64, 4, 3, 2), TileConfig(64, 32, 64, 4, 3, 4), TileConfig(64, 128, 64, 4, 3, 2)) + tuple(
    TileConfig(*v, swap=True) for v in (
        (16, 64, 256, 4, 3), (32, 64, 256, 4, 3), (32, 64, 128, 4, 4), (64, 64, 256, 4, 3), (64, 64, 128, 4, 4),
        (64, 128, 128, 4, 3), (64, 128, 128, 8, 3), (64, 64, 128, 4, 4, 2), (32, 64, 256, 4, 3, 2),
        (64, 64, 256, 4, 3, 2), (128, 64, 128, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4, 2)))
"""Matrix-multiply tiles swept beyond 16 rows: the last ones split K (split_k programs per tile): int8's
batched-decode tiles and the matrix-multiply rule's at 64 rows (int4, and int8 over wide matrices) split as
quant_matmul_config's split-K rule would, and around that; then tiles multiplied transposed (swap: named ..._sw)."""
DTYPE = torch.bfloat16

DRY_SHAPES = (("dry", "tall", 100, 256), ("dry", "wide", 33, 1024))
DRY_ROWS = (1, 20)
DRY_DTYPE = torch.float16
"""Triton 3.6's CPU interpreter multiplies bfloat16 tl.dot operands as raw bits; float16 it computes right."""


def variant_name(config: TileConfig) -> str:
    """m{block_m}_n{block_n}_k{block_k}_w{num_warps}_st{num_stages}, then _sk{split_k} where K is split and _sw
    where the tile is multiplied transposed."""
    name = "m{}_n{}_k{}_w{}_st{}".format(*config)
    name = name if config.split_k == 1 else f"{name}_sk{config.split_k}"
    return f"{name}_sw" if config.swap else name


def random_weight(n: int, k: int, bits: int, group_size: int | None, offsets: bool,
                  device: torch.device) -> AffineWeight:
    """Random codes over their range, scales ~ 1e-3 .. 2e-3 and offsets -8 scales (symmetric int4's form, with its
    zero point)."""
    groups = 1 if group_size is None else k // group_size
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    else:
        codes = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    scales = torch.rand(n, groups, device=device) * 1e-3 + 1e-3
    return AffineWeight(codes, scales, -8.0 * scales if offsets else None, bits, 8 if offsets else 0)


def rotated_weights(n: int, k: int, bits: int, group_size: int | None, offsets: bool,
                    device: torch.device) -> list[AffineWeight]:
    """Random weights (:func:`random_weight`) enough to fill ROTATION_BYTES on CUDA (calls cycling through them read
    each from memory, not from the L2), two elsewhere."""
    first = random_weight(n, k, bits, group_size, offsets, device)
    copies = max(1, triton.cdiv(ROTATION_BYTES, first.nbytes())) if device.type == "cuda" else 2
    return [first] + [random_weight(n, k, bits, group_size, offsets, device) for _ in range(copies - 1)]


def bench_shape(model: str, projection: str, n: int, k: int, rows: tuple[int, ...], formats: tuple[str, ...],
                time_us: TimeUs, device: torch.device, dtype: torch.dtype, sweep: bool) -> list[dict]:
    """One row per row count and format: the bf16 baselines, the kernel's own tiles and every variant."""
    dense_bytes = n * k * dtype.itemsize
    dense_copies = max(1, triton.cdiv(ROTATION_BYTES, dense_bytes)) if device.type == "cuda" else 2
    dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(dense_copies)]
    quantized = {}
    for name in formats:
        quantized[name] = rotated_weights(n, k, *FORMATS[name], device)
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        dense_expected = F.linear(x, dense[0]).float()
        baselines = {"cublas_us": _checked_us(time_us, lambda i, x=x: F.linear(x, dense[i]), dense_copies,
                                              dense_expected)}
        if m <= QGEMV_MAX_ROWS:
            baselines["gemv_us"] = _checked_us(time_us, lambda i, x=x: gemv(x, dense[i]), dense_copies,
                                               dense_expected)
        for name, weights in quantized.items():
            w0 = weights[0]
            expected = affine_matmul_reference(x, w0).float()
            config = quant_matmul_config(m, n, k, w0.bits, w0.group_size)
            row = {"model": model, "projection": projection, "n": n, "k": k, "m": m, "format": name,
                   "weight_bytes": w0.nbytes(), "bf16_bytes": dense_bytes, "weight_copies": len(weights),
                   "ours_config": variant_name(config), **baselines}
            row["ours_us"] = _checked_us(time_us, lambda i, x=x, ws=weights: quant_matmul(x, ws[i]), len(weights),
                                         expected)
            if gemv_cuda.takes(x, w0, None):  # one row: what affine_linear runs where nvcc built the CUDA kernel
                row["cuda_us"] = _checked_us(time_us, lambda i, x=x, ws=weights: gemv_cuda.gemv(x, ws[i]),
                                             len(weights), expected)
            variants = (GEMV_VARIANTS if m <= QGEMV_MAX_ROWS else GEMM_VARIANTS) if sweep else ()
            if m <= QGEMV_MAX_ROWS:
                variants = tuple(v._replace(block_m=triton.next_power_of_2(m)) for v in variants)
            row["variants_us"] = {
                variant_name(v): _checked_us(time_us, lambda i, x=x, v=v, ws=weights: quant_matmul(x, ws[i], config=v),
                                             len(weights), expected)
                for v in variants}
            timed = {v: us for v, us in row["variants_us"].items() if isinstance(us, float)}
            row["best_variant"] = min(timed, key=timed.get) if timed else None
            row["best_us"] = timed[row["best_variant"]] if timed else None
            for key, nbytes in (("cublas", dense_bytes), ("gemv", dense_bytes), ("ours", w0.nbytes()),
                                ("best", w0.nbytes()), ("cuda", w0.nbytes())):
                us = row.get(f"{key}_us")
                row[f"{key}_GBps"] = nbytes / us / 1e3 if isinstance(us, float) else None
            row["ours_TFLOPs"] = 2 * m * n * k / row["ours_us"] / 1e6 if isinstance(row["ours_us"], float) else None
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def print_table(rows: list[dict], timing: str) -> None:
    print(f"\n{'proj':8} {'N x K':>12} {'M':>4} {'format':10} {'cuBLAS us':>9} {'gemv us':>8} {'ours us':>8} "
          f"{'ours GB/s':>9} {'TFLOP/s':>7} {'x best bf16':>11}  {'best variant':24} {'best us':>8} {'GB/s':>6}"
          f" {'CUDA us':>8} {'GB/s':>6}   ({timing})")
    for r in rows:
        bf16 = [us for us in (r.get("cublas_us"), r.get("gemv_us")) if isinstance(us, float)]
        speedup = min(bf16) / r["ours_us"] if bf16 and isinstance(r["ours_us"], float) else None
        print(f"{r['projection']:8} {r['n']:>6}x{r['k']:<5} {r['m']:>4} {r['format']:10} "
              f"{_cell(r['cublas_us'], '.2f', 9)} {_cell(r.get('gemv_us'), '.2f', 8)} {_cell(r['ours_us'], '.2f', 8)} "
              f"{_cell(r['ours_GBps'], '.0f', 9)} {_cell(r['ours_TFLOPs'], '.1f', 7)} {_cell(speedup, '.2f', 11)}  "
              f"{r['best_variant'] or '-':24} {_cell(r['best_us'], '.2f', 8)} {_cell(r['best_GBps'], '.0f', 6)} "
              f"{_cell(r.get('cuda_us'), '.2f', 8)} {_cell(r.get('cuda_GBps'), '.0f', 6)}")
    failed = [(r["projection"], r["m"], r["format"], v, us) for r in rows for v, us in r["variants_us"].items()
              if not isinstance(us, float)]
    failed += [(r["projection"], r["m"], r["format"], "ours", r["ours_us"]) for r in rows
               if not isinstance(r["ours_us"], float)]
    for projection, m, name, variant, why in failed:
        print(f"failed: {projection} M={m} {name} {variant}: {why}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help=f"row counts of x (default {ROWS})")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(DEFAULT_FORMATS),
                        help=f"weight formats (default {' '.join(DEFAULT_FORMATS)})")
    parser.add_argument("--models", nargs="+", choices=sorted({s[0] for s in SHAPES}), default=None,
                        help="only these models' projections (default: all of SHAPES)")
    parser.add_argument("--no-sweep", action="store_true", help="only the default tiles and the bf16 baselines")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wall clock: checks the script only")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.dry_run)
    if args.dry_run:
        shapes, rows, time_us, dtype = DRY_SHAPES, DRY_ROWS, wall_us, DRY_DTYPE
    else:
        shapes, rows, time_us, dtype = SHAPES, ROWS, graph_us, DTYPE
    rows = tuple(args.rows) if args.rows else rows
    if args.models and not args.dry_run:
        shapes = tuple(s for s in shapes if s[0] in args.models)
    results = []
    for model, projection, n, k in shapes:
        results += bench_shape(model, projection, n, k, rows, tuple(args.formats), time_us, device, dtype,
                               sweep=not args.no_sweep)
    print_table(results, "wall clock, dry run" if args.dry_run else "CUDA-graph replays")
    if args.json:
        write_results(args.json, device, dtype, args.dry_run, results)


if __name__ == "__main__":
    main()
