"""Load Hugging Face-named tensors into a model whose projections may be fused.

A model declares ``packed_modules``: fused name -> the (HF name, rows) parts it concatenates along the
output dimension, e.g. ``{"qkv_proj": (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}``.
Every parameter must be filled exactly once; a missing or unexpected tensor, or a shape mismatch,
is a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trident.errors import TridentError

PackedModules = Mapping[str, tuple[tuple[str, int], ...]]


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], packed_modules: PackedModules,
                 rename: Mapping[str, str] | None = None) -> None:
    """Copy ``tensors`` into ``model``'s parameters (casting to their dtype)."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    unexpected = []
    for name, tensor in tensors.items():
        for old, new in (rename or {}).items():
            name = name.replace(old, new)
        target, row_offset = _locate(name, params, packed_modules)
        if target is None:
            unexpected.append(name)
            continue
        param = params[target]
        rows = tensor.shape[0]
        if tuple(tensor.shape[1:]) != tuple(param.shape[1:]) or row_offset + rows > param.shape[0]:
            raise TridentError(
                f"weight {name} has shape {tuple(tensor.shape)}, which does not fit {target} "
                f"{tuple(param.shape)}: the config does not match the weights"
            )
        with torch.no_grad():
            param.data[row_offset: row_offset + rows].copy_(tensor)
        filled[target] = filled.get(target, 0) + rows
    if unexpected:
        raise TridentError("unexpected weights in the checkpoint: " + _few(unexpected))
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.shape[0]]
    if missing:
        raise TridentError("weights missing from the checkpoint: " + _few(missing))


def _few(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def _locate(name: str, params: Mapping[str, nn.Parameter], packed_modules: PackedModules) -> tuple[str | None, int]:
    if name in params:
        return name, 0
    for fused, parts in packed_modules.items():
        offset = 0
        for part, rows in parts:
            token = f".{part}."
            if token in name:
                target = name.replace(token, f".{fused}.")
                if target in params:
                    return target, offset
            offset += rows
    return None, 0
