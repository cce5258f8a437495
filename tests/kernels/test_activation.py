"""The gated-activation kernel (act(gate) * up over the fused gate_up projection) equals its torch reference
element by element and float64 math over the whole output, for SiLU, GeLU-tanh and GeLU, intermediate
sizes from 1 to 14336 (powers of two and not, more than one column block), three dtypes, strided rows,
large-magnitude inputs; and it agrees with the models' CPU path (trident.models.ops on CPU tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from elementwise_checks import DTYPES, assert_matches_math, assert_matches_reference, dtype_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.kernels.activation import KERNEL_ACTIVATIONS, act_and_mul, act_and_mul_reference, silu_and_mul
from trident.models import ops

# exp(-gate) overflows to inf for very negative gates, by design (x / (1 + inf) = -0); numpy, which runs
# the kernel under Triton's CPU interpreter, warns about it.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

INTERMEDIATE_SIZES = [1, 96, 1000, 1024, 3072, 2816, 14336]


def _math(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    if activation == "silu":
        act = gate * torch.sigmoid(gate)
    elif activation == "gelu_pytorch_tanh":
        act = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    else:
        act = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    return act * up


def _check(device, num_tokens: int, intermediate: int, dtype: torch.dtype, activation: str, strided: bool,
           seed: int, scale: float = 3.0) -> None:
    g = torch.Generator().manual_seed(seed)
    extra = 24 if strided else 0
    full = (torch.randn(num_tokens, 2 * intermediate + extra, generator=g) * scale).to(dtype).to(device)
    gate_up = full[:, extra:]
    what = f"{activation} T={num_tokens} I={intermediate} {dtype_id(dtype)} strided={strided}"
    out = act_and_mul(gate_up, activation)
    assert_matches_reference(out, act_and_mul_reference(gate_up, activation), what)
    assert_matches_math(out, _math(gate_up, activation), what)
    cpu_path = ops.act_and_mul(gate_up.cpu(), activation)
    assert_matches_math(out.cpu(), cpu_path.double(), f"{what} (against the CPU path)")


@pytest.mark.parametrize("activation", list(ops.ACTIVATIONS))  # every activation a model may name
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("intermediate", INTERMEDIATE_SIZES)
def test_act_and_mul(kernel_device, intermediate: int, dtype: torch.dtype, activation: str) -> None:
    _check(kernel_device, 5, intermediate, dtype, activation, strided=intermediate % 2 == 0, seed=intermediate)


@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_large_inputs(kernel_device, activation: str) -> None:
    """Gates of magnitude up to ~1000 (exp overflows to inf inside; the result stays finite)."""
    _check(kernel_device, 4, 512, torch.float32, activation, strided=False, seed=1, scale=300.0)


def test_silu_and_mul(kernel_device) -> None:
    gate_up = torch.randn(3, 64, device=kernel_device)
    assert torch.equal(silu_and_mul(gate_up), act_and_mul(gate_up, "silu"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 40), intermediate=st.integers(1, 5000), dtype=st.sampled_from(DTYPES),
       activation=st.sampled_from(KERNEL_ACTIVATIONS), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(kernel_device, num_tokens, intermediate, dtype, activation, strided, seed) -> None:
    _check(kernel_device, num_tokens, intermediate, dtype, activation, strided, seed)
