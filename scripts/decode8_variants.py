"""Time compile-time variants of the 8-bit KV decode (trident/native/paged_decode_cuda.cu) beside the Triton kernel,
on one Qwen3-0.6B attention layer over the context mixes of `python -m trident.kernels.bench_decode8` (its
bench_mix: int8 and fp8 caches, CUDA-graph replays rotating caches beyond the L2). Each variant is a name, nvcc -D
flags and optionally another source file (NAME=FLAG,FLAG[@FILE]); its output is compared with the Triton kernel's
before it is timed. Run on the GPU machine:

    python scripts/decode8_variants.py [NAME=FLAGS[@FILE] ...]
    e.g. python scripts/decode8_variants.py default= stages4=-DDECODE_STAGES=4 w8=-DDECODE_WARPS=8,-DDECODE_MIN_BLOCKS=2
"""
import ctypes
import functools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from trident.kernels.bench_decode8 import MIXES, bench_mix, print_table
from trident.native import paged_decode_cuda
from trident.native.cuda_build import NVCC_FLAGS, _arch, _nvcc

SOURCE = "trident/native/paged_decode_cuda.cu"
DEFAULT = ("default=", "stages2=-DDECODE_STAGES=2", "stages4=-DDECODE_STAGES=4,-DDECODE_MIN_BLOCKS=3")
BLOCK = 16


def build(spec: str) -> tuple[str, ctypes.CDLL]:
    name, rest = spec.split("=", 1)
    flags, source = rest.split("@") if "@" in rest else (rest, SOURCE)
    arch = _arch()
    out = f"/tmp/tq_decode8_variant_{name}.so"
    done = subprocess.run([_nvcc(), *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                           "-Itrident/native", *[f for f in flags.split(",") if f], source, "-o", out],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: nvcc failed\n{done.stderr[-2000:]}")
    registers = sorted({line.split("Used")[1].split(",")[0].strip() for line in done.stderr.splitlines()
                        if "registers" in line})
    print(f"{name}: {', '.join(registers)}")
    return name, ctypes.CDLL(out)


def main() -> None:
    with ThreadPoolExecutor(8) as pool:
        libs = list(pool.map(build, sys.argv[1:] or DEFAULT))
    kernels = [(name, functools.partial(paged_decode_cuda.paged_decode_cuda, lib=paged_decode_cuda.typed(lib)))
               for name, lib in libs]
    torch.manual_seed(0)
    results = []
    for mix in MIXES:
        results += bench_mix(*mix, BLOCK, kernels, formats=("int8", "fp8"))
    print_table(results)


if __name__ == "__main__":
    main()
