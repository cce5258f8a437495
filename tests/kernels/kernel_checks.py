"""Helpers of the kernel tests: tolerances per dtype and a relative-error check that also catches
unwritten (NaN-poisoned) outputs."""

from __future__ import annotations

import torch

# ||out - ref|| / ||ref|| against an fp32 reference: fp32 kernels use exact (ieee) products; 16-bit kernels
# round their inputs, the probabilities and the output (8 / 11 bits of mantissa).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, what
    assert not out.isnan().any(), f"{what}: NaN in the output (an unwritten row?)"
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < TOLERANCE[dtype], f"{what}: relative error {rel:.2e} >= {TOLERANCE[dtype]:.0e}"


def random_block_tables(lengths: list[int], block_size: int, num_blocks: int, width: int,
                        generator: torch.Generator) -> torch.Tensor:
    """[len(lengths), width] tables of distinct, shuffled physical blocks, padded with block 0."""
    needed = [-(-n // block_size) for n in lengths]
    assert sum(needed) <= num_blocks and max(needed) <= width
    physical = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor(physical[:n])
        physical = physical[n:]
    return tables


def assert_codes_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Quantized KV codes equal up to one step where x / s lands on a rounding boundary (the GPU's division
    may round differently from torch's in the last bit): int8 within 1, fp8 within one e4m3 step (2^-3
    relative, 2^-9 among subnormals); all but a few equal. Scales (float32) within 1e-6 relative."""
    a, b = out.float(), ref.float()
    if out.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        return
    if out.dtype == torch.int8:
        assert (a - b).abs().max() <= 1
    else:
        assert ((a - b).abs() <= 2**-3 * torch.maximum(a.abs(), b.abs()) + 2**-9).all()
    assert (a == b).float().mean() > 0.98
