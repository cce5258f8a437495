"""Load Hugging Face-named tensors into a model whose projections may be fused.

A model declares ``packed_modules``: fused name -> the (HF name, rows) parts it concatenates along the
output dimension, e.g. ``{"qkv_proj": (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}``.
Every parameter must be filled exactly once; a missing or unexpected tensor, or a shape mismatch,
is a clear error.

The model may live on the meta device: each parameter is replaced by the loaded tensor itself when
it needs no conversion (no copy at all), or by one concatenation of its parts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trident.config import ModelConfig
from trident.errors import TridentError

PackedModules = Mapping[str, tuple[tuple[str, int], ...]]


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], packed_modules: PackedModules, *,
                 dtype: torch.dtype, device: torch.device) -> None:
    """Set every parameter of ``model`` from ``tensors`` (cast to ``dtype``, moved to ``device``)."""
    params = dict(model.named_parameters())
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unexpected = []
    for name, tensor in tensors.items():
        target, row_offset = _locate(name, params, packed_modules)
        if target is None:
            unexpected.append(name)
            continue
        param = params[target]
        if tuple(tensor.shape[1:]) != tuple(param.shape[1:]) or row_offset + tensor.shape[0] > param.shape[0]:
            raise TridentError(
                f"weight {name} has shape {tuple(tensor.shape)}, which does not fit {target} "
                f"{tuple(param.shape)}: the config does not match the weights"
            )
        parts.setdefault(target, {})[row_offset] = tensor
    if unexpected:
        raise TridentError("unexpected weights in the checkpoint: " + _few(unexpected))
    missing = [n for n, p in params.items() if sum(t.shape[0] for t in parts.get(n, {}).values()) != p.shape[0]]
    if missing:
        raise TridentError("weights missing from the checkpoint: " + _few(missing))
    modules = dict(model.named_modules())
    for name, pieces in parts.items():
        ordered = [pieces[k] for k in sorted(pieces)]
        value = ordered[0] if len(ordered) == 1 else torch.cat([t.to(dtype) for t in ordered])
        value = value.to(device=device, dtype=dtype)
        module_name, _, attr = name.rpartition(".")
        modules[module_name]._parameters[attr] = nn.Parameter(value, requires_grad=False)


def attention_mlp_packing(config: ModelConfig) -> PackedModules:
    """The fusion every family here uses: q/k/v into qkv_proj, gate/up into gate_up_proj."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
        "gate_up_proj": (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)),
    }


def _few(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def _locate(name: str, params: Mapping[str, nn.Parameter],
            packed_modules: PackedModules) -> tuple[str | None, int]:
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
