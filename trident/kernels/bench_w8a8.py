"""Time the W8A8 kernels against bf16 cuBLAS and torch's int8 matmul on a CUDA device.

``python -m trident.kernels.bench_w8a8 [--json FILE] [--rows 1 16 64 256 4096] [--no-sweep]``: the projections of
Llama-3-8B (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336), each row count: cuBLAS (F.linear,
bfloat16); ``torch._int_mm`` on codes already quantized (cuBLASLt's int8 GEMM, which needs M > 16: the int8
baseline); the W8A8 layer's two kernels together (per-token quantization of bf16 x, then the int8 matmul with
its scale epilogue: what W8A8Linear runs); the matmul kernel alone with w8a8_config's tiles; and, with the sweep,
the matmul with every tile variant of tests/kernels/test_w8a8_matmul.py's list (the ones w8a8_config chooses
from). Calls are captured in a CUDA graph and timed by its replays (bench_gemv.graph_us), rotating over weight
copies of ROTATION_BYTES together. GB/s counts the weight bytes read once; TFLOP/s 2 M N K. Every output is
checked against the reference on the same codes (w8a8_matmul_reference) before it is timed; a variant that fails
is recorded with the reason.

``--dry-run`` runs the same code on tiny shapes with wall-clock timing, to check the script without a GPU (on
the CPU under ``TRITON_INTERPRET=1``; ``torch._int_mm`` then runs torch's CPU kernel).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from trident.kernels.bench_gemv import ROTATION_BYTES, TimeUs, _checked_us, bench_device, graph_us, wall_us
from trident.kernels.bench_gemv import dash_cell as _cell
from trident.kernels.bench_gemv import write_results as write_json
from trident.kernels.w8a8_matmul import W8A8Tiles, quantize_rows, w8a8_config, w8a8_matmul
from trident.quant.w8a8 import w8a8_matmul_reference

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))
"""Llama-3-8B's projections (name, N, K)."""
ROWS = (1, 16, 64, 256, 4096)
VARIANTS = tuple(W8A8Tiles(*v) for v in (
    (16, 16, 128, 4, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3)))
"""Tiles swept (the decode ones only up to 16 rows)."""
DTYPE = torch.bfloat16
DRY_SHAPES = (("tall", 100, 256), ("wide", 33, 1024))
DRY_ROWS = (1, 20)
DRY_DTYPE = torch.float16
"""Triton 3.6's CPU interpreter multiplies bfloat16 tl.dot operands as raw bits; float16 it computes right."""


def variant_name(config: W8A8Tiles) -> str:
    return "m{}_n{}_k{}_w{}_st{}".format(*config)


def bench_shape(projection: str, n: int, k: int, rows: tuple[int, ...], time_us: TimeUs, device: torch.device,
                dtype: torch.dtype, sweep: bool) -> list[dict]:
    """One row per row count."""
    copies = max(1, triton.cdiv(ROTATION_BYTES, n * k)) if device.type == "cuda" else 2
    codes = [torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8) for _ in range(copies)]
    w_scales = torch.rand(n, device=device) * 1e-3 + 1e-3
    dense = [(c.to(dtype) * w_scales[:, None].to(dtype)) for c in codes[:max(1, copies // 2)]]
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        x_codes, x_scales = quantize_rows(x)
        expected = w8a8_matmul_reference(x_codes, x_scales, codes[0], w_scales, None, torch.float32)
        row = {"projection": projection, "n": n, "k": k, "m": m, "weight_copies": copies,
               "ours_config": variant_name(w8a8_config(m, n, k))}
        row["cublas_bf16_us"] = _checked_us(time_us, lambda i, x=x: F.linear(x, dense[i % len(dense)]),
                                            len(dense), F.linear(x, dense[0]).float())
        row["int_mm_us"] = None if device.type == "cuda" and m <= 16 else _checked_us(  # cuBLASLt: M > 16
            time_us, lambda i, xc=x_codes, xs=x_scales: torch._int_mm(xc, codes[i].T).float() * xs[:, None]
            * w_scales, copies, expected)
        row["w8a8_us"] = _checked_us(
            time_us, lambda i, x=x: w8a8_matmul(*quantize_rows(x), codes[i], w_scales, None, dtype), copies,
            expected)
        row["matmul_us"] = _checked_us(
            time_us, lambda i, xc=x_codes, xs=x_scales: w8a8_matmul(xc, xs, codes[i], w_scales, None, dtype),
            copies, expected)
        variants = tuple(v for v in VARIANTS if (v.block_m == 16) == (m <= 16)) if sweep else ()
        row["variants_us"] = {variant_name(v): _checked_us(
            time_us, lambda i, xc=x_codes, xs=x_scales, v=v: w8a8_matmul(xc, xs, codes[i], w_scales, None, dtype,
                                                                        config=v), copies, expected)
            for v in variants}
        timed = {v: us for v, us in row["variants_us"].items() if isinstance(us, float)}
        row["best_variant"] = min(timed, key=timed.get) if timed else None
        row["best_us"] = timed.get(row["best_variant"])
        for key in ("cublas_bf16", "int_mm", "w8a8", "matmul", "best"):
            us = row.get(f"{key}_us")
            nbytes = n * k * (2 if key == "cublas_bf16" else 1)
            row[f"{key}_GBps"] = nbytes / us / 1e3 if isinstance(us, float) else None
            row[f"{key}_TFLOPs"] = 2 * m * n * k / us / 1e6 if isinstance(us, float) else None
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_table(rows: list[dict], timing: str) -> None:
    print(f"\n{'proj':8} {'N x K':>12} {'M':>5} {'bf16 us':>8} {'int_mm us':>9} {'w8a8 us':>8} {'matmul us':>9} "
          f"{'TFLOP/s':>7} {'GB/s':>6} {'x bf16':>6}  {'best variant':24} {'best us':>8}   ({timing})")
    for r in rows:
        speedup = (r["cublas_bf16_us"] / r["w8a8_us"] if isinstance(r["cublas_bf16_us"], float)
                   and isinstance(r["w8a8_us"], float) else None)
        print(f"{r['projection']:8} {r['n']:>6}x{r['k']:<5} {r['m']:>5} {_cell(r['cublas_bf16_us'], '.2f', 8)} "
              f"{_cell(r['int_mm_us'], '.2f', 9)} {_cell(r['w8a8_us'], '.2f', 8)} {_cell(r['matmul_us'], '.2f', 9)} "
              f"{_cell(r['w8a8_TFLOPs'], '.1f', 7)} {_cell(r['w8a8_GBps'], '.0f', 6)} {_cell(speedup, '.2f', 6)}  "
              f"{r['best_variant'] or '-':24} {_cell(r['best_us'], '.2f', 8)}")
    for r in rows:
        for what, us in [("cuBLAS bf16", r["cublas_bf16_us"]), ("int_mm", r["int_mm_us"]), ("w8a8", r["w8a8_us"]),
                         ("matmul", r["matmul_us"]), *r["variants_us"].items()]:
            if isinstance(us, str):
                print(f"failed: {r['projection']} M={r['m']} {what}: {us}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help=f"row counts of x (default {ROWS})")
    parser.add_argument("--no-sweep", action="store_true", help="only the default tiles and the baselines")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wall clock: checks the script only")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.dry_run)
    if args.dry_run:
        shapes, rows, time_us, dtype = DRY_SHAPES, DRY_ROWS, wall_us, DRY_DTYPE
    else:
        shapes, rows, time_us, dtype = SHAPES, ROWS, graph_us, DTYPE
    rows = tuple(args.rows) if args.rows else rows
    results = []
    for projection, n, k in shapes:
        results += bench_shape(projection, n, k, rows, time_us, device, dtype, sweep=not args.no_sweep)
    print_table(results, "wall clock, dry run" if args.dry_run else "CUDA-graph replays")
    if args.json:
        write_json(args.json, device, dtype, args.dry_run, results)


if __name__ == "__main__":
    main()
