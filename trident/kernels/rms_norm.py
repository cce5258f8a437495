"""RMSNorm, alone and fused with the residual add before it: Triton kernels and their torch references.

The arithmetic is Hugging Face's. The sum of squares, the scale and everything up to the output run in
float32. The Llama form (``LlamaRMSNorm``, also Qwen2/Qwen3/Mistral) rounds the normalised row to the
input dtype and then multiplies by ``weight`` (so it rounds twice). The Gemma form (``unit_offset``,
``Gemma2RMSNorm``/``Gemma3RMSNorm``) multiplies by ``1 + weight`` in float32 and rounds once.

The fused form computes ``residual + x`` in float32 and rounds it to the input dtype, as the unfused
``hidden = residual + hidden`` of a decoder layer stores it. That sum is the new residual stream, and the
norm reads the rounded sum, so the fused kernel gives the same values as an add followed by the norm.

One program normalises one row, held in registers whole (up to MAX_HIDDEN elements). Rows may be strided
(any row stride, contiguous within a row). The launch depends on shapes only: CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid

MAX_HIDDEN = 65536
"""The widest row one program holds (fp32 in registers: 128 per thread at 16 warps)."""


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """x [..., hidden] -> the normalised x in x's dtype (Hugging Face's arithmetic, see the module)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return (weight * xf.to(dtype)).to(dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual), the sum rounded to x's dtype once."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(new_residual, weight, eps, unit_offset), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """The Triton kernel: same contract as :func:`rms_norm_reference` for x [rows, hidden]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, out, None, eps, unit_offset)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel: same contract as :func:`fused_add_rms_norm_reference` for x, residual
    [rows, hidden]. Returns new tensors (normed, new_residual); the inputs are left as they are."""
    assert residual.shape == x.shape and residual.dtype == x.dtype
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, out, new_residual, eps, unit_offset)
    return out, new_residual


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
            residual_out: torch.Tensor | None, eps: float, unit_offset: bool) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, "rows of x must be contiguous"
    assert residual is None or residual.stride(1) == 1
    num_rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous() and weight.dtype == x.dtype
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: rows of {hidden} elements exceed the kernel's {MAX_HIDDEN}")
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    has_residual = residual is not None
    pdl = pdl_launch(x.device)
    _rms_norm_kernel[(num_rows,)](
        x, residual if has_residual else x, weight, out, residual_out if has_residual else out,
        x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0),
        residual_out.stride(0) if has_residual else 0,
        hidden, eps,
        HAS_RESIDUAL=has_residual, UNIT_OFFSET=unit_offset, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16), USE_PDL=pdl, launch_pdl=pdl
    )


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_residual, stride_out, stride_residual_out,
                     hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = xf * scale * (1.0 + weight)
    else:  # round the normalised row first, then scale by the weight (and round again)
        y = (xf * scale).to(out_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
