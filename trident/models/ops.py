"""The models' elementwise operations (RMSNorm with and without the residual add, rotary embedding with
the optional per-head q/k norm, the gated activation), and the one place that picks how each runs.

Dispatch is on the tensor's device, nothing else: a CUDA tensor goes through the fused Triton kernels of
trident/kernels/ (a few launches per layer instead of dozens of small torch ops), any other tensor through
the torch code below, which is the CPU path and matches Hugging Face's arithmetic (the equality tests in
tests/models run it). Where Triton does not import, CUDA tensors take the torch path too. Both paths are
CUDA-graph capturable: the choice depends on the device only, never on tensor values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trident.errors import TridentError

if TYPE_CHECKING:  # the kernels import Triton: only on the kernel path
    from trident.kernels.kv_cache_write import KVStore

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
"""Hugging Face ``hidden_act`` name -> the torch function (the Triton kernel computes each too)."""


def check_activation(name: str) -> str:
    """``name`` if supported, else a TridentError listing what is."""
    if name not in ACTIVATIONS:
        raise TridentError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether operations on ``x`` run the Triton kernels: on a CUDA device where Triton imports."""
    return x.is_cuda and _triton_imports()


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- RMSNorm ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """Hugging Face's RMSNorm of x [..., hidden] (see trident/kernels/rms_norm.py for the two forms)."""
    if uses_kernels(x):
        from trident.kernels.rms_norm import rms_norm as kernel

        return kernel(x.reshape(-1, x.shape[-1]), weight, eps, unit_offset).view(x.shape)
    return _rms_norm_torch(x, weight, eps, unit_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for x, residual [tokens, hidden]: the residual add of a
    decoder layer fused with the norm after it."""
    if uses_kernels(x):
        from trident.kernels.rms_norm import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, weight, eps, unit_offset)
    residual = residual + x
    return _rms_norm_torch(residual, weight, eps, unit_offset), residual


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    dtype = x.dtype
    if dtype == torch.float32 and not unit_offset:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused kernel
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


# --- rotary embedding ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RotaryInputs:
    """What every layer needs to rotate its queries and keys at this step's positions, made once per
    forward by :func:`rotary_inputs`. The kernel path computes cos and sin itself from ``positions`` and
    ``inv_freq``; the torch path reads ``cos`` / ``sin`` [tokens, head_dim], computed here once."""

    positions: torch.Tensor
    inv_freq: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    """The sines with their first half negated: the sign rotate_half puts on the second half of x (see
    :func:`_apply_rotary_torch`)."""


def rotary_inputs(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
    """positions [tokens], inv_freq [head_dim / 2] (float32); dtype: the activations' dtype."""
    if uses_kernels(positions):
        return RotaryInputs(positions, inv_freq)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    sin = freqs.sin().to(dtype)
    return RotaryInputs(positions, inv_freq, torch.cat((freqs, freqs), dim=-1).cos().to(dtype),
                        torch.cat((-sin, sin), dim=-1))


@dataclass(frozen=True)
class HeadNorms:
    """The per-head RMSNorm of queries and keys before the rotation (Qwen3, Gemma 3)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    unit_offset: bool


def rotate_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, rope: RotaryInputs,
               head_norms: HeadNorms | None, store: KVStore | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection qkv [tokens, (heads + 2 kv_heads) * head_dim] into q [tokens, heads, D],
    k and v [tokens, kv_heads, D], with q and k normalised (if ``head_norms``) and rotated. The kernel path
    rotates inside qkv and returns views of it; given ``store`` (kernel path only: the backend's
    ``kv_store``), the same launch also writes k and v into the paged cache."""
    if store is not None and not uses_kernels(qkv):
        raise ValueError("rotate_qkv writes into a KVStore on the kernel path only (a CUDA tensor, Triton)")
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if head_norms is None and not uses_kernels(qkv):  # rotate queries and keys in one pass
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = _apply_rotary_torch(qk.view(num_tokens, num_heads + num_kv_heads, head_dim), rope.cos, rope.sin)
        q, k = qk.split([num_heads, num_kv_heads], dim=1)
        return q, k, v.view(num_tokens, num_kv_heads, head_dim)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if uses_kernels(qkv):
        from trident.kernels.rotary import rotary

        norms = () if head_norms is None else (head_norms.q_weight, head_norms.k_weight, head_norms.eps,
                                               head_norms.unit_offset)
        rotary(q, k, rope.positions, rope.inv_freq, *norms, value=None if store is None else v, store=store)
        return q, k, v
    n = head_norms
    q = _apply_rotary_torch(_rms_norm_torch(q, n.q_weight, n.eps, n.unit_offset), rope.cos, rope.sin)
    k = _apply_rotary_torch(_rms_norm_torch(k, n.k_weight, n.eps, n.unit_offset), rope.cos, rope.sin)
    return q, k, v


def apply_rotary(x: torch.Tensor, rope: RotaryInputs) -> torch.Tensor:
    """x [tokens, heads, head_dim] rotated in the half-split layout, in torch on every device (a new tensor; for the
    layers outside rotate_qkv, such as multi-head latent attention's rope parts). Computes the cos / sin that the
    kernel path of :func:`rotary_inputs` leaves out."""
    cos, sin = rope.cos, rope.sin
    if cos is None or sin is None:
        freqs = rope.positions.float()[:, None] * rope.inv_freq[None, :]
        half_sin = freqs.sin().to(x.dtype)
        cos, sin = torch.cat((freqs, freqs), dim=-1).cos().to(x.dtype), torch.cat((-half_sin, half_sin), dim=-1)
    return _apply_rotary_torch(x, cos, sin)


def _apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; cos, sin [tokens, head_dim] from :func:`rotary_inputs` (sin's first half
    negated). Hugging Face's ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = (-x2, x1): the halves swapped
    by one flip, the minus sign carried by the sines; the same products and sum, so the same bits, in fewer
    operations (small CPU operations cost more to issue than to compute)."""
    tokens, heads, dim = x.shape
    swapped = x.view(tokens, heads, 2, dim // 2).flip(2).view(tokens, heads, dim)
    return x * cos[:, None, :] + swapped * sin[:, None, :]


# --- gated activation ------------------------------------------------------------------------------------

def act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate_up [tokens, 2 * intermediate] (gate, then up) -> act(gate) * up [tokens, intermediate]."""
    if uses_kernels(gate_up):
        from trident.kernels.activation import act_and_mul as kernel

        return kernel(gate_up, activation)
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return ACTIVATIONS[activation](gate) * up
