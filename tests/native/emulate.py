"""Independent float64 references for trident/native: weights whose scales and offsets are exact in float16 (so
packing them loses nothing), and the products with the activations quantized as qmatmul.c documents
(per block of 32, d = max|x| / 127, codes rounded half to even, in float32), summed in float64."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from trident.quant.affine import AffineWeight, affine_dequantize
from trident.quant.rtn import pack_int4

BLOCK = 32


def marches() -> list[str]:
    """The -march levels to build and check here: this CPU's, and on x86 CPUs with AVX2 / FMA / F16C the CI
    machine's level (x86-64-v3: the AVX2 path) and plain x86-64 (the C path)."""
    levels = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
            levels.append("x86-64-v3")
        levels.append("x86-64")
    return levels


def random_weight(bits: int, n: int, k: int, group: int | None, offsets: bool, gen: torch.Generator) -> AffineWeight:
    """An affine weight [n, k] (group None: per channel) with float16-exact float32 scales and offsets."""
    groups = 1 if group is None else k // group
    if bits == 4:
        codes = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    else:
        codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).half().float()
    offs = (torch.randn(n, groups, generator=gen) * 0.05).half().float() if offsets else None
    return AffineWeight(codes, scales, offs, bits)


def quantize_activations(x: torch.Tensor, natural: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 32) -> (the value the kernel multiplies, [M, K] float64; each block's unit
    d / 256, [M, K / 32] float64), as qmatmul.c's two int8 stages make them in float32: x1 = round(x / d), then
    x2 = round((x - d x1) / (d / 256)) clamped to +-127 (the remainder fused: one rounding), value (d / 256)
    (256 x1 + x2). d = max|x| / 127 over the block, or with ``natural`` over its pair of blocks (K a multiple of
    64: the natural order of int8 codes)."""
    xf = x.float().view(x.shape[0], -1, BLOCK)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if natural:
        amax = amax.view(x.shape[0], -1, 2, 1).amax(dim=2, keepdim=True).expand(-1, -1, 2, 1).reshape(amax.shape)
    step = amax / 127.0
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    x1 = (xf * inv).round()
    remainder = (xf.double() - x1.double() * step.double()).float()  # exact, then rounded once: a fused multiply-add
    x2 = (remainder * (inv * 256.0)).round().clamp(-127, 127)
    unit = (step / 256.0).double()
    value = unit * (256.0 * x1.double() + x2.double())
    return value.reshape(x.shape), unit.squeeze(-1)
def emulated_matmul(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None = None,
                    natural: bool = False) -> torch.Tensor:
    """The kernel's product in float64: the quantized activations (``natural``: one unit per pair of blocks) times
    scale * q per block, plus offsets times the exact group sums of x, plus the bias."""
    m, _ = x.shape
    value, _ = quantize_activations(x, natural)
    scaled = affine_dequantize(w, torch.float64)  # scale * q, plus the offsets taken off just below
    if w.offsets is not None:
        scaled = scaled - w.offsets.double().repeat_interleave(w.group_size, dim=1)
    y = value @ scaled.T
    if w.offsets is not None:
        sums = x.double().view(m, -1, w.group_size).sum(-1)
        y = y + sums @ w.offsets.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def activation_error_bound(x: torch.Tensor, w: AffineWeight, natural: bool = False) -> torch.Tensor:
    """[M, N] bound on |kernel - exact product|: each activation moves by at most 2 units of d / 256 (half a unit
    when rounded, up to 2 where the second stage clamps)."""
    _, unit = quantize_activations(x, natural)
    exact = affine_dequantize(w, torch.float64)
    return (2 * unit.repeat_interleave(BLOCK, dim=1)) @ exact.abs().T
