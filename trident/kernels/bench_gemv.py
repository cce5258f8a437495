"""Time the matrix-vector kernel against cuBLAS (F.linear) for a few rows of x on a CUDA device.

``python -m trident.kernels.bench_gemv [--json FILE] [--rows 1 2 4 8 16]``: the projections of Llama-3-8B
(qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, LM head 128256x4096) and Qwen3-0.6B (qkv
4096x1024, o 1024x2048, gate_up 6144x1024, down 1024x3072, LM head 151936x1024), bf16, each row count: cuBLAS,
the kernel with gemv_config's tiles, and a sweep of tile variants (VARIANTS). Calls are captured in a CUDA
graph and timed by its replays (medians of triton.testing.do_bench), so launch overhead stays out; they
rotate over copies of the weight, over ROTATION_BYTES together (beyond twice the H200's 50 MB L2), so every
call reads its weight from memory. TB/s counts the weight bytes once per call. Every output is checked
against cuBLAS' before it is timed; a variant that fails to compile, to launch or to match is recorded with
the reason, and the sweep goes on.

``--dry-run`` runs the same code on tiny float16 shapes with wall-clock timing and one variant that cannot
compile, to check the script without a GPU (on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from trident.kernels.bench_attention import graph_ms
from trident.kernels.gemv import gemv, gemv_config

SHAPES = (
    ("llama3-8b", "qkv", 6144, 4096), ("llama3-8b", "o", 4096, 4096), ("llama3-8b", "gate_up", 28672, 4096),
    ("llama3-8b", "down", 4096, 14336), ("llama3-8b", "lm_head", 128256, 4096),
    ("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o", 1024, 2048), ("qwen3-0.6b", "gate_up", 6144, 1024),
    ("qwen3-0.6b", "down", 1024, 3072), ("qwen3-0.6b", "lm_head", 151936, 1024),
)
"""(model, projection, N, K) of the weights [N, K]."""
ROWS = (1, 2, 4, 8, 16)
"""Row counts of x: decode batches; 16 is GEMV_MAX_ROWS, the most the models' linear() sends to the kernel."""
VARIANTS = (
    (8, 512, 1, 3), (8, 1024, 1, 3), (8, 1024, 2, 4),
    (16, 256, 2, 4), (16, 512, 2, 2), (16, 512, 2, 3), (16, 512, 4, 4), (16, 1024, 2, 3),
    (32, 256, 4, 3), (32, 256, 4, 5), (32, 512, 4, 3),
    (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 8, 3),
)
"""(block_n, block_k, num_warps, num_stages) swept for every shape: weight tiles of 8 to 32 KB, one to eight
warps, two to five stages (all fit the H200's shared memory at 16 rows), gemv_config's choices for SHAPES
among them. The same list for every shape, so each compiles once per row bucket."""
ROTATION_BYTES = 128 << 20
"""The weight copies of a shape add up to at least this: 134 MB, beyond twice the H200's 50 MB L2."""
DTYPE = torch.bfloat16
WARMUP_MS, REP_MS = 10, 40
"""do_bench budget per figure (each replay already averages 10 to 50 calls): keeps the sweep near 3 minutes."""

DRY_SHAPES = (("dry", "tall", 100, 272), ("dry", "wide", 33, 1000))
DRY_ROWS = (1, 3)
DRY_VARIANTS = ((16, 256, 2, 3), (24, 256, 1, 2))
"""The dry run's second variant cannot compile (tl.arange needs a power of two): the failure path runs too."""
DRY_DTYPE = torch.float16
"""Triton 3.6's CPU interpreter multiplies bfloat16 tl.dot operands as raw bits; float16 it computes right."""

TimeUs = Callable[[Callable[[int], object], int], float]


def graph_us(fn: Callable[[int], object], rotations: int) -> float:
    """Per-call microseconds of calls captured in one CUDA graph, cycling through the rotations."""
    return graph_ms(fn, rotations, WARMUP_MS, REP_MS) * 1000


def wall_us(fn: Callable[[int], object], rotations: int) -> float:
    """Per-call microseconds of one eager pass over the rotations by the wall clock (the dry run)."""
    start = time.perf_counter()
    for i in range(rotations):
        fn(i)
    return (time.perf_counter() - start) * 1e6 / rotations


def variant_name(config: tuple[int, int, int, int]) -> str:
    block_n, block_k, num_warps, num_stages = config
    return f"n{block_n}_k{block_k}_w{num_warps}_st{num_stages}"


def _checked_us(time_us: TimeUs, fn: Callable[[int], torch.Tensor], rotations: int,
                expected: torch.Tensor) -> float | str:
    """fn's time once its first output matches ``expected`` (cuBLAS'), or why it has none: a variant that
    fails to compile, launch or match must not end the sweep."""
    try:
        out = fn(0).float()
        rel = ((out - expected).norm() / expected.norm()).item()
        if not rel < 2e-2:  # bf16 rounds the outputs to ~4e-3; a wrong tile is off by order 1 (or NaN)
            return f"wrong result: relative error {rel:.2e} against cuBLAS"
        return time_us(fn, rotations)
    except Exception as e:  # any compile, launch or capture failure is a result here
        return f"{type(e).__name__}: {str(e)[:160]}"


def bench_shape(model: str, projection: str, n: int, k: int, rows: tuple[int, ...], variants: tuple,
                time_us: TimeUs, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per row count: cuBLAS, gemv_config's tiles and every variant on the weight [n, k]."""
    weight_bytes = n * k * dtype.itemsize
    copies = max(1, triton.cdiv(ROTATION_BYTES, weight_bytes)) if device.type == "cuda" else 2
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        expected = F.linear(x, weights[0]).float()
        row = {"model": model, "projection": projection, "n": n, "k": k, "m": m, "weight_copies": copies,
               "ours_config": variant_name(gemv_config(m, n, k, dtype))}
        row["cublas_us"] = _checked_us(time_us, lambda i, x=x: F.linear(x, weights[i]), copies, expected)
        row["ours_us"] = _checked_us(time_us, lambda i, x=x: gemv(x, weights[i]), copies, expected)
        row["variants_us"] = {
            variant_name(v): _checked_us(time_us, lambda i, x=x, v=v: gemv(x, weights[i], config=v), copies,
                                         expected)
            for v in variants}
        timed = {name: us for name, us in row["variants_us"].items() if isinstance(us, float)}
        row["best_variant"] = min(timed, key=timed.get) if timed else None
        row["best_us"] = timed[row["best_variant"]] if timed else None
        for key in ("cublas", "ours", "best"):
            us = row[f"{key}_us"]
            row[f"{key}_TBps"] = weight_bytes / us / 1e6 if isinstance(us, float) else None
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def cell(value: float | str | None, spec: str, width: int, missing: str = "failed") -> str:
    """A table cell: a timed value formatted by ``spec``, else ``missing`` (a failed or skipped measurement)."""
    return format(value, spec).rjust(width) if isinstance(value, float) else missing.rjust(width)


def dash_cell(value: float | str | None, spec: str, width: int) -> str:
    """:func:`cell` with '-' for a missing value (tables whose empty cells are not failures)."""
    return cell(value, spec, width, missing="-")


def print_table(rows: list[dict], timing: str) -> None:
    print(f"\n{'model':11} {'proj':8} {'N x K':>12} {'M':>3} {'cuBLAS us':>10} {'ours us':>8} {'ours TB/s':>9} "
          f"{'x cuBLAS':>8}  {'best variant':20} {'best us':>8} {'best TB/s':>9}   ({timing})")
    for r in rows:
        ratio = (r["cublas_us"] / r["ours_us"] if isinstance(r["cublas_us"], float)
                 and isinstance(r["ours_us"], float) else None)
        print(f"{r['model']:11} {r['projection']:8} {r['n']:>6}x{r['k']:<5} {r['m']:>3} "
              f"{cell(r['cublas_us'], '.2f', 10)} {cell(r['ours_us'], '.2f', 8)} {cell(r['ours_TBps'], '.2f', 9)} "
              f"{cell(ratio, '.2f', 8)}  {r['best_variant'] or '-':20} {cell(r['best_us'], '.2f', 8)} "
              f"{cell(r['best_TBps'], '.2f', 9)}")


def bench_device(parser: argparse.ArgumentParser, dry_run: bool) -> torch.device:
    """CUDA for a real run; a dry run takes CUDA if there is one, else the CPU under Triton's interpreter."""
    if dry_run:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("a dry run without CUDA needs Triton's interpreter: set TRITON_INTERPRET=1")
        return device
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    return torch.device("cuda")


def write_results(path: str, device: torch.device, dtype: torch.dtype, dry_run: bool, rows: list[dict]) -> None:
    """A kernel benchmark's rows as JSON, with the machine and versions they were measured on."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    with open(path, "w") as f:
        json.dump({"device": machine, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                   "triton": triton.__version__, "dry_run": dry_run, "rows": rows}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help=f"row counts of x (default {ROWS})")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wall clock: checks the script only")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.dry_run)
    if args.dry_run:
        shapes, rows, variants, time_us, dtype = DRY_SHAPES, DRY_ROWS, DRY_VARIANTS, wall_us, DRY_DTYPE
    else:
        shapes, rows, variants, time_us, dtype = SHAPES, ROWS, VARIANTS, graph_us, DTYPE
    rows = tuple(args.rows) if args.rows else rows
    results = []
    for model, projection, n, k in shapes:
        results += bench_shape(model, projection, n, k, rows, variants, time_us, device, dtype)
    print_table(results, "wall clock, dry run" if args.dry_run else "CUDA-graph replays")
    if args.json:
        write_results(args.json, device, dtype, args.dry_run, results)


if __name__ == "__main__":
    main()
