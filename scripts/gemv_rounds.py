"""How the batch-1 CUDA product's time (trident/native/gemv_cuda.cu) grows with its rows: N swept at fixed K, int4
group 128 (symmetric: its zero point) and int8 per channel, CUDA-graph replays rotating weights beyond the L2 (as
`python -m trident.kernels.bench_quant_matmul --rows 1` does). "rounds" is row groups (pairs, or single rows where
the kernel takes those: gemv_cuda.launch_shape) per warp of the grid's resident warps: on an H200 the time steps
with whole rounds, not with bytes (docs/benchmarks.md, session 13).

    python scripts/gemv_rounds.py                 # the sweep
    python scripts/gemv_rounds.py --launch CASE   # three eager launches of one case, a target for Nsight Compute:
    ncu --clock-control none --kernel-name regex:^gemv_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python scripts/gemv_rounds.py --launch int8_down
"""
import argparse

import torch

from trident.kernels.bench_gemv import graph_us
from trident.kernels.bench_quant_matmul import random_weight, rotated_weights
from trident.native import gemv_cuda

FORMATS = {"int4": (4, 128, True), "int8": (8, None, False)}
"""Name -> (bits, group size, offsets): what `trident bench --weights int4|int8` builds."""
ROWS = (1024, 2048, 3072, 4096, 4224, 4608, 5120, 6144, 7168, 8192, 8448, 10240, 12288, 12672)
CASES = {"int8_qkv": ("int8", 6144, 4096), "int8_gate_up": ("int8", 28672, 4096), "int8_down": ("int8", 4096, 14336),
         "int4_qkv": ("int4", 6144, 4096), "int4_gate_up": ("int4", 28672, 4096), "int4_down": ("int4", 4096, 14336)}
"""Llama-3-8B's projections, for --launch."""


def time_product(fmt: str, n: int, k: int, device: torch.device) -> tuple[float, int]:
    """(microseconds per call, bytes of one weight) of an N x K product of format ``fmt``."""
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    weights = rotated_weights(n, k, *FORMATS[fmt], device)
    return graph_us(lambda i: gemv_cuda.gemv(x, weights[i]), len(weights)), weights[0].nbytes()


def sweep(device: torch.device) -> None:
    lib = gemv_cuda.library()
    warps_per_block = lib.tq_gemv_threads() // 32
    warps = gemv_cuda.sm_count(device.index or 0) * gemv_cuda.BLOCKS_PER_SM * warps_per_block
    for fmt in FORMATS:
        for k in (4096, 14336):
            for n in ROWS:
                us, nbytes = time_product(fmt, n, k, device)
                rows = gemv_cuda.launch_shape(FORMATS[fmt][0], n, k, gemv_cuda.device_index(device))[0]
                print(f"{fmt} K={k:5} N={n:5} rows/warp={rows} rounds={n / rows / warps:5.2f} {us:7.2f} us "
                      f"{nbytes / us / 1e3:6.0f} GB/s", flush=True)


def launch(case: str, device: torch.device) -> None:
    fmt, n, k = CASES[case]
    bits, group, offsets = FORMATS[fmt]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    for w in [random_weight(n, k, bits, group, offsets, device) for _ in range(3)]:
        gemv_cuda.gemv(x, w)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", choices=sorted(CASES), help="three eager launches of one case (for ncu)")
    args = parser.parse_args()
    device = torch.device("cuda")
    if gemv_cuda.library() is None:
        raise SystemExit(f"the CUDA product is not built: {gemv_cuda.why_unavailable()}")
    if args.launch:
        launch(args.launch, device)
    else:
        sweep(device)


if __name__ == "__main__":
    main()
