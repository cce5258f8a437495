"""The gated MLP's activation: ``act(gate) * up`` over the fused gate_up projection, a Triton kernel and
its torch reference.

``gate_up`` is [tokens, 2 * intermediate] (gate first, then up, as the fused projection writes it); the
result is [tokens, intermediate]. The activation and the product run in float32 and round once to the
input dtype. Activations: ``silu`` (Llama, Qwen, Mistral), ``gelu_pytorch_tanh`` (Gemma) and ``gelu``
(the erf form).

The grid is (tokens, column blocks of BLOCK); the launch depends on shapes only, so CUDA graphs can
capture it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid

KERNEL_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
"""Hugging Face ``hidden_act`` names the kernel computes."""
BLOCK = 1024
"""Columns per program: 8 bf16 values (16 bytes) per thread at 4 warps."""

_GELU_TANH_SCALE = tl.constexpr(2 * math.sqrt(2 / math.pi))
_INV_SQRT2 = tl.constexpr(1 / math.sqrt(2))

_TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def act_and_mul_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate_up [T, 2 * I] -> act(gate) * up [T, I] in gate_up's dtype (float32 math, one rounding)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (_TORCH_ACTIVATIONS[activation](gate) * up).to(gate_up.dtype)


def act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The Triton kernel: same contract as :func:`act_and_mul_reference`. Rows may be strided."""
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"act_and_mul: no kernel for {activation!r}; have {', '.join(KERNEL_ACTIVATIONS)}")
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    num_tokens, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(intermediate))
    pdl = pdl_launch(gate_up.device)
    _act_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
        ACTIVATION=activation, BLOCK=block, num_warps=4 if block >= 512 else 1, USE_PDL=pdl, launch_pdl=pdl
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (see :func:`act_and_mul`)."""
    return act_and_mul(gate_up, "silu")


@triton.jit
def _act_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, intermediate,
                        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (activate(gate, ACTIVATION) * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def activate(gate, ACTIVATION: tl.constexpr):
    """act(gate) of float32 values, for the kernels that fuse the gated activation (this one, the MoE experts')."""
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == "gelu_pytorch_tanh":
        # 0.5 x (1 + tanh(y)) = x * sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715 x^3): no tanh needed
        act = gate / (1.0 + tl.exp(-_GELU_TANH_SCALE * (gate + 0.044715 * gate * gate * gate)))
    else:  # gelu (erf)
        act = 0.5 * gate * (1.0 + tl.erf(gate * _INV_SQRT2))
    return act
