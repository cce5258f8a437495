"""`trident bench latency|offline --weights int8|int4|w8a8`: round-to-nearest quantize a Checkpoint's decoder
Linear weights where they lie (on the GPU for random weights generated there), before the engine is built, into
the same tensors a `trident quantize` folder holds, so that the engine loads them through its quantized path.

int8 is per channel symmetric, int4 symmetric with groups of 128 along K by default (``--group-size``); w8a8 is
int8 per channel symmetric weights run as W8A8 (int8 activations quantized per token at run time; no SmoothQuant
migration: random weights have no outlier channels, and the speed does not depend on the values). The LM head and
embeddings stay in the model dtype (rtn.NEVER_QUANTIZED), unless ``lm_head``: then the head is int8 per output
channel (trident/quant/head.py; a tied head is the embedding table).

With int8 or int4 (weight-only), the routed experts of an MoE model are quantized too (trident/moe/quant.py), to
``--expert-weights`` (default: as --weights): int8 per output channel and expert (whatever --group-size), int4 per
expert, output channel and group of --group-size along K (128 by default, 0: per channel): a step reads a half or a
quarter of their bytes; ``--weights int8 --expert-weights int4`` keeps the dense layers int8 and makes the experts
int4. w8a8 leaves them in the model dtype."""

from __future__ import annotations

import dataclasses

import torch

from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.models.build import meta_model
from trident.quant.format import QUANT_METHOD, W8A8_METHOD, W8A8_WEIGHTS, QuantizedModules
from trident.quant.linear import eligible_modules
from trident.quant.rtn import QuantConfig, quantize

WEIGHT_FORMATS = ("float", "int8", "int4", "w8a8")
"""--weights: the checkpoint's float weights (in --dtype), quantized to int8 / int4 (weight-only), or W8A8."""
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128}
"""Groups along K by default: int8 per channel, int4 128."""
EXPERT_WEIGHT_FORMATS = ("int8", "int4")
"""--expert-weights: the routed experts' format with --weights int8 or int4 (default: as --weights)."""


def bench_quant_config(weights: str, group_size: int | None) -> QuantConfig | None:
    """The QuantConfig of a --weights choice (None for float); ``group_size`` overrides the default (0: per
    channel)."""
    if weights not in WEIGHT_FORMATS:
        raise TridentError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights in ("float", "w8a8"):
        if group_size is not None:
            raise TridentError("--group-size applies to --weights int8 or int4 only")
        return W8A8_WEIGHTS if weights == "w8a8" else None
    group = DEFAULT_GROUP_SIZE[weights] if group_size is None else (group_size or None)
    return QuantConfig(bits=int(weights[3:]), group_size=group, symmetric=True)


def bench_experts_config(weights: str, expert_weights: str | None, group_size: int | None) -> QuantConfig | None:
    """The routed experts' own format (``QuantizedModules.experts_config``) of an --expert-weights choice beside
    --weights (None: as --weights implies, also when --expert-weights says the same): int8 per channel, int4 in
    groups of ``group_size`` (default 128, 0: per channel)."""
    from trident.moe.quant import experts_config_of

    if expert_weights is None:
        return None
    if expert_weights not in EXPERT_WEIGHT_FORMATS:
        raise TridentError(f"--expert-weights must be one of {', '.join(EXPERT_WEIGHT_FORMATS)}, got "
                           f"{expert_weights!r}")
    if weights not in ("int8", "int4"):
        raise TridentError(f"--expert-weights applies to --weights int8 or int4 (weight-only) only: --weights "
                           f"{weights} leaves the routed experts in --dtype")
    group = DEFAULT_GROUP_SIZE["int4"] if group_size is None else (group_size or None)
    return experts_config_of(bench_quant_config(weights, group_size), int(expert_weights[3:]), group)


def quantize_checkpoint(checkpoint: Checkpoint, config: QuantConfig, quant_method: str = QUANT_METHOD, *,
                        lm_head: bool = False, experts_config: QuantConfig | None = None) -> Checkpoint:
    """A Checkpoint whose eligible Linear weights (fused projections concatenated along N, as the model holds
    them) are replaced by ``<module>.qweight`` / ``.scales`` (/ ``.zeros``) on the weights' device, with its
    ``quantization`` set (``quant_method``: trident-rtn weight-only, or trident-w8a8); the float weights are
    released as they are quantized (from this Checkpoint's dict). With weight-only int8 / int4, every MoE layer's
    routed experts become ``<experts>.gate_up_qweight`` / ``_scales`` and ``.down_qweight`` / ``_scales`` likewise
    (:func:`quantize_checkpoint_experts`), in ``experts_config``'s format when given (None: as ``config``
    implies). ``lm_head``: the head (or the embedding table a tied head is) becomes int8 per channel too
    (trident/quant/head.py), listed with its own config."""
    if checkpoint.quantization is not None:
        raise TridentError(f"{checkpoint.path} is already quantized ({checkpoint.quantization.config}); benchmark it "
                           "without --weights")
    model = meta_model(checkpoint.config)
    packed = model.packed_modules
    plan = quantization_plan(model, config, quant_method, lm_head=lm_head, experts_config=experts_config)
    names, module_configs = plan.modules, plan.module_configs
    tensors = dict(checkpoint.tensors)
    types = dict(checkpoint.tensor_types)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        sources = [f"{parent}.{part}.weight" for part, _ in packed[leaf]] if leaf in packed else [f"{name}.weight"]
        missing = [s for s in sources if s not in tensors]
        if missing:
            raise TridentError(f"{checkpoint.path} lacks {', '.join(missing)}: cannot quantize {name}")
        parts = [tensors.pop(s) for s in sources]
        for s in sources:
            types.pop(s, None)
        weight = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        q = quantize(weight, module_configs.get(name, config))
        del weight
        for kind, t in zip(("qweight", "scales", "zeros"), q):
            if t is not None:
                tensors[f"{name}.{kind}"] = t
                types[f"{name}.{kind}"] = str(t.dtype).removeprefix("torch.").upper()
    quantize_checkpoint_experts(model, plan, tensors, types)
    return dataclasses.replace(checkpoint, tensors=tensors, tensor_types=types, quantization=plan)


def quantization_plan(model: torch.nn.Module, config: QuantConfig, quant_method: str = QUANT_METHOD, *,
                      lm_head: bool = False, experts_config: QuantConfig | None = None) -> QuantizedModules:
    """What :func:`quantize_checkpoint` makes of ``model`` (built on the meta device): the eligible Linear layers,
    the LM head with its own int8 config when ``lm_head``, and with weight-only int8 / int4 every experts module
    (in ``experts_config``'s format when given, which needs such a module)."""
    from trident.moe.quant import experts_module_names

    names = eligible_modules(model, config)
    module_configs = {}
    if lm_head:
        from trident.quant.head import head_config, head_module

        if quant_method != QUANT_METHOD:
            raise TridentError("an int8 LM head goes with weight-only int8 / int4 weights")
        module_configs[head_module(model)] = head_config()
        names = [*names, *module_configs]
    experts = tuple(experts_module_names(model)) if quant_method == QUANT_METHOD else ()
    if experts_config is not None and not experts:
        why = ("this model has no routed experts" if quant_method == QUANT_METHOD
               else f"{quant_method} leaves the routed experts in the model dtype")
        raise TridentError("a format of the routed experts' own (--expert-weights / --expert-bits) needs a "
                           f"mixture-of-experts model quantized weight-only (int8 / int4): {why}")
    return QuantizedModules(config, tuple(names), module_configs, quant_method=quant_method, experts=experts,
                            experts_config=experts_config)


def quantize_checkpoint_experts(model: torch.nn.Module, quantization: QuantizedModules,
                                tensors: dict[str, torch.Tensor], types: dict[str, str]) -> None:
    """Quantize the routed experts of ``quantization.experts`` of ``model`` (built on the meta device) in ``tensors``
    (Hugging Face names), in place: their float matrices (fused, or per expert, stacked) are replaced by the codes
    and scales of trident/moe/quant.py (in ``quantization.experts_format()``), on the matrices' device, layer by
    layer."""
    from trident.moe.quant import EXPERT_TENSORS, fused_expert_tensors, quantize_experts

    bits, group = quantization.experts_format()
    for name in quantization.experts:
        experts = model.get_submodule(name)
        sources = fused_expert_tensors(tensors, name, experts.num_experts, model.expert_part_names,
                                       getattr(model, "renames", {}))
        quantized = (*quantize_experts(sources[0], bits, group), *quantize_experts(sources[1], bits, group))
        del sources
        for kind, t in zip(EXPERT_TENSORS, quantized):
            tensors[f"{name}.{kind}"] = t
            types[f"{name}.{kind}"] = str(t.dtype).removeprefix("torch.").upper()
    for name in [n for n in types if n not in tensors]:  # the popped float matrices' types
        types.pop(name)


def quant_method_of(weights: str) -> str:
    """The checkpoint format a --weights choice is run as."""
    return W8A8_METHOD if weights == "w8a8" else QUANT_METHOD
