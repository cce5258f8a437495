"""Machine-code (SASS) opcode counts of one kernel of trident's CUDA sources, for builds side by side: nvcc compiles
each source to a cubin for the target architecture (default sm_90a, the H200's) with the flags trident builds with,
nvdisasm disassembles it, and the kernels whose mangled name contains KERNEL are counted by opcode. The kernels of
this project that are bound by instruction issue (the 8-bit KV decode: docs/benchmarks.md, session 12) get faster
as these counts fall, so a change can be weighed on a machine without a GPU before the device measures it.

Needs nvcc and nvdisasm on PATH or NVDISASM=path (nvdisasm ships in the `nvidia-cuda-nvdisasm` wheel:
`pip install nvidia-cuda-nvdisasm`, then nvidia/cu13/bin/nvdisasm in site-packages). Counts are static (every
instruction once, loops and branches not weighted): compare builds of one kernel, not kernels.

    python scripts/sass_histogram.py KERNEL SOURCE[:NAME] [SOURCE[:NAME] ...] [--arch sm_90a] [-D FLAG ...]
    e.g. git show HEAD~1:trident/native/paged_decode_cuda.cu > /tmp/old.cu
         python scripts/sass_histogram.py decode_kernelILi128ELb0ELb0E13 /tmp/old.cu:old \\
             trident/native/paged_decode_cuda.cu:new
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

from trident.native.cuda_build import NVCC_FLAGS, _nvcc

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def nvdisasm() -> str:
    found = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not found:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm and set NVDISASM to its "
                         "nvidia/cu13/bin/nvdisasm")
    return found


def kernel_opcodes(source: str, kernel: str, arch: str, defines: list[str]) -> dict[str, Counter]:
    """{mangled kernel name: opcode counts} for the kernels of ``source`` whose name contains ``kernel``."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        flags = [f for f in NVCC_FLAGS if f not in ("-shared", "-Xcompiler", "-fPIC")]
        subprocess.run([_nvcc(), *flags, f"-arch={arch}", "-cubin", "-Itrident/native",
                        *[f"-D{d}" for d in defines], source, "-o", cubin], check=True)
        text = subprocess.run([nvdisasm(), "-c", cubin], check=True, capture_output=True, text=True).stdout
    kernels: dict[str, Counter] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"\.text\.(\S+):", line)
        if header:
            name = header.group(1) if kernel in header.group(1) else None
            if name:
                kernels[name] = Counter()
            continue
        if name:
            op = INSTRUCTION.search(line)
            if op:
                kernels[name][op.group(1)] += 1
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", help="a substring of the mangled kernel name")
    parser.add_argument("sources", nargs="+", help="SOURCE.cu, or SOURCE.cu:NAME to label its column")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("-D", dest="defines", action="append", default=[], help="a macro for every build")
    parser.add_argument("--top", type=int, default=25, help="opcodes to show (by the first build's count)")
    args = parser.parse_args()
    builds = []
    for spec in args.sources:
        path, _, label = spec.partition(":")
        found = kernel_opcodes(path, args.kernel, args.arch, args.defines)
        if not found:
            raise SystemExit(f"{path}: no kernel whose name contains {args.kernel!r}")
        if len(found) > 1:
            print(f"{path}: {len(found)} kernels match, counting the first: {sorted(found)[0]}", file=sys.stderr)
        builds.append((label or os.path.basename(path), found[sorted(found)[0]]))
    width = max(10, *(len(label) for label, _ in builds))
    print(f"{'opcode':14}" + "".join(f"{label:>{width}}" for label, _ in builds))
    print(f"{'(all)':14}" + "".join(f"{sum(c.values()):>{width}}" for _, c in builds))
    for op, _ in builds[0][1].most_common(args.top):
        print(f"{op:14}" + "".join(f"{c[op]:>{width}}" for _, c in builds))


if __name__ == "__main__":
    main()
