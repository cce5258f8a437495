"""What this machine's processor can do, for choosing defaults (read once, on demand)."""

from __future__ import annotations

import functools

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16), which makes bf16
    matmuls 2-3x faster than float32 from a few rows up; elsewhere bf16 is emulated and slow."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def triton_available() -> bool:
    """Whether Triton imports here (the GPU kernels' attention and experts backends need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
