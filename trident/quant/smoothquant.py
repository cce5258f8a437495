"""SmoothQuant's scale migration (Xiao et al. 2022): move the activations' outlier channels into the weights before
W8A8 quantization, without changing the function the model computes.

A Linear fed by an RMSNorm computes ``y = (n(x) * g) W^T`` (n the normalisation, g the norm's weight). For any
positive s [K], ``(n(x) * g / s) (W diag(s))^T`` is the same function: dividing the norm's weight by s and
multiplying the weight's columns by s changes nothing in exact arithmetic, but the Linear's inputs become
``X_j / s_j``. With

    s_j = max|X_j|^alpha / max_n |W_n,j|^(1 - alpha)      (alpha = --smooth-alpha, default 0.5)

the per-channel maxima of the inputs and of the weight's columns meet in the middle, so per-token int8 rounding
of the activations (whose step is set by the row's largest channel) loses less, for a little more loss in the
weights. max|X_j| is taken over calibration text (:func:`activation_maxima`, hooks on the Linear layers while
:func:`trident.quant.calibrate.run_calibration` runs the model), max|W_:,j| over every output of the fused
Linear (``qkv_proj``: q, k and v share their input). s is clamped to [min_scale, max_scale]; a channel whose
activation or weight maximum is 0 keeps s = 1.

Which norm feeds which Linear is declared per decoder-layer class (:data:`NORM_INPUTS`; an unknown one is a
clear error): Llama / Mistral / Qwen2 / Qwen3 ``input_layernorm -> self_attn.qkv_proj`` and
``post_attention_layernorm -> mlp.gate_up_proj``; Gemma 2 / 3 ``input_layernorm -> self_attn.qkv_proj`` and
``pre_feedforward_layernorm -> mlp.gate_up_proj``. Gemma's norms scale by (1 + g): the migrated weight is
``(1 + g) / s - 1``.

``down_proj`` takes no norm's output, but its input ``act(gate) * up`` is linear in ``up``: dividing the up half's
rows of ``gate_up_proj`` (and its bias) by s and multiplying ``down_proj``'s columns by s is exact too
(``mlp_down=True``, the default; :data:`MLP_INPUTS`). It is where W8A8 loses most on SmolLM2 (docs/compression.md).
Dividing whole rows of a per-channel quantized weight costs it nothing (each row's scale follows). ``o_proj``
(its input a mix of value heads shared across query heads) gets no migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trident.errors import TridentError
from trident.models.layers import Linear, RMSNorm

NORM_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "LlamaDecoderLayer": (("input_layernorm", "self_attn.qkv_proj"), ("post_attention_layernorm", "mlp.gate_up_proj")),
    "GemmaDecoderLayer": (("input_layernorm", "self_attn.qkv_proj"), ("pre_feedforward_layernorm", "mlp.gate_up_proj")),
}
"""Decoder-layer class name -> (norm, the Linear its output feeds), names relative to the layer."""
MLP_INPUTS: dict[str, tuple[str, str]] = {
    "LlamaDecoderLayer": ("mlp.gate_up_proj", "mlp.down_proj"),
    "GemmaDecoderLayer": ("mlp.gate_up_proj", "mlp.down_proj"),
}
"""Decoder-layer class name -> (the fused gate/up Linear, the down projection its gated product feeds)."""


@dataclass(frozen=True)
class SmoothConfig:
    """How strongly the activations' channel ranges are migrated into the weights."""

    alpha: float = 0.5
    """Migration strength in [0, 1]: 1 moves the activations' channel ranges all into the weights (s_j = max|X_j|,
    every input channel then peaks at 1), 0 the weights' column ranges all into the activations
    (s_j = 1 / max|W_:,j|); 0.5 balances the two (SmoothQuant's choice for most models). No migration at all is
    ``trident quantize --method w8a8``."""
    min_scale: float = 1e-2
    """Smallest s_j: a channel is never amplified more than 100x (a nearly dead input channel with a large weight
    column would otherwise blow up its weights' range)."""
    max_scale: float = 1e2
    """Largest s_j: a channel is never shrunk more than 100x."""
    mlp_down: bool = True
    """Also migrate down_proj's inputs into it through the up half of gate_up_proj (see the module docstring)."""

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise TridentError(f"--smooth-alpha must be a number in [0, 1] (0.5 is usual), got {self.alpha!r}")
        if not isinstance(self.mlp_down, bool):
            raise TridentError(f"mlp_down must be True or False, got {self.mlp_down!r}")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise TridentError(f"smoothing scales must satisfy 0 < min_scale <= 1 <= max_scale, got "
                               f"[{self.min_scale}, {self.max_scale}]")


@dataclass(frozen=True)
class SmoothedPair:
    """One migration: where the inputs' division went (a norm, or gate_up_proj's up rows), the Linear they feed,
    and what the scales did (for the report)."""

    source: str
    """The norm, or the fused gate_up_proj whose up rows were divided."""
    kind: str
    """``norm`` or ``up_rows``."""
    linear: str
    scales: torch.Tensor
    """s [K], float64."""
    activation_spread_before: float
    """Largest over median channel maximum of the Linear's inputs, before migration."""
    activation_spread_after: float
    """The same after (max|X_j| / s_j)."""


def norm_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """(norm, Linear) module names of every decoder layer, in model order (see :data:`NORM_INPUTS`)."""
    pairs = []
    for prefix, kind in _layer_kinds(model):
        for norm, linear in NORM_INPUTS[kind]:
            if not isinstance(model.get_submodule(prefix + norm), RMSNorm) or not isinstance(
                    model.get_submodule(prefix + linear), Linear):
                raise TridentError(f"{prefix + norm} -> {prefix + linear} is not an RMSNorm feeding a Linear; "
                                   "quantize this model before any other change")
            pairs.append((prefix + norm, prefix + linear))
    return pairs


def mlp_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """(gate_up_proj, down_proj) module names of every decoder layer, in model order (see :data:`MLP_INPUTS`)."""
    pairs = []
    for prefix, kind in _layer_kinds(model):
        gate_up, down = (prefix + name for name in MLP_INPUTS[kind])
        if not isinstance(model.get_submodule(gate_up), Linear) or not isinstance(model.get_submodule(down), Linear):
            raise TridentError(f"{gate_up} -> {down} are not float Linear layers; quantize this model before any "
                               "other change")
        pairs.append((gate_up, down))
    return pairs


def migrated_linears(model: nn.Module, config: SmoothConfig) -> list[str]:
    """The Linear layers whose inputs ``config`` migrates (their activation maxima are needed), in model order."""
    names = {linear for _, linear in norm_inputs(model)}
    if config.mlp_down:
        names |= {down for _, down in mlp_inputs(model)}
    return [name for name, _ in model.named_modules() if name in names]


def _layer_kinds(model: nn.Module) -> list[tuple[str, str]]:
    """(``model.layers.i.``, the decoder-layer class name) of every layer; an unsupported one is an error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TridentError(f"{type(model).__name__} has no decoder layers at model.layers; SmoothQuant cannot "
                           "migrate its scales")
    kinds = []
    for index, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind not in NORM_INPUTS:
            raise TridentError(f"SmoothQuant does not know which norm feeds which projection in {kind}; it supports "
                               f"{', '.join(NORM_INPUTS)} layers: use --method w8a8 (no migration)")
        kinds.append((f"model.layers.{index}.", kind))
    if getattr(model.config, "shared_layers", None) is not None:
        raise TridentError("SmoothQuant migrates each layer's norm into its projections; layers sharing their "
                           "projections (trident share) cannot each get their own: use --method w8a8, or smooth "
                           "the model before sharing its layers")
    return kinds


@torch.no_grad()
def activation_maxima(model: nn.Module, linears: list[str], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """max |X_j| (float32 [K]) of the inputs of each named Linear while ``run()`` runs the model (forward
    pre-hooks; removed afterwards whatever happens)."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).to(torch.float32)
            maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in linears]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in linears if name not in maxima]
    if missing:
        raise TridentError(f"calibration never ran {missing[0]}; SmoothQuant needs every migrated layer's inputs")
    return maxima


def smoothing_scales(activation_max: torch.Tensor, weight: torch.Tensor, config: SmoothConfig) -> torch.Tensor:
    """s [K] (float64) for a Linear's weight [N, K] and its inputs' channel maxima [K] (see the module docstring)."""
    a = activation_max.to(torch.float64)
    w = weight.detach().to(torch.float64).abs().amax(dim=0)
    usable = (a > 0) & (w > 0)
    s = a.clamp_min(1e-300) ** config.alpha / w.clamp_min(1e-300) ** (1 - config.alpha)
    return torch.where(usable, s, torch.ones_like(s)).clamp_(config.min_scale, config.max_scale)


@torch.no_grad()
def migrate(model: nn.Module, maxima: dict[str, torch.Tensor], config: SmoothConfig) -> list[SmoothedPair]:
    """Divide each norm's weight by s and multiply its Linear's columns by s (every pair of :func:`norm_inputs`),
    and with ``config.mlp_down`` divide gate_up_proj's up rows (and bias) by s and multiply down_proj's columns by
    s (:func:`mlp_inputs`), in place; ``maxima`` from :func:`activation_maxima` over :func:`migrated_linears`, taken
    before any migration (which changes no Linear's output but the migrated ones' inputs). Computed in float64,
    stored in the parameters' dtype."""
    missing = [name for name in migrated_linears(model, config) if name not in maxima]
    if missing:
        raise TridentError(f"no activation maxima for {missing[0]}; run the calibration over the whole model")
    pairs = []
    for norm_name, linear_name in norm_inputs(model):
        norm: RMSNorm = model.get_submodule(norm_name)
        linear: Linear = model.get_submodule(linear_name)
        s = smoothing_scales(maxima[linear_name], linear.weight, config)
        g = norm.weight.to(torch.float64)
        migrated = (1 + g) / s - 1 if norm.unit_offset else g / s
        norm.weight.copy_(migrated.to(norm.weight.dtype))
        _scale_columns(linear, s)
        pairs.append(_pair(norm_name, "norm", linear_name, s, maxima))
    for gate_up_name, down_name in mlp_inputs(model) if config.mlp_down else []:
        gate_up: Linear = model.get_submodule(gate_up_name)
        down: Linear = model.get_submodule(down_name)
        s = smoothing_scales(maxima[down_name], down.weight, config)
        up = slice(gate_up.out_features // 2, gate_up.out_features)  # gate first, then up (ops.act_and_mul)
        gate_up.weight[up] = (gate_up.weight[up].to(torch.float64) / s[:, None]).to(gate_up.weight.dtype)
        if gate_up.bias is not None:
            gate_up.bias[up] = (gate_up.bias[up].to(torch.float64) / s).to(gate_up.bias.dtype)
        _scale_columns(down, s)
        pairs.append(_pair(gate_up_name, "up_rows", down_name, s, maxima))
    return pairs


def _scale_columns(linear: Linear, s: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.to(torch.float64) * s[None, :]).to(linear.weight.dtype))


def _pair(source: str, kind: str, linear: str, s: torch.Tensor, maxima: dict[str, torch.Tensor]) -> SmoothedPair:
    a = maxima[linear].to(torch.float64)
    return SmoothedPair(source, kind, linear, s, _spread(a), _spread(a / s))


def changed_source_tensors(model: nn.Module, pairs: list[SmoothedPair]) -> dict[str, torch.Tensor]:
    """The tensors migration changed besides the Linear weights it feeds to quantization, under the Hugging Face
    names a quantized folder keeps them by (float32, on the CPU): every migrated norm's weight, and the biases of
    a gate_up_proj whose up rows were divided (one per fused part, ``...mlp.up_proj.bias``)."""
    tensors = {}
    packed = getattr(model, "packed_modules", {})
    for p in pairs:
        module = model.get_submodule(p.source)
        if p.kind == "norm":
            tensors[f"{p.source}.weight"] = module.weight.detach().to("cpu", torch.float32, copy=True)
        elif module.bias is not None:
            parent, _, leaf = p.source.rpartition(".")
            start = 0
            for part, rows in packed[leaf]:
                tensors[f"{parent}.{part}.bias"] = module.bias.detach()[start: start + rows].to(
                    "cpu", torch.float32, copy=True)
                start += rows
    return tensors


def _spread(channel_max: torch.Tensor) -> float:
    median = float(channel_max.median())
    return float(channel_max.max()) / median if median > 0 else float("inf")
