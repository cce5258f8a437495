"""Time compile-time variants of the batch-1 CUDA product (trident/native/gemv_cuda.cu) on Llama-3-8B's four
projections and Qwen3-30B-A3B's attention projections (bench_quant_matmul.SHAPES), int4 group 128 and int8 per
channel, CUDA-graph replays rotating weights beyond the L2 (as
`python -m trident.kernels.bench_quant_matmul --rows 1` does). Each variant is a name, nvcc -D flags and a grid
(blocks per multiprocessor); the defaults compare the built defaults with two blocks of 8 warps and two activation
stages for int4. Every variant's products must match the first variant's. Prints every time and the per-layer
sums of each model's projections. Run on the GPU machine:

    python scripts/gemv_cuda_variants.py [NAME=FLAG,FLAG:BLOCKS_PER_SM ...]
    e.g. python scripts/gemv_cuda_variants.py default=:1 w8=-DGEMV_WARPS=8:2 int4_two=-DINT4_STAGES=2:1
"""
import ctypes
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from trident.kernels.bench_gemv import graph_us
from trident.kernels.bench_quant_matmul import SHAPES, rotated_weights
from trident.native import gemv_cuda
from trident.native.cuda_build import NVCC_FLAGS, _arch, _nvcc

SOURCE = "trident/native/gemv_cuda.cu"
FORMATS = (("int4-g128", 4, 128, True), ("int4-g128-offsets", 4, 128, True), ("int8", 8, None, False))
"""(name, bits, group size, offsets): symmetric int4 (its zero point: offsets -8 scales), the same weights with their
offsets read per group (as asymmetric int4 is), int8 per channel."""
DEFAULT = ("default=:1", "w8=-DGEMV_WARPS=8:2", "int4_two_stages=-DINT4_STAGES=2:1")


def parse(spec: str) -> tuple[str, list[str], int]:
    name, rest = spec.split("=", 1)
    flags, blocks = rest.rsplit(":", 1)
    return name, [f for f in flags.split(",") if f], int(blocks)


def build(variant: tuple[str, list[str], int]) -> ctypes.CDLL:
    name, flags, _ = variant
    arch = _arch()
    out = f"/tmp/tq_gemv_variant_{name}.so"
    done = subprocess.run([_nvcc(), *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", *flags, SOURCE,
                           "-o", out], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: nvcc failed\n{done.stderr[-2000:]}")
    lib = ctypes.CDLL(out)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.tq_gemv.argtypes = [i, i, i, p, p, p, p, i, p, p, i, i, i, i, i, p]
    lib.tq_gemv_rows_for.argtypes = [i, i, i, i]
    lib.tq_gemv_rows_for.restype = lib.tq_gemv_threads.restype = i
    return lib


def time_calls(lib: ctypes.CDLL, grid: int, bits: int, rows: int, x: torch.Tensor, weights: list,
               outputs: list) -> float:
    """Microseconds per call of ``lib``'s tq_gemv on x and each weight in turn (CUDA-graph replays)."""
    def call(i: int) -> torch.Tensor:
        w = weights[i]
        lib.tq_gemv(0, bits, rows, x.data_ptr(), w.codes.data_ptr(), w.scales.data_ptr(), *gemv_cuda._offsets(w),
                    None, outputs[i].data_ptr(), w.out_features, w.in_features, w.group_size, grid, 1,
                    torch.cuda.current_stream().cuda_stream)
        return outputs[i]

    return graph_us(call, len(weights))


def main() -> None:
    variants = [parse(s) for s in (sys.argv[1:] or DEFAULT)]
    with ThreadPoolExecutor(len(variants)) as pool:
        libs = list(pool.map(build, variants))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.device("cuda")
    totals: dict[tuple[str, str, str], float] = {}
    for fname, bits, group, offsets in FORMATS:
        for model, proj, n, k in SHAPES:
            weights = rotated_weights(n, k, bits, group, offsets, device)
            if fname.endswith("-offsets"):  # the same weights with their offsets read, not their zero point
                weights = [w._replace(zero_point=0) for w in weights]
            first = weights[0]
            x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
            outputs = [torch.empty(1, n, device=device, dtype=torch.bfloat16) for _ in weights]
            reference = None
            for (name, _, blocks), lib in zip(variants, libs):
                warps_per_block = lib.tq_gemv_threads() // 32
                rows = lib.tq_gemv_rows_for(bits, n, k, blocks * sms * warps_per_block)
                row_groups = -(-n // rows)
                grid = min(-(-row_groups // warps_per_block), blocks * sms)
                us = time_calls(lib, grid, bits, rows, x, weights, outputs)
                if reference is None:  # every variant must give the first variant's products
                    reference = outputs[0].float().clone()
                elif (outputs[0].float() - reference).abs().max() > 1e-2 * reference.abs().max():
                    raise SystemExit(f"{name} differs from {variants[0][0]} on {fname} {model} {proj}")
                totals[(model, fname, name)] = totals.get((model, fname, name), 0.0) + us
                print(f"{fname:17} {model:13} {proj:8} {name:16} {us:7.2f} us {first.nbytes() / us / 1e3:6.0f} GB/s "
                      f"rows/warp {rows}",
                      flush=True)
    print("\nper layer (the sum of each model's projections above):")
    for (model, fname, name), us in sorted(totals.items(), key=lambda item: (item[0][:2], item[1])):
        print(f"{fname:17} {model:13} {name:16} {us:7.2f} us")


if __name__ == "__main__":
    main()
