"""Load Hugging Face-named tensors into a model whose projections may be fused.

A model declares ``packed_modules``: fused name -> the (HF name, rows) parts it concatenates along the
output dimension, e.g. ``{"qkv_proj": (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}``.
Every parameter must be filled exactly once; a missing or unexpected tensor, or a shape mismatch,
is a clear error.

Routed experts are fused too, along a leading expert axis: ``expert_modules`` maps a fused parameter of an
``experts`` module (e.g. ``gate_up_proj`` [E, 2I, H]) to the per-expert parts that fill each expert's slice, so
``...experts.3.up_proj.weight`` [I, H] lands in ``...experts.gate_up_proj`` [3, I:2I]. A checkpoint that already
holds the fused tensor (transformers 5's own names) loads it as it is. ``renames`` maps a checkpoint name fragment
to the model's (Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``).

The model may live on the meta device: each parameter is replaced by the loaded tensor itself when
it needs no conversion (no copy at all), or by one concatenation of its parts. Parameters are set in the model's own
order, decoder layer after decoder layer; ``layer_loaded`` (optional) is called with the model and a decoder layer's
path (``model.layers.3``) once that layer's last parameter is set, before the next layer's first: a tensor-parallel
rank keeps only its slices of one layer at a time (trident/distributed/shard.py's ModelSharder).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from trident.config import ModelConfig
from trident.errors import TridentError

PackedModules = Mapping[str, tuple[tuple[str, int], ...]]
LayerLoaded = Callable[[nn.Module, str], None]
"""Called with the model and the path of a decoder layer whose parameters are all set."""
_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.weight$")
_LAYER_PATH = re.compile(r"^(.*?layers\.\d+)\.")


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], packed_modules: PackedModules, *,
                 dtype: torch.dtype, device: torch.device, expert_modules: PackedModules | None = None,
                 renames: Mapping[str, str] | None = None, float32_suffixes: tuple[str, ...] = (),
                 layer_loaded: LayerLoaded | None = None) -> None:
    """Set every parameter of ``model`` from ``tensors`` (cast to ``dtype``, moved to ``device``); parameters whose
    names end with one of ``float32_suffixes`` are kept in float32 whatever ``dtype`` (DeepSeek's router).
    ``layer_loaded``: see the module docstring."""
    params = dict(model.named_parameters())
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unexpected = []
    for name, tensor in tensors.items():
        for old, new in (renames or {}).items():
            name = name.replace(old, new)
        target, row_offset = _locate(name, params, packed_modules)
        if target is None and expert_modules:
            target, row_offset = _locate_expert(name, params, expert_modules)
        if target is None:
            unexpected.append(name)
            continue
        param = params[target]
        rows, trailing = _rows(param.shape, tensor.dim())
        if tuple(tensor.shape[1:]) != trailing or row_offset + tensor.shape[0] > rows:
            raise TridentError(
                f"weight {name} has shape {tuple(tensor.shape)}, which does not fit {target} "
                f"{tuple(param.shape)}: the config does not match the weights"
            )
        parts.setdefault(target, {})[row_offset] = tensor
    if unexpected:
        raise TridentError("unexpected weights in the checkpoint: " + _few(unexpected))
    missing = [n for n, p in params.items() if sum(t.numel() for t in parts.get(n, {}).values()) != p.numel()]
    if missing:
        raise TridentError("weights missing from the checkpoint: " + _few(missing))
    layer = None  # the decoder layer whose parameters are being set
    for name in params:
        match = _LAYER_PATH.match(name)
        if layer_loaded is not None and layer is not None and (match is None or match.group(1) != layer):
            layer_loaded(model, layer)
        layer = match and match.group(1)
        pieces = parts.pop(name, None)
        if pieces is None:  # an empty parameter: nothing to load
            continue
        ordered = [pieces[k] for k in sorted(pieces)]
        param_dtype = torch.float32 if name.endswith(float32_suffixes) else dtype
        value = ordered[0] if len(ordered) == 1 else torch.cat([t.to(param_dtype) for t in ordered])
        value = value.to(device=device, dtype=param_dtype).view(params[name].shape)
        module_name, _, attr = name.rpartition(".")
        # looked up now, not from a table of every module made before: a layer split by ``layer_loaded`` drops
        # the modules it replaced
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value, requires_grad=False)
        del pieces, ordered, value
    if layer_loaded is not None and layer is not None:
        layer_loaded(model, layer)


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


def _rows(shape: torch.Size, piece_dims: int) -> tuple[int, tuple[int, ...]]:
    """(rows, shape of a row) of a parameter filled by pieces of ``piece_dims`` dimensions: its own rows, or for a
    piece one dimension short (one expert's matrix in a fused [E, R, C] tensor) the E * R rows of the flattened
    tensor."""
    if piece_dims == len(shape) - 1 and len(shape) >= 2:
        return shape[0] * shape[1], tuple(shape[2:])
    return shape[0], tuple(shape[1:])


def _locate_expert(name: str, params: Mapping[str, nn.Parameter],
                   expert_modules: PackedModules) -> tuple[str | None, int]:
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None, 0
    prefix, expert, part_name = match.group(1), int(match.group(2)), match.group(3)
    for fused, parts in expert_modules.items():
        target = f"{prefix}.{fused}"
        if target not in params:
            continue
        offset = 0
        for part, rows in parts:
            if part == part_name:
                return target, expert * params[target].shape[1] + offset
            offset += rows
    return None, 0
