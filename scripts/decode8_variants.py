"""Time compile-time variants of the 8-bit KV decode (trident/native/paged_decode_cuda.cu) beside the Triton kernel,
on one Qwen3-0.6B attention layer over the context mixes of `python -m trident.kernels.bench_decode8`, int8 and fp8
caches, CUDA-graph replays rotating caches beyond the L2. Each variant is a name, nvcc -D flags and optionally
another source file (NAME=FLAG,FLAG[@FILE]); its output is compared with the Triton kernel's before it is timed.
Run on the GPU machine:

    python scripts/decode8_variants.py [NAME=FLAGS[@FILE] ...]
    e.g. python scripts/decode8_variants.py default= stages4=-DDECODE_STAGES=4 w8=-DDECODE_WARPS=8,-DDECODE_MIN_BLOCKS=2
"""
import ctypes
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

from trident.kernels.bench_attention import graph_ms
from trident.kernels.bench_decode8 import DIM, HEADS, KV_HEADS, MIXES, ROTATION_BYTES, random_caches, random_tables
from trident.kernels.paged_decode import choose_num_splits, paged_decode
from trident.native import paged_decode_cuda
from trident.native.cuda_build import NVCC_FLAGS, _nvcc

SOURCE = "trident/native/paged_decode_cuda.cu"
DEFAULT = ("default=", "stages2=-DDECODE_STAGES=2", "stages4=-DDECODE_STAGES=4,-DDECODE_MIN_BLOCKS=3")
BLOCK = 16


def build(spec: str) -> tuple[str, ctypes.CDLL]:
    name, rest = spec.split("=", 1)
    flags, source = rest.split("@") if "@" in rest else (rest, SOURCE)
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    arch += "a" if arch == "90" else ""
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


def time_mix(batch: int, shortest: int, longest: int, libs: list[tuple[str, ctypes.CDLL]], sms: int) -> None:
    lengths = torch.randint(shortest, longest, (batch,))
    tables, num_blocks = random_tables(lengths, BLOCK)
    lens, rows = lengths.cuda(), torch.arange(batch, device="cuda")
    query = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    splits = choose_num_splits(batch, KV_HEADS, tables.shape[1] * BLOCK, sms)
    copies = max(2, triton.cdiv(ROTATION_BYTES, 2 * num_blocks * KV_HEADS * BLOCK * DIM * 2))
    options = dict(scale=DIM ** -0.5, sliding_window=None, logit_softcap=None, num_splits=splits)
    print(f"\n{batch} sequences, contexts {shortest}-{longest - 1}, {splits} split(s)")
    for name in ("int8", "fp8"):
        caches = random_caches(name, (num_blocks, KV_HEADS, BLOCK, DIM), copies)

        def call(kernel, i, caches=caches):
            kc, vc, ks, vs = caches[i]
            kernel(query, kc, vc, tables, lens, rows, out, k_scale=ks, v_scale=vs, **options)

        call(paged_decode, 0)
        reference = out.float().clone()
        base = graph_ms(lambda i: call(paged_decode, i), copies)
        print(f"  {name:5} triton         {base * 1e3:8.1f} us")
        for label, lib in libs:
            paged_decode_cuda.library = lambda lib=lib: paged_decode_cuda.typed(lib)
            call(paged_decode_cuda.paged_decode_cuda, 0)
            diff = ((out.float() - reference).norm() / reference.norm()).item()
            ms = graph_ms(lambda i: call(paged_decode_cuda.paged_decode_cuda, i), copies)
            print(f"  {name:5} {label:14} {ms * 1e3:8.1f} us  {base / ms:5.2f}x triton  rel diff {diff:.1e}")


def main() -> None:
    with ThreadPoolExecutor(8) as pool:
        libs = list(pool.map(build, sys.argv[1:] or DEFAULT))
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for mix in MIXES:
        time_mix(*mix, libs, sms)


if __name__ == "__main__":
    main()
