"""Decoder layers that reuse another layer's weights (cross-layer weight sharing, written by ``trident share``).

On disk (a Hugging Face-style folder), config.json carries two keys beside the usual ones:

- ``trident_shared_layers``: ``{"5": 4, "6": 4, "11": 10}``, each shared layer (a string key, as JSON wants) to
  the layer whose weights it uses, its *source*. A source is never itself shared (chains are written resolved).
- ``trident_shared_modules``: the modules of a layer that are shared, by their Hugging Face names relative to the
  layer: ``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``, ``self_attn.o_proj``,
  ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj`` and optionally the norms ``input_layernorm``,
  ``post_attention_layernorm``, ``self_attn.q_norm``, ``self_attn.k_norm`` (Qwen3). Modules trident fuses are
  shared together: q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``).

model.safetensors holds each unique tensor once: a shared layer's shared modules have no tensors in the file
(safetensors cannot alias one tensor under two names); its other modules (its norms, by default) are there as
usual. transformers does not read these keys, so it cannot load such a folder as it is: ``trident share --expand``
writes the full copy it can.

Loading (:func:`tie_shared_modules`, called by ``build_model`` on the meta-device model before its weights are
set): a shared layer's module attribute is made the very module object of its source (``layers[5].self_attn
.qkv_proj is layers[4].self_attn.qkv_proj``). ``named_parameters`` then lists the source's parameters once, so the
loader fills them once and both layers hold the same tensors, and whatever a module derives from its weights
(a quantized layer's re-packed codes) is derived once too. Only the dense Llama-form families are accepted
(:data:`FAMILIES`): they have no per-layer state in these modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trident.errors import TridentError

LAYERS_KEY = "trident_shared_layers"
"""config.json key: shared layer (string) -> source layer (int)."""
MODULES_KEY = "trident_shared_modules"
"""config.json key: the shared modules' Hugging Face names relative to a layer."""
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose layers may share weights."""
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
"""The weight matrices of a decoder layer (what ``trident share`` always shares)."""
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
"""The norms a layer may share too (``trident share --share-norms``); q/k norms exist in Qwen3 only."""
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
"""trident's fused modules and the Hugging Face modules each is made of (shared all together or not at all)."""


@dataclass(frozen=True)
class SharedLayers:
    """Which layers use which layer's weights, and which of their modules are shared."""

    sources: tuple[tuple[int, int], ...]
    """(shared layer, source layer) pairs in increasing order of the shared layer."""
    modules: tuple[str, ...]
    """Hugging Face module names relative to a layer (see the module docstring), in :data:`PROJECTIONS` +
    :data:`NORMS` order."""

    def __post_init__(self) -> None:
        known = PROJECTIONS + NORMS
        unknown = [m for m in self.modules if m not in known]
        if unknown or not self.modules:
            raise TridentError(f"{MODULES_KEY} must list some of {', '.join(known)}; got {list(self.modules)}")
        for fused, parts in FUSED.items():
            if 0 < sum(p in self.modules for p in parts) < len(parts):
                raise TridentError(f"{MODULES_KEY}: {', '.join(parts)} are shared together (trident fuses them into "
                                   f"{fused}); list all of them or none")
        targets = [t for t, _ in self.sources]
        if len(set(targets)) != len(targets):
            raise TridentError(f"{LAYERS_KEY} names a shared layer twice")
        for target, source in self.sources:
            if target == source or source in targets:
                raise TridentError(f"{LAYERS_KEY}: layer {target} -> {source}: a source must be another layer that "
                                   "is not shared itself")

    @classmethod
    def of(cls, mapping: Mapping[int, int], modules: tuple[str, ...]) -> SharedLayers:
        """From shared layer -> source layer; the modules are put in canonical order."""
        order = PROJECTIONS + NORMS
        return cls(tuple(sorted((int(t), int(s)) for t, s in mapping.items())),
                   tuple(sorted(set(modules), key=lambda m: order.index(m) if m in order else len(order))))

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], model_type: str, num_layers: int) -> SharedLayers | None:
        """The sharing a config.json declares (None when it has no :data:`LAYERS_KEY`), validated."""
        raw = hf_config.get(LAYERS_KEY)
        if raw is None:
            return None
        if model_type not in FAMILIES:
            raise TridentError(f"{LAYERS_KEY} is supported for {', '.join(FAMILIES)} models, not {model_type!r}")
        modules = hf_config.get(MODULES_KEY, PROJECTIONS)
        if not isinstance(raw, dict) or not isinstance(modules, list | tuple):
            raise TridentError(f"config.json: {LAYERS_KEY} must map layer numbers to layer numbers "
                               f"({{\"5\": 4}}) and {MODULES_KEY} must be a list of module names")
        try:
            mapping = {int(t): int(s) for t, s in raw.items()}
        except (TypeError, ValueError):
            raise TridentError(f"config.json: {LAYERS_KEY} must map layer numbers to layer numbers, got {raw}"
                               ) from None
        bad = sorted(i for pair in mapping.items() for i in pair if not 0 <= i < num_layers)
        if bad:
            raise TridentError(f"config.json: {LAYERS_KEY} names layer {bad[0]}; the model has {num_layers} layers")
        return cls.of(mapping, tuple(modules))

    def as_hf(self) -> dict[str, Any]:
        """The two config.json keys."""
        return {LAYERS_KEY: {str(t): s for t, s in self.sources}, MODULES_KEY: list(self.modules)}

    @property
    def mapping(self) -> dict[int, int]:
        """Shared layer -> source layer."""
        return dict(self.sources)

    def trident_modules(self) -> tuple[str, ...]:
        """The shared modules by trident's names (fused where trident fuses)."""
        return trident_names(self.modules)

    def is_shared_tensor(self, name: str) -> bool:
        """Whether a Hugging Face tensor name (``model.layers.5.mlp.up_proj.weight``) belongs to a shared layer's
        shared module (so a unique-tensor folder leaves it out)."""
        parts = name.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return False
        return int(parts[2]) in self.mapping and ".".join(parts[3:-1]) in self.modules

    def source_name(self, name: str) -> str:
        """The source layer's name of a shared tensor (``model.layers.5.x.weight`` -> ``model.layers.4.x.weight``)."""
        parts = name.split(".")
        parts[2] = str(self.mapping[int(parts[2])])
        return ".".join(parts)


def trident_names(modules: tuple[str, ...]) -> tuple[str, ...]:
    """Hugging Face module names relative to a layer -> trident's (``self_attn.q_proj`` -> ``self_attn.qkv_proj``),
    each once, in order."""
    out: list[str] = []
    for module in modules:
        fused = next((f for f, parts in FUSED.items() if module in parts), module)
        if fused not in out:
            out.append(fused)
    return tuple(out)


def tie_shared_modules(model: Any, shared: SharedLayers, layers_path: str = "model.layers") -> None:
    """Make each shared layer's shared modules the source layer's module objects, in place (``model`` a trident
    model; ``layers_path`` where its decoder layers are). Called on the meta-device model before its weights are
    loaded, after any quantized modules are installed (see the module docstring)."""
    layers = model.get_submodule(layers_path)
    for target, source in shared.sources:
        for path in shared.trident_modules():
            parent, _, attr = path.rpartition(".")
            try:
                module = layers[source].get_submodule(path)
                owner = layers[target].get_submodule(parent) if parent else layers[target]
            except AttributeError:
                raise TridentError(f"layer {target} cannot share {path}: this model has no such module") from None
            setattr(owner, attr, module)
