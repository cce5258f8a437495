"""Time 2:4 semi-structured sparse matmuls (trident/quant/sparse24.py) against dense bf16 cuBLAS on a CUDA device.

``python -m trident.kernels.bench_sparse24 [--json FILE] [--rows 1 16 64 256 2048] [--dtype bfloat16]``:
Llama-3-8B's linear shapes (o 4096x4096, gate or up 14336x4096, down 4096x14336), each row count M of x:

- ``dense``: F.linear on the masked weight held dense (cuBLAS);
- ``trident_dense``: trident's own dense ``linear`` on it (the Triton GEMV kernel up to 16 rows, else cuBLAS):
  what a 2:4 folder runs without --sparse-kernel, so the ratio that decides whether the flag pays off;
- ``cusparselt``: what SparseLinear24 runs with torch's cuSPARSELt backend (``sparse24.sparse_linear``:
  ``F.linear(x, W_sparse)``, x padded to a multiple of 8 rows, ``torch._cslt_sparse_mm``, and the copy to a
  contiguous output where torch returns a transposed view), the default algorithm;
- ``cusparselt_search``: the same with the algorithm id ``torch._cslt_sparse_mm_search`` picks for this shape
  (what a tuned integration could fix per shape);
- ``cutlass``: torch's CUTLASS backend (sm8x only: on the H200's sm90 torch refuses it, recorded as the reason).

Calls are captured in a CUDA graph and timed by its replays (bench_gemv.graph_us), rotating over weight copies
of ROTATION_BYTES together so every call reads its weight from memory; ``cusparselt_eager_us`` times the same
sparse calls without a graph (should capture fail, its figure still stands). Every output is checked against the
dense product before it is timed; a variant that fails is recorded with the reason. GB/s counts the weight bytes
read once (dense: N K 2 bytes; sparse: the compressed tensor's bytes); TFLOP/s the dense-equivalent 2 M N K.

``--dry-run`` runs the same code on tiny shapes with wall-clock timing, to check the script without a GPU (on
the CPU every sparse variant is recorded as refused: torch's semi-structured tensors are CUDA-only).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from trident.compress.sparsity import two_four_mask
from trident.kernels.bench_gemv import ROTATION_BYTES, TimeUs, _checked_us, bench_device, graph_us, wall_us
from trident.kernels.bench_gemv import dash_cell as _cell
from trident.kernels.bench_gemv import write_results as write_json
from trident.models.layers import linear
from trident.quant.sparse24 import sparse_linear, to_semi_structured

SHAPES = (("o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336))
"""Llama-3-8B's linear shapes (name, N, K) of the weights [N, K]."""
ROWS = (1, 16, 64, 256, 2048)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SPARSE = ("cusparselt", "cusparselt_search", "cutlass")
DRY_SHAPES = (("dry", 128, 256),)
DRY_ROWS = (1, 20)
EAGER_WARMUP_MS, EAGER_REP_MS = 10, 40


def eager_us(fn, rotations: int) -> float:
    """Per-call microseconds of eager calls (no CUDA graph: launch overhead included), cycling the rotations."""
    import triton

    calls = max(10, min(rotations, 50))

    def run() -> None:
        for i in range(calls):
            fn(i % rotations)

    return triton.testing.do_bench(run, warmup=EAGER_WARMUP_MS, rep=EAGER_REP_MS, return_mode="median") * 1000 / calls


def _sparse_weights(dense: list[torch.Tensor], backend: str) -> list[torch.Tensor] | str:
    try:
        return [to_semi_structured(w, backend) for w in dense]
    except Exception as e:  # a backend torch refuses here is a result
        return f"{type(e).__name__}: {str(e)[:160]}"


def _searched(weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor] | str:
    """The cuSPARSELt weights re-wrapped with the algorithm id torch's search picks for x's row count."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as Cslt

    try:
        rows = -(-x.shape[0] // 8) * 8  # torch pads the dense operand to a multiple of 8 rows
        padded = F.pad(x, (0, 0, 0, rows - x.shape[0]))
        alg_id = torch._cslt_sparse_mm_search(weights[0].packed, padded.t(), transpose_result=True)
        return [Cslt(w.shape, w.packed, None, None, None, None, alg_id_cusparselt=alg_id) for w in weights]
    except Exception as e:  # the search is a private torch API: its absence is a result
        return f"{type(e).__name__}: {str(e)[:160]}"


def _timed(time_us: TimeUs, weights, x: torch.Tensor, expected: torch.Tensor) -> float | str:
    if isinstance(weights, str):
        return weights
    return _checked_us(time_us, lambda i: sparse_linear(x, weights[i % len(weights)], None), len(weights), expected)


def bench_shape(projection: str, n: int, k: int, rows: tuple[int, ...], time_us: TimeUs, device: torch.device,
                dtype: torch.dtype, eager: TimeUs) -> list[dict]:
    """One row per row count."""
    copies = max(1, -(-ROTATION_BYTES // (n * k * dtype.itemsize))) if device.type == "cuda" else 2
    g = torch.Generator(device).manual_seed(0)
    dense = []
    for _ in range(copies):
        w = torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02
        dense.append(torch.where(two_four_mask(w.abs()), w, torch.zeros((), device=device, dtype=dtype)))
    cslt, cutlass = _sparse_weights(dense, "cusparselt"), _sparse_weights(dense, "cutlass")
    sparse_bytes = None if isinstance(cslt, str) else cslt[0].packed.numel() * cslt[0].packed.element_size()
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        expected = F.linear(x, dense[0]).float()
        row = {"projection": projection, "n": n, "k": k, "m": m, "weight_copies": copies,
               "dense_bytes": n * k * dtype.itemsize, "sparse_bytes": sparse_bytes}
        row["dense_us"] = _checked_us(time_us, lambda i, x=x: F.linear(x, dense[i]), copies, expected)
        row["trident_dense_us"] = _checked_us(time_us, lambda i, x=x: linear(x, dense[i]), copies, expected)
        row["cusparselt_us"] = _timed(time_us, cslt, x, expected)
        row["cusparselt_eager_us"] = _timed(eager, cslt, x, expected)
        searched = cslt if isinstance(cslt, str) else _searched(cslt, x)
        row["cusparselt_search_us"] = _timed(time_us, searched, x, expected)
        row["cutlass_us"] = _timed(time_us, cutlass, x, expected)
        for key in ("dense", "trident_dense", *SPARSE):
            us = row[f"{key}_us"]
            nbytes = row["dense_bytes"] if key.endswith("dense") else sparse_bytes
            row[f"{key}_TFLOPs"] = 2 * m * n * k / us / 1e6 if isinstance(us, float) else None
            row[f"{key}_GBps"] = nbytes / us / 1e3 if isinstance(us, float) and nbytes else None
        timed = {key: row[f"{key}_us"] for key in SPARSE if isinstance(row[f"{key}_us"], float)}
        row["best_sparse"] = min(timed, key=timed.get) if timed else None
        row["speedup"] = (row["dense_us"] / timed[row["best_sparse"]]
                          if timed and isinstance(row["dense_us"], float) else None)
        row["speedup_vs_trident"] = (row["trident_dense_us"] / timed[row["best_sparse"]]
                                     if timed and isinstance(row["trident_dense_us"], float) else None)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_table(rows: list[dict], timing: str) -> None:
    print(f"\n{'proj':8} {'N x K':>12} {'M':>5} {'dense us':>9} {'trident us':>10} {'cslt us':>8} "
          f"{'cslt eager':>10} {'cslt srch':>9} {'cutlass us':>10} {'dense TF/s':>10} {'sparse TF/s':>11} "
          f"{'x dense':>7} {'x trident':>9}  {'best':18}   ({timing})")
    for r in rows:
        best = r["best_sparse"]
        print(f"{r['projection']:8} {r['n']:>6}x{r['k']:<5} {r['m']:>5} {_cell(r['dense_us'], '.2f', 9)} "
              f"{_cell(r['trident_dense_us'], '.2f', 10)} {_cell(r['cusparselt_us'], '.2f', 8)} "
              f"{_cell(r['cusparselt_eager_us'], '.2f', 10)} "
              f"{_cell(r['cusparselt_search_us'], '.2f', 9)} {_cell(r['cutlass_us'], '.2f', 10)} "
              f"{_cell(r['dense_TFLOPs'], '.1f', 10)} {_cell(r[f'{best}_TFLOPs'] if best else None, '.1f', 11)} "
              f"{_cell(r['speedup'], '.2f', 7)} {_cell(r['speedup_vs_trident'], '.2f', 9)}  {best or '-':18}")
    reasons = {}
    for r in rows:
        for key in ("dense", "trident_dense", "cusparselt", "cusparselt_eager", *SPARSE[1:]):
            if isinstance(r[f"{key}_us"], str):
                reasons.setdefault((key, r[f"{key}_us"]), []).append(f"{r['projection']} M={r['m']}")
    for (key, why), where in reasons.items():
        print(f"failed: {key} ({', '.join(where)}): {why}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help=f"row counts of x (default {ROWS})")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weights and x (default bfloat16)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wall clock: checks the script only")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.dry_run)
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        shapes, rows, time_us, eager = DRY_SHAPES, DRY_ROWS, wall_us, wall_us
    else:
        shapes, rows, time_us, eager = SHAPES, ROWS, graph_us, eager_us
    rows = tuple(args.rows) if args.rows else rows
    start = time.perf_counter()
    results = []
    for projection, n, k in shapes:
        results += bench_shape(projection, n, k, rows, time_us, device, dtype, eager)
    print_table(results, "wall clock, dry run" if args.dry_run else "CUDA-graph replays")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, device, dtype, args.dry_run, results)


if __name__ == "__main__":
    main()
