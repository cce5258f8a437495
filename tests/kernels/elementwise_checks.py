"""Checks shared by the elementwise kernel tests (norms, rotary, activation): a kernel against its torch
reference element by element, and against float64 math over the whole output."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Element-wise, kernel against reference: a few units in the last place of the dtype (both round the same
# float32 value, which can differ in its last bits: reduction order, rsqrt / cos approximations; Triton's
# CPU interpreter truncates float32 -> bfloat16 instead of rounding, one more unit).
ELEMENT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}

# ||out - exact|| / ||exact|| against float64 math on the same inputs: the roundings to the dtype (one to
# three per element; under the interpreter bfloat16 truncates, which biases them: 8.5e-3 measured for three)
# and nothing else. A wrong formula is off by order 1.
MATH_TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 1e-3}


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Same shape and dtype, every element within ELEMENT_RTOL of the reference (plus that much of the
    largest magnitude, for elements that cancel to near zero)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert not out.isnan().any(), f"{what}: NaN in the output (an unwritten element?)"
    rtol = ELEMENT_RTOL[out.dtype]
    atol = rtol * ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_matches_math(out: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """out (any dtype) against float64 ``exact``: relative error of the whole tensor within MATH_TOLERANCE."""
    assert out.shape == exact.shape, what
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    assert rel < MATH_TOLERANCE[out.dtype], f"{what}: relative error {rel:.2e} >= {MATH_TOLERANCE[out.dtype]:.0e}"


def rounding_is_exact(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel's float32 -> dtype stores round as torch does (not so for bfloat16 under Triton's
    CPU interpreter, which truncates)."""
    return not (device.type == "cpu" and dtype == torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
