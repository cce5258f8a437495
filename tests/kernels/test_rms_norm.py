"""The RMSNorm kernels (plain, and fused with the residual add) equal their torch reference element by
element and float64 math over the whole output, in both forms (Llama: round then scale by w; Gemma: scale
by 1 + w in float32), for widths from 64 to 8192 (powers of two and not), three dtypes, strided rows; and
they agree with the models' CPU path (trident.models.ops on CPU tensors)."""

from __future__ import annotations

import pytest
import torch
from elementwise_checks import (
    DTYPES,
    assert_matches_math,
    assert_matches_reference,
    dtype_id,
    rounding_is_exact,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from trident.models import ops

pytestmark = pytest.mark.gpu

HIDDEN_SIZES = [64, 96, 576, 1000, 1024, 2048, 3000, 4096, 5120, 8192]
EPS = 1e-6


def _inputs(rows: int, hidden: int, dtype: torch.dtype, unit_offset: bool, strided: bool, seed: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x and residual [rows, hidden] (views of wider tensors if ``strided``, rows of very different
    magnitudes), and a weight around 1 (Llama) or around 0 (Gemma's 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(rows, 1, generator=g) * 4 - 2)  # 0.01 .. 100

    def activations() -> torch.Tensor:
        full = torch.randn(rows, hidden + (40 if strided else 0), generator=g) * scales
        return full.to(dtype).to(device)[:, 40:] if strided else full.to(dtype).to(device)

    x, residual = activations(), activations()
    weight = torch.randn(hidden, generator=g) * 0.2 + (0.0 if unit_offset else 1.0)
    return x, residual, weight.to(dtype).to(device)


def _math(x: torch.Tensor, weight: torch.Tensor, unit_offset: bool) -> torch.Tensor:
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return normed * (1.0 + weight.double() if unit_offset else weight.double())


def _check_rms_norm(device, rows, hidden, dtype, unit_offset, strided, seed) -> None:
    x, _, weight = _inputs(rows, hidden, dtype, unit_offset, strided, seed, device)
    what = f"rms_norm rows={rows} hidden={hidden} {dtype_id(dtype)} unit_offset={unit_offset}"
    out = rms_norm(x, weight, EPS, unit_offset)
    assert_matches_reference(out, rms_norm_reference(x, weight, EPS, unit_offset), what)
    assert_matches_math(out, _math(x, weight, unit_offset), what)
    cpu_path = ops.rms_norm(x.cpu(), weight.cpu(), EPS, unit_offset)
    assert_matches_math(out.cpu(), cpu_path.double(), f"{what} (against the CPU path)")


def _check_fused(device, rows, hidden, dtype, unit_offset, strided, seed) -> None:
    x, residual, weight = _inputs(rows, hidden, dtype, unit_offset, strided, seed, device)
    x_before, residual_before = x.clone(), residual.clone()
    what = f"fused_add_rms_norm rows={rows} hidden={hidden} {dtype_id(dtype)} unit_offset={unit_offset}"
    out, new_residual = fused_add_rms_norm(x, residual, weight, EPS, unit_offset)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), f"{what}: inputs changed"
    ref_out, ref_residual = fused_add_rms_norm_reference(x, residual, weight, EPS, unit_offset)
    if rounding_is_exact(device, dtype):  # the sum is one rounding of an exact float32 sum: bit for bit
        assert torch.equal(new_residual, ref_residual), f"{what}: residual differs"
    assert_matches_reference(new_residual, ref_residual, f"{what} residual")
    assert_matches_reference(out, ref_out, what)
    exact_sum = x.double() + residual.double()
    assert_matches_math(new_residual, exact_sum, f"{what} residual")
    assert_matches_math(out, _math(exact_sum, weight, unit_offset), what)
    cpu_out, cpu_residual = ops.add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), EPS, unit_offset)
    assert_matches_math(out.cpu(), cpu_out.double(), f"{what} (against the CPU path)")
    assert_matches_math(new_residual.cpu(), cpu_residual.double(), f"{what} residual (against the CPU path)")


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_rms_norm(kernel_device, hidden: int, dtype: torch.dtype, unit_offset: bool) -> None:
    _check_rms_norm(kernel_device, 7, hidden, dtype, unit_offset, strided=hidden % 2 == 0, seed=hidden)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_fused_add_rms_norm(kernel_device, hidden: int, dtype: torch.dtype, unit_offset: bool) -> None:
    _check_fused(kernel_device, 7, hidden, dtype, unit_offset, strided=hidden % 2 == 1 or hidden == 4096,
                 seed=hidden + 1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), hidden=st.integers(8, 8192), dtype=st.sampled_from(DTYPES),
       unit_offset=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(kernel_device, rows: int, hidden: int, dtype: torch.dtype, unit_offset: bool,
                       strided: bool, seed: int) -> None:
    _check_rms_norm(kernel_device, rows, hidden, dtype, unit_offset, strided, seed)
    _check_fused(kernel_device, rows, hidden, dtype, unit_offset, strided, seed)


def test_no_rows(kernel_device) -> None:
    x = torch.empty(0, 64, device=kernel_device)
    weight = torch.ones(64, device=kernel_device)
    assert rms_norm(x, weight, EPS, False).shape == (0, 64)
    out, residual = fused_add_rms_norm(x, x, weight, EPS, True)
    assert out.shape == residual.shape == (0, 64)
