"""The quantized checkpoint format: a Hugging Face-style folder trident loads like any other.

- ``config.json``: the source's config plus ``quantization_config`` = ``{"quant_method", "bits", "group_size",
  "symmetric", "method", "modules": [module names]}``; module names are trident's (fused ``qkv_proj`` and
  ``gate_up_proj``, e.g. ``model.layers.0.self_attn.qkv_proj``). ``quant_method`` says how the listed modules run
  (:data:`MODULE_KINDS`): ``trident-rtn`` weight-only (QuantizedLinear), ``trident-w8a8`` int8 weights times int8
  activations quantized per token at run time (W8A8Linear, weights stored as ``trident-rtn``'s int8 per channel
  symmetric). ``method`` says how the codes were chosen (:data:`CODE_METHODS`; ``rtn`` when absent): metadata only,
  the layout is the same whatever chose them; ``trident-w8a8`` with ``smoothquant`` also records ``smooth_alpha``.
  Modules quantized differently from that default (mixed bits) are listed in ``"module_configs": {module name:
  {"bits", "group_size", "symmetric"}}``, absent when every module follows the default (as in folders written
  before mixed bits). ``"experts": [experts module names]`` (e.g. ``model.layers.0.mlp.experts``), absent when
  none: MoE layers whose routed experts are stored quantized, symmetric (:mod:`trident.moe.quant`; ``trident-rtn``
  weight-only only): by default as the default config implies (int8 per output channel whatever its groups, int4
  in its groups); ``"experts_config": {"bits", "group_size", "symmetric"}`` gives them a format of their own
  (int8 Linear layers with int4 experts), absent when they follow the default (as in folders written before it).
- ``model.safetensors``: every tensor the quantized modules do not replace, under its Hugging Face name and in
  its source dtype (tensors a method changed besides the quantized modules, such as SmoothQuant's norm weights,
  in float32), plus ``<module>.qweight``, ``<module>.scales`` and (asymmetric) ``<module>.zeros`` for each
  quantized module (layouts in :mod:`trident.quant.rtn`). A quantized module's bias stays under its HF names.
  Each listed experts module holds ``<experts>.gate_up_qweight``, ``.gate_up_scales``, ``.down_qweight`` and
  ``.down_scales`` (int8 [E, 2I, H], float32 [E, 2I], int8 [E, H, I], float32 [E, H]; or int4's packed layout,
  :mod:`trident.moe.quant`) instead of its float matrices.
- the tokenizer: a Hugging Face source's tokenizer files are copied; a GGUF source's tokenizer is written as
  tokenizer.json (its fast-tokenizer backend), tokenizer_config.json (special tokens, add_bos/add_eos, chat
  template) and generation_config.json (every end-of-sequence id).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trident.errors import TridentError
from trident.quant.rtn import QuantConfig, QuantizedWeight

QUANT_METHOD = "trident-rtn"
W8A8_METHOD = "trident-w8a8"
SUPPORTED_METHODS = (QUANT_METHOD, W8A8_METHOD)
MODULE_KINDS = {QUANT_METHOD: "trident.quant.linear:QuantizedLinear", W8A8_METHOD: "trident.quant.w8a8:W8A8Linear"}
"""The module class each ``quant_method`` installs (imported when used): both take (in_features, out_features,
config, QuantizedWeight, bias) and expose ``quantized``."""
CODE_METHODS = {QUANT_METHOD: ("rtn", "gptq"), W8A8_METHOD: ("rtn", "smoothquant")}
"""How the codes of each ``quant_method``'s checkpoint may have been chosen (``quantization_config.method``)."""
W8A8_WEIGHTS = QuantConfig(bits=8)
"""How ``trident-w8a8`` weights are stored: int8 per output channel, symmetric (scales float32 [N, 1])."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class QuantizedModules:
    """What a quantized checkpoint's ``quantization_config`` says: how, and which modules."""

    config: QuantConfig
    """The default: how every listed module not in :attr:`module_configs` is quantized."""
    modules: tuple[str, ...]
    module_configs: Mapping[str, QuantConfig] = field(default_factory=dict)
    """Listed modules quantized otherwise than :attr:`config` (mixed bits), by name."""
    method: str = "rtn"
    """How the codes were chosen (one of CODE_METHODS[quant_method]): recorded, never needed to load them."""
    quant_method: str = QUANT_METHOD
    """How the listed modules run (one of SUPPORTED_METHODS, see :data:`MODULE_KINDS`)."""
    smooth_alpha: float | None = None
    """``trident-w8a8`` with ``method="smoothquant"``: the migration strength used (metadata); None otherwise."""
    experts: tuple[str, ...] = ()
    """Experts modules (``model.layers.0.mlp.experts``) held as codes and scales (trident/moe/quant.py), in the
    format :meth:`experts_format` says."""
    experts_config: QuantConfig | None = None
    """How the routed experts (:attr:`experts`) are quantized when not as :attr:`config` implies: symmetric, int8
    per channel or int4 per channel / in groups (e.g. int8 Linear layers with int4 experts); None: as
    :attr:`config` implies (see :meth:`experts_format`)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.module_configs if name not in self.modules]
        if unknown:
            raise TridentError(f"quantization_config.module_configs names {', '.join(unknown)}, which "
                               "quantization_config.modules does not list")
        if self.quant_method not in SUPPORTED_METHODS:
            raise TridentError(f"quantization_config.quant_method {self.quant_method!r} is not supported; trident "
                               f"loads {', '.join(SUPPORTED_METHODS)} (written by `trident quantize`)")
        methods = CODE_METHODS[self.quant_method]
        if self.method not in methods:
            raise TridentError(f"quantization_config.method {self.method!r} is not one of {', '.join(methods)} "
                               f"for {self.quant_method}")
        if self.quant_method == W8A8_METHOD and (self.config != W8A8_WEIGHTS or self.module_configs):
            raise TridentError(f"{W8A8_METHOD} stores every module as int8 per channel, symmetric; got "
                               f"{self.config} with {len(self.module_configs)} per-module configs")
        if (self.smooth_alpha is not None) != (self.method == "smoothquant") or not (
                self.smooth_alpha is None or isinstance(self.smooth_alpha, (int, float))):
            raise TridentError("quantization_config.smooth_alpha must be a number exactly when method is "
                               f"smoothquant; got {self.smooth_alpha!r} with method {self.method!r}")
        if self.experts and self.quant_method != QUANT_METHOD:
            raise TridentError(f"quantization_config.experts (quantized routed experts) goes with {QUANT_METHOD} "
                               f"only, not {self.quant_method}")
        if self.experts_config is not None:
            self._check_experts_config()

    def _check_experts_config(self) -> None:
        from trident.moe.quant import expert_quant_config

        given = self.experts_config
        if self.quant_method != QUANT_METHOD:
            raise TridentError(f"quantization_config.experts_config (the routed experts' own format) goes with "
                               f"{QUANT_METHOD} (weight-only) only, not {self.quant_method}, which leaves the "
                               "experts in the source dtype")
        if not self.experts:
            raise TridentError("quantization_config.experts_config gives the routed experts a format, but "
                               "quantization_config.experts lists no experts module (a dense model, or experts "
                               "left in the source dtype)")
        if not isinstance(given, QuantConfig) or not given.symmetric or given.float_zero_points:
            raise TridentError(f"quantization_config.experts_config must be a symmetric config (routed experts are "
                               f"symmetric codes), got {given}")
        try:
            expert_quant_config(given.bits, given.group_size)
        except TridentError as e:
            raise TridentError(f"quantization_config.experts_config is invalid: {e}") from None

    def config_of(self, name: str) -> QuantConfig:
        """How module ``name`` (one of :attr:`modules`) is quantized."""
        return self.module_configs.get(name, self.config)

    def experts_format(self) -> tuple[int, int | None]:
        """(bits, group length along K; None: per channel) of the routed experts (:attr:`experts`):
        :attr:`experts_config`'s, or as :attr:`config` implies (int8 per channel whatever its groups, int4 in its
        groups; :func:`trident.moe.quant.experts_group_size`). Everything that quantizes, sizes, splits, checks or
        describes the experts reads their format here."""
        if self.experts_config is not None:
            return self.experts_config.bits, self.experts_config.group_size
        from trident.moe.quant import experts_group_size

        return self.config.bits, experts_group_size(self.config)

    def as_hf_dict(self) -> dict[str, Any]:
        entry = {"quant_method": self.quant_method, **_config_dict(self.config), "method": self.method,
                 **({} if self.smooth_alpha is None else {"smooth_alpha": self.smooth_alpha}),
                 "modules": list(self.modules)}
        if self.experts:
            entry["experts"] = list(self.experts)
        if self.experts_config is not None:
            entry["experts_config"] = _config_dict(self.experts_config)
        if self.module_configs:
            entry["module_configs"] = {name: _config_dict(self.module_configs[name])
                                       for name in self.modules if name in self.module_configs}
        return entry


def _config_dict(config: QuantConfig) -> dict[str, Any]:
    return {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric}


def _config_from(entry: Any, where: str) -> QuantConfig:
    if not isinstance(entry, Mapping):
        raise TridentError(f"{where} must be an object with bits, group_size and symmetric")
    try:
        return QuantConfig(bits=entry.get("bits"), group_size=entry.get("group_size"),
                           symmetric=entry.get("symmetric"))
    except TridentError as e:
        raise TridentError(f"{where} is invalid: {e}") from None


def read_quantization_config(hf_config: Mapping[str, Any]) -> QuantizedModules | None:
    """The checkpoint's quantization, None when unquantized; an unknown or malformed one is a TridentError."""
    entry = hf_config.get("quantization_config")
    if entry is None:
        return None
    method = entry.get("quant_method") if isinstance(entry, Mapping) else None
    if method not in SUPPORTED_METHODS:
        raise TridentError(f"quantization_config.quant_method {method!r} is not supported; trident loads "
                           f"{', '.join(SUPPORTED_METHODS)} (written by `trident quantize`)")
    modules = entry.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TridentError("quantization_config.modules must be a list of module names")
    config = _config_from(entry, "quantization_config")
    module_configs = entry.get("module_configs", {})
    if not isinstance(module_configs, Mapping):
        raise TridentError("quantization_config.module_configs must map module names to "
                           "{bits, group_size, symmetric}")
    overrides = {name: _config_from(c, f"quantization_config.module_configs[{name!r}]")
                 for name, c in module_configs.items()}
    experts = entry.get("experts", [])
    if not isinstance(experts, list) or not all(isinstance(m, str) for m in experts):
        raise TridentError("quantization_config.experts must be a list of experts module names")
    experts_config = entry.get("experts_config")
    if experts_config is not None:
        experts_config = _config_from(experts_config, "quantization_config.experts_config")
    return QuantizedModules(config, tuple(modules), overrides, method=entry.get("method", "rtn"), quant_method=method,
                            smooth_alpha=entry.get("smooth_alpha"), experts=tuple(experts),
                            experts_config=experts_config)


def module_class(quant_method: str) -> type[nn.Module]:
    """The module class that runs a ``quant_method``'s modules (:data:`MODULE_KINDS`)."""
    import importlib

    module, _, name = MODULE_KINDS[quant_method].partition(":")
    return getattr(importlib.import_module(module), name)


def install_quantized_modules(model: nn.Module, quantization: QuantizedModules,
                              tensors: Mapping[str, torch.Tensor], device: torch.device,
                              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace the listed Linear layers of ``model`` (built on the meta device) by quantized layers (the
    ``quant_method``'s :func:`module_class`) holding the checkpoint's codes, scales and zero points, and a listed
    token embedding (a GGUF file's table kept as codes) by a QuantizedEmbedding whose rows come out in ``dtype``;
    returns the tensors left for ``load_weights``.

    A listed name is a Linear of the model (``...qkv_proj``) or one part of a fused one (``...q_proj``, as a GGUF
    file's weights come): the parts of a fused layer are concatenated along N (rows are independent output
    channels) when all of them are listed in one format; otherwise the listed parts are dequantized to float32
    and the fused layer stays a float Linear. Listed experts modules become QuantizedFusedExperts holding their
    codes and scales (int8 or int4, on ``device``)."""
    from trident.models.layers import Embedding
    from trident.quant.embedding import QuantizedEmbedding
    from trident.quant.linear import replace_module
    from trident.quant.rtn import dequantize

    cls = module_class(quantization.quant_method)
    rest = dict(tensors)
    _install_experts(model, quantization, rest, device)
    targets = _install_targets(model, list(quantization.modules))  # an unknown name fails before anything else
    weights: dict[str, tuple[QuantizedWeight, QuantConfig]] = {}
    for name in quantization.modules:
        config = quantization.config_of(name)
        parts = {kind: rest.pop(f"{name}.{kind}", None) for kind in ("qweight", "scales", "zeros")}
        if parts["qweight"] is None or parts["scales"] is None or (parts["zeros"] is None) != config.symmetric:
            raise TridentError(f"the checkpoint lacks the quantized tensors of {name} (qweight, scales"
                               f"{'' if config.symmetric else ', zeros'})")
        weights[name] = (QuantizedWeight(parts["qweight"], parts["scales"], parts["zeros"]), config)
    for target, members in targets.items():
        configs = {weights[m][1] for m in members if m in weights}
        if any(m not in weights for m in members) or len(configs) != 1:
            for m in members:  # a fused layer whose parts differ: float, as an unquantized checkpoint's
                if m in weights:
                    rest[f"{m}.weight"] = dequantize(*weights[m], torch.float32)
            continue
        (config,) = configs
        stacked = [torch.cat([weights[m][0][i] for m in members]) if weights[members[0]][0][i] is not None
                   else None for i in range(3)]
        q = QuantizedWeight(*(None if t is None else t.to(device) for t in stacked))
        layer = model.get_submodule(target)
        if isinstance(layer, Embedding):
            num, dim = layer.weight.shape
            _check_shapes(target, q, num, dim, config)
            replace_module(model, target, QuantizedEmbedding(num, dim, config, q, dtype))
            continue
        _check_shapes(target, q, layer.out_features, layer.in_features, config)
        bias = None if layer.bias is None else torch.empty(layer.out_features, device="meta")
        replace_module(model, target, cls(layer.in_features, layer.out_features, config, q, bias))
    return rest


def _install_experts(model: nn.Module, quantization: QuantizedModules, rest: dict[str, torch.Tensor],
                     device: torch.device) -> None:
    """Replace each listed experts module by a QuantizedFusedExperts of its tensors (popped from ``rest``), which
    must be in the format the quantization_config says (:meth:`QuantizedModules.experts_format`)."""
    from trident.moe.experts import FusedExperts
    from trident.moe.quant import EXPERT_TENSORS, QuantizedExpertWeight, QuantizedFusedExperts
    from trident.quant.linear import replace_module

    for name in quantization.experts:
        experts = _submodule(model, name)
        if not isinstance(experts, FusedExperts):
            raise TridentError(f"quantization_config.experts lists {name}, which is not an experts module of this "
                               "model")
        missing = [f"{name}.{t}" for t in EXPERT_TENSORS if f"{name}.{t}" not in rest]
        if missing:
            raise TridentError(f"the checkpoint lacks {', '.join(missing)} (quantized experts)")
        parts = [rest.pop(f"{name}.{t}").to(device) for t in EXPERT_TENSORS]
        hidden_size, intermediate_size = experts.gate_up_proj.shape[2], experts.intermediate_size
        quantized = QuantizedFusedExperts(experts.num_experts, hidden_size, intermediate_size, experts.activation,
                                          experts.backend, QuantizedExpertWeight(*parts[:2]),
                                          QuantizedExpertWeight(*parts[2:]))
        bits, group = quantization.experts_format()
        expected = None if bits == 8 else (group or hidden_size, group or intermediate_size)
        if quantized.bits != bits or quantized.group_sizes != expected:
            found = "int8 per channel" if quantized.bits == 8 else "int4 in groups of {} / {}".format(
                *quantized.group_sizes)
            raise TridentError(f"{name} holds {found} experts, but quantization_config says int{bits} "
                               f"{'per channel' if group is None else f'in groups of {group}'}: the checkpoint "
                               "does not match its config")
        replace_module(model, name, quantized)


def _install_targets(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """The model's Linear layer each listed name fills, with the names that make it up in row order (one name
    for an unfused layer; a fused layer's part names, listed or not)."""
    from trident.models.layers import Embedding, Linear

    packed = getattr(model, "packed_modules", {})
    targets: dict[str, list[str]] = {}
    for name in names:
        target, members = name, [name]
        if not isinstance(_submodule(model, name), (Linear, Embedding)):
            prefix, _, leaf = name.rpartition(".")
            fused = next((f for f, parts in packed.items() if leaf in (p for p, _ in parts)), None)
            target = f"{prefix}.{fused}" if fused else name
            members = [f"{prefix}.{p}" for p, _ in packed[fused]] if fused else [name]
            if not isinstance(_submodule(model, target), Linear):
                raise TridentError(f"quantization_config lists {name}, which is not a linear layer of this model")
        targets[target] = members
    return targets


def listed_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(out_features, in_features) of the weight a listed name stands for: a Linear's, or one part's rows of a
    fused Linear."""
    return _listed(model, name)[:2]


def listed_has_bias(model: nn.Module, name: str) -> bool:
    """Whether the layer a listed name stands for (the fused Linear of a part) has a bias."""
    return _listed(model, name)[2]


def _listed(model: nn.Module, name: str) -> tuple[int, int, bool]:
    from trident.models.layers import Embedding, Linear

    layer = _submodule(model, name)
    if isinstance(layer, Linear):
        return layer.out_features, layer.in_features, layer.bias is not None
    if isinstance(layer, Embedding):
        rows, columns = layer.weight.shape
        return rows, columns, False
    prefix, _, leaf = name.rpartition(".")
    for fused, parts in getattr(model, "packed_modules", {}).items():
        for part, rows in parts:
            target = _submodule(model, f"{prefix}.{fused}")
            if part == leaf and isinstance(target, Linear):
                return rows, target.in_features, target.bias is not None
    raise TridentError(f"quantization_config lists {name}, which is not a linear layer of this model")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_shapes(name: str, q: QuantizedWeight, out_features: int, in_features: int, config: QuantConfig) -> None:
    from trident.quant.rtn import stored_layout

    layout = stored_layout(out_features, in_features, config)
    for kind, t in zip(("qweight", "scales", "zeros"), q):
        if t is not None and (tuple(t.shape), t.dtype) != layout[kind]:
            shape, dtype = layout[kind]
            raise TridentError(f"{name}.{kind} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}: "
                               "the checkpoint does not match its config")


def hf_module_of(name: str, packed_modules: Mapping[str, tuple[tuple[str, int], ...]]) -> str:
    """The trident module a Hugging Face tensor name belongs to (``...q_proj.weight`` -> ``...qkv_proj``)."""
    module = name.rpartition(".")[0]
    for fused, parts in packed_modules.items():
        for part, _ in parts:
            suffix = f".{part}"
            if module.endswith(suffix):
                return module[: -len(suffix)] + f".{fused}"
    return module


def save_quantized(model: nn.Module, checkpoint, modules: QuantizedModules, out_dir: str,
                   replaced: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Write the quantized folder (see the module docstring) for ``model`` after :func:`quantize_model`;
    ``checkpoint`` is the source it was built from; ``replaced``: tensors (Hugging Face names of the source's)
    written instead of the source's (SmoothQuant's migrated norm weights). Returns the files written."""
    cls = module_class(modules.quant_method)
    replaced = dict(replaced or {})
    unknown = sorted(set(replaced) - set(checkpoint.tensors))
    if unknown:
        raise TridentError(f"save_quantized: {', '.join(unknown)} replace no tensor of the source")
    quantized = set(modules.modules)
    packed = getattr(model, "packed_modules", {})
    experts_sources = _experts_source_names(model, modules.experts, checkpoint.tensors)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint.tensors.items():
        if (name.endswith(".weight") and hf_module_of(name, packed) in quantized) or name in experts_sources:
            continue
        tensors[name] = replaced.get(name, tensor).contiguous()
    for name in modules.experts:
        from trident.moe.quant import EXPERT_TENSORS, QuantizedFusedExperts

        experts = model.get_submodule(name)
        if not isinstance(experts, QuantizedFusedExperts):
            raise TridentError(f"{name} is not a QuantizedFusedExperts; quantize its experts first")
        for kind in EXPERT_TENSORS:
            tensors[f"{name}.{kind}"] = getattr(experts, kind).detach().cpu().contiguous()
    from trident.quant.embedding import QuantizedEmbedding

    for name in modules.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantizedEmbedding):  # a token table kept as codes (an int8 tied LM head): its head's
            layer = layer.head
        if not isinstance(layer, cls):
            raise TridentError(f"{name} is not a {cls.__name__} ({modules.quant_method}); quantize it first")
        for kind, t in zip(("qweight", "scales", "zeros"), layer.quantized):
            if t is not None:
                tensors[f"{name}.{kind}"] = t.detach().cpu().contiguous()
    return write_hf_folder(out_dir, tensors, {**checkpoint.hf_config, "quantization_config": modules.as_hf_dict()},
                           checkpoint)


def _experts_source_names(model: nn.Module, experts: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The source checkpoint's tensors (Hugging Face names) that the listed experts modules' codes replace."""
    from trident.moe.quant import experts_sources

    names = set()
    for module in experts:
        for found in experts_sources(module, list(tensors), getattr(model, "renames", {})).values():
            names.update(name for _, _, name in found)
    return names


def write_hf_folder(out_dir: str, tensors: Mapping[str, torch.Tensor], hf_config: Mapping,
                    tokenizer_source) -> list[str]:
    """Write a Hugging Face folder: model.safetensors (``tensors`` under their names, as they are, made
    contiguous), config.json (``hf_config``) and the tokenizer of the checkpoint ``tokenizer_source``
    (:func:`write_tokenizer`). Returns the files written. What the compression commands write (prune, its masks,
    share, upcycle, distill's student)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2)
    return ["config.json", "model.safetensors"] + write_tokenizer(tokenizer_source, out_dir)


def write_tokenizer(checkpoint, out_dir: str) -> list[str]:
    """Write ``checkpoint``'s tokenizer into ``out_dir`` as the module docstring says (a folder's files copied, a
    GGUF file's tokenizer converted); returns the files written. Shared by every command that writes a folder."""
    if checkpoint.format == "safetensors":
        copied = []
        for file in TOKENIZER_FILES:
            src = os.path.join(checkpoint.path, file)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, file))
                copied.append(file)
        return copied
    tok = checkpoint.tokenizer
    if tok is None:
        return []
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
    config: dict[str, Any] = dict(tok.special_tokens)
    if tok.add_bos is not None:  # None: tokenizer.json's post-processor decides, as it did in the source
        config["add_bos_token"] = tok.add_bos
        config["add_eos_token"] = tok.add_eos
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": list(tok.eos_token_ids),
                   **({"bos_token_id": tok.bos_token_id} if tok.bos_token_id is not None else {})}, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
