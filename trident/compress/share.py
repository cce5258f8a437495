"""Cross-layer weight sharing of Llama-form dense models: runs of adjacent decoder layers use one set of weights.

A *group* is a run of adjacent layers ``a-b`` (a < b): layers a+1..b use the weights of the group, stored under
layer a's names, and lose their own. What is shared (:func:`shared_modules`): every weight matrix of the decoder
block (attention q/k/v/o, MLP gate/up/down, and their biases); the norms only with ``share_norms`` (by default each
layer keeps its own norms: they are 2 x hidden numbers per layer and let each layer rescale the shared matrices'
inputs, which recovers much of the quality). The group's weights (``merge``): the first layer's (``first``), or the
element-wise mean of the group's layers (``mean``, computed in float64, stored in the source dtype).

The folder written (:func:`shared_tensors`, trident/models/shared_layers.py for the format): config.json with
``trident_shared_layers`` / ``trident_shared_modules``, and model.safetensors holding each unique tensor once.
trident loads it with the shared layers holding the very same modules (no copy). :func:`expand_tensors` gives every
layer its tensors back (what ``trident share --expand`` writes, for Hugging Face transformers); for training a shared
student in transformers, :func:`tie_shared_layers` ties an HF model's modules' parameters and
:func:`unique_tensors` drops the copies from its state dict before saving.

Which groups (``--groups auto``): trident/compress/share_choice.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from trident.errors import TridentError
from trident.models.shared_layers import FAMILIES, NORMS, PROJECTIONS, SharedLayers

MERGES = {"first": "the group's first layer's weights", "mean": "the element-wise mean of the group's layers' weights"}
"""How a group's shared weights are made (``--merge``)."""
_GROUP = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShareConfig:
    """What to share and how."""

    groups: tuple[tuple[int, int], ...]
    """Runs of adjacent layers (first, last), last > first, disjoint, in increasing order."""
    merge: str = "first"
    """A key of :data:`MERGES`."""
    share_norms: bool = False
    """Share the layers' norms too (default: each layer keeps its own)."""

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise TridentError(f"unknown --merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        check_groups(self.groups)

    @property
    def mapping(self) -> dict[int, int]:
        """Shared layer -> the layer whose names hold its weights (its group's first)."""
        return {layer: first for first, last in self.groups for layer in range(first + 1, last + 1)}

    @property
    def num_shared(self) -> int:
        """Layers that lose their own weights."""
        return sum(last - first for first, last in self.groups)


def check_groups(groups: Iterable[tuple[int, int]], num_layers: int | None = None) -> None:
    """Each group a run ``first < last`` within ``[0, num_layers)``, none overlapping another; TridentError if not."""
    seen: dict[int, tuple[int, int]] = {}
    for first, last in groups:
        if not first < last:
            raise TridentError(f"--groups: {first}-{last} is not a run of two or more layers (write FIRST-LAST with "
                               "FIRST < LAST, e.g. 4-5)")
        if num_layers is not None and last >= num_layers:
            raise TridentError(f"--groups: {first}-{last} is out of range: the model has layers 0-{num_layers - 1}")
        for layer in range(first, last + 1):
            if layer in seen:
                other = seen[layer]
                raise TridentError(f"--groups: {first}-{last} overlaps {other[0]}-{other[1]} (layer {layer}); "
                                   "groups must be disjoint")
            seen[layer] = (first, last)


def parse_groups(text: str, num_layers: int) -> tuple[tuple[int, int], ...]:
    """``"4-5,10-12"`` -> ((4, 5), (10, 12)), validated against ``num_layers`` (sorted)."""
    groups = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _GROUP.match(part)
        if match is None:
            raise TridentError(f"--groups: cannot read {part.strip()!r}; write runs of adjacent layers as FIRST-LAST, "
                               "comma separated (e.g. 4-5,10-12), or auto")
        groups.append((int(match.group(1)), int(match.group(2))))
    if not groups:
        raise TridentError("--groups is empty; write runs like 4-5,10-12, or auto with --num-shared K")
    check_groups(groups, num_layers)
    return tuple(sorted(groups))


def groups_of(mapping: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    """The runs of a shared layer -> first layer mapping (the inverse of :attr:`ShareConfig.mapping`)."""
    runs: dict[int, int] = {}
    for layer, first in mapping.items():
        runs[first] = max(runs.get(first, first), layer)
    return tuple(sorted(runs.items()))


def check_family(hf_config: Mapping) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise TridentError(f"trident share handles the dense Llama-form families ({', '.join(FAMILIES)}); this "
                           f"model is {model_type!r}")
    if hf_config.get("trident_shared_layers") is not None:
        raise TridentError("this model already shares layers; share the original model, or expand it first "
                           "(trident share --expand)")


def shared_modules(tensors: Mapping[str, torch.Tensor], share_norms: bool) -> tuple[str, ...]:
    """The Hugging Face module names (relative to a layer) that are shared: the projections, and with
    ``share_norms`` the norms layer 0 has (q/k norms in Qwen3 only)."""
    modules = PROJECTIONS
    if share_norms:
        modules += tuple(m for m in NORMS if f"model.layers.0.{m}.weight" in tensors)
    return modules


def sharing_of(config: ShareConfig, tensors: Mapping[str, torch.Tensor]) -> SharedLayers:
    return SharedLayers.of(config.mapping, shared_modules(tensors, config.share_norms))


def _layer_tensor_names(tensors: Mapping[str, torch.Tensor], layer: int, modules: tuple[str, ...]) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [name for name in tensors if name.startswith(prefix)
            and name[len(prefix):].rpartition(".")[0] in modules]


def mean_tensor(parts: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of equal-shaped tensors, in float64, returned in the first's dtype."""
    total = torch.zeros(parts[0].shape, dtype=torch.float64)
    for p in parts:
        total += p.to(torch.float64)
    return (total / len(parts)).to(parts[0].dtype)


def shared_tensors(tensors: Mapping[str, torch.Tensor], config: ShareConfig) -> tuple[dict[str, torch.Tensor],
                                                                                         SharedLayers]:
    """(the unique tensors to write, the sharing to declare): each group's shared tensors under its first layer's
    names (that layer's, or the group's mean), the other layers' shared tensors left out, everything else as is."""
    sharing = sharing_of(config, tensors)
    out = {name: t for name, t in tensors.items() if not sharing.is_shared_tensor(name)}
    if config.merge == "mean":
        for first, last in config.groups:
            for name in _layer_tensor_names(tensors, first, sharing.modules):
                suffix = name[len(f"model.layers.{first}."):]
                out[name] = mean_tensor([tensors[f"model.layers.{i}.{suffix}"] for i in range(first, last + 1)])
    return out, sharing


def expand_tensors(tensors: Mapping[str, torch.Tensor], sharing: SharedLayers,
                   num_layers: int) -> dict[str, torch.Tensor]:
    """Every layer's tensors, a shared layer's being its source's (the same tensor objects: clone before writing
    them with safetensors, which refuses aliases)."""
    out = dict(tensors)
    for target, source in sharing.sources:
        for name in _layer_tensor_names(tensors, source, sharing.modules):
            out[f"model.layers.{target}." + name[len(f"model.layers.{source}."):]] = tensors[name]
    missing = [i for i in range(num_layers) if not any(n.startswith(f"model.layers.{i}.") for n in out)]
    if missing:
        raise TridentError(f"layers {missing} have no tensors after expansion; the folder is incomplete")
    return out


def unique_tensors(tensors: Mapping[str, torch.Tensor], sharing: SharedLayers) -> dict[str, torch.Tensor]:
    """``tensors`` (e.g. a tied HF model's state dict) without the shared layers' copies of shared tensors; each
    dropped one must be its source's very tensor or equal to it (else the model is not shared as declared)."""
    out = {}
    for name, t in tensors.items():
        if not sharing.is_shared_tensor(name):
            out[name] = t
            continue
        source = tensors.get(sharing.source_name(name))
        if source is None or (source.data_ptr() != t.data_ptr() and not torch.equal(source, t)):
            raise TridentError(f"{name} differs from its source {sharing.source_name(name)}: this model is not "
                               "shared as declared (tie it with tie_shared_layers)")
    return out


def tie_shared_layers(hf_model: nn.Module, sharing: SharedLayers | Mapping[int, int],
                      modules: tuple[str, ...] = PROJECTIONS) -> SharedLayers:
    """Make a Hugging Face transformers model's shared layers use their source layers' parameters (the same
    Parameter objects, so training updates one tensor from both layers' gradients), in place. ``sharing``: a
    SharedLayers (a shared folder's ``config.shared_layers``) or a shared layer -> source mapping with
    ``modules``. The model's weights in the shared layers are replaced by their source's; for a group meant to
    hold its mean, load the shared folder's expanded copy first. Returns the SharedLayers applied."""
    if not isinstance(sharing, SharedLayers):
        sharing = SharedLayers.of(sharing, modules)
    layers = hf_model.get_submodule("model.layers")
    for target, source in sharing.sources:
        for path in sharing.modules:
            try:
                src, dst = layers[source].get_submodule(path), layers[target].get_submodule(path)
            except AttributeError:
                raise TridentError(f"the model's layer {target} has no {path} to share") from None
            for name, param in src.named_parameters(recurse=False):
                setattr(dst, name, param)
    return sharing


def unique_parameters(tensors: Mapping[str, torch.Tensor]) -> int:
    """Elements of ``tensors``, each storage counted once (at its largest extent)."""
    extents: dict[int, int] = {}
    for t in tensors.values():
        extents[t.data_ptr()] = max(extents.get(t.data_ptr(), 0), t.numel())
    return sum(extents.values())


def layer_parameters(tensors: Mapping[str, torch.Tensor], layer: int) -> int:
    prefix = f"model.layers.{layer}."
    return sum(t.numel() for name, t in tensors.items() if name.startswith(prefix))
