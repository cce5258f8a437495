"""Experts backends by name: an explicit registry, imported lazily, failing loudly (as trident/attention/registry.py
for attention).

``auto`` picks ``triton`` (the fused kernels of trident/kernels/moe_experts.py) for a bfloat16 / float16 model on a
CUDA device where Triton imports, ``torch`` (the reference: trident/moe/experts.py) otherwise. Only the triton
backend is capturable in a CUDA graph, so ``--experts-backend torch`` also runs an MoE model's decode steps eagerly.
Torch-free, so that the configuration validates names without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trident.errors import TridentError
from trident.hardware import triton_available

if TYPE_CHECKING:
    import torch

    from trident.moe.experts import ExpertsBackend

EXPERTS_BACKENDS: dict[str, str] = {
    "torch": "trident.moe.experts:TorchExperts",
    "triton": "trident.moe.experts_triton:TritonExperts",
}
"""Name -> "module:class" of every experts backend. torch runs anywhere; triton needs a CUDA device (or Triton's
CPU interpreter, in the kernel tests) and 16-bit activations."""
CHOICES = ("auto", *EXPERTS_BACKENDS)
KERNEL_DTYPES = ("torch.bfloat16", "torch.float16")
"""The dtypes the fused kernels take (as str(dtype): no torch import here)."""


def check_experts_backend_name(name: str, device_type: str) -> None:
    """Raise a TridentError when ``name`` is no choice, or cannot run on ``device_type`` (cpu, cuda)."""
    if name not in CHOICES:
        raise TridentError(f"unknown experts backend {name!r}; supported: {', '.join(CHOICES)}")
    if name == "triton" and device_type != "cuda":
        raise TridentError(f"the triton experts backend needs a CUDA device, not {device_type}; "
                           "use --device cuda, or --experts-backend torch (or auto)")


def resolve_experts_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The registered backend ``name`` stands for with a model of ``dtype`` on ``device``; an unusable choice is a
    TridentError."""
    check_experts_backend_name(name, device.type)
    kernels_fit = str(dtype) in KERNEL_DTYPES
    if name == "auto":
        return "triton" if device.type == "cuda" and kernels_fit and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise TridentError("the triton experts backend needs the triton package, which does not import here; "
                               "install triton, or use --experts-backend torch (or auto)")
        if not kernels_fit:
            raise TridentError(f"the triton experts backend runs bfloat16 / float16 models, not {dtype}; use "
                               "--dtype bfloat16, or --experts-backend torch (or auto)")
    return name


def create_experts_backend(name: str) -> ExpertsBackend:
    """A new experts backend by registered name; an unknown name is a TridentError listing the known ones."""
    if name not in EXPERTS_BACKENDS:
        raise TridentError(f"unknown experts backend {name!r}; supported: {', '.join(EXPERTS_BACKENDS)}")
    module_name, class_name = EXPERTS_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
