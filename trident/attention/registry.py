"""Attention backends by name: an explicit registry, imported lazily, failing loudly.

``auto`` picks ``triton`` on a CUDA device when Triton imports, ``torch`` (the reference) otherwise.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trident.errors import TridentError
from trident.hardware import triton_available

if TYPE_CHECKING:  # importing no torch here keeps config validation torch-free
    import torch

    from trident.attention.base import AttentionBackend

ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "trident.attention.torch_ref:TorchAttention",
    "triton": "trident.attention.triton_paged:TritonPagedAttention",
}
"""Name -> "module:class". The torch backend runs anywhere; triton needs a CUDA device."""
CHOICES = ("auto", *ATTENTION_BACKENDS)


def check_backend_name(name: str, device_type: str) -> None:
    """Raise a TridentError when ``name`` is no choice, or cannot run on ``device_type`` (cpu, cuda)."""
    if name not in CHOICES:
        raise TridentError(f"unknown attention backend {name!r}; supported: {', '.join(CHOICES)}")
    if name == "triton" and device_type != "cuda":
        raise TridentError(f"the triton attention backend needs a CUDA device, not {device_type}; "
                           "use --device cuda, or --attention-backend torch (or auto)")


def resolve_backend_name(name: str, device: torch.device, mla: bool = False) -> str:
    """The registered backend ``name`` stands for on ``device``; an unusable choice is a TridentError. ``mla``: the
    model uses multi-head latent attention (DeepSeek), which only the torch backend runs for now: auto picks it and
    triton is refused."""
    check_backend_name(name, device.type)
    if mla:
        if name == "triton":
            raise TridentError("the triton attention backend does not run multi-head latent attention (DeepSeek-V2 / "
                               "V3) yet; use --attention-backend torch (or auto)")
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise TridentError("the triton attention backend needs the triton package, which does not import "
                               "here; install triton, or use --attention-backend torch (or auto)")
    return name


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    """A new backend instance for ``name`` (auto, torch or triton) on ``device``."""
    module_name, class_name = ATTENTION_BACKENDS[resolve_backend_name(name, device)].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
