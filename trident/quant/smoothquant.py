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
``pre_feedforward_layernorm -> mlp.gate_up_proj``. ``o_proj`` and ``down_proj`` take no norm's output and get no
migration. Gemma's norms scale by (1 + g): the migrated weight is ``(1 + g) / s - 1``.
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

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise TridentError(f"--smooth-alpha must be a number in [0, 1] (0.5 is usual), got {self.alpha!r}")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise TridentError(f"smoothing scales must satisfy 0 < min_scale <= 1 <= max_scale, got "
                               f"[{self.min_scale}, {self.max_scale}]")


@dataclass(frozen=True)
class SmoothedPair:
    """One migration: the norm, the Linear it feeds, and what the scales did (for the report)."""

    norm: str
    linear: str
    scales: torch.Tensor
    """s [K], float64."""
    activation_spread_before: float
    """Largest over median channel maximum of the Linear's inputs, before migration."""
    activation_spread_after: float
    """The same after (max|X_j| / s_j)."""


def norm_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """(norm, Linear) module names of every decoder layer, in model order (see :data:`NORM_INPUTS`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TridentError(f"{type(model).__name__} has no decoder layers at model.layers; SmoothQuant cannot "
                           "migrate its scales")
    pairs = []
    for index, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind not in NORM_INPUTS:
            raise TridentError(f"SmoothQuant does not know which norm feeds which projection in {kind}; it supports "
                               f"{', '.join(NORM_INPUTS)} layers: use --method w8a8 (no migration)")
        for norm, linear in NORM_INPUTS[kind]:
            prefix = f"model.layers.{index}."
            if not isinstance(model.get_submodule(prefix + norm), RMSNorm) or not isinstance(
                    model.get_submodule(prefix + linear), Linear):
                raise TridentError(f"{prefix + norm} -> {prefix + linear} is not an RMSNorm feeding a Linear; "
                                   "quantize this model before any other change")
            pairs.append((prefix + norm, prefix + linear))
    return pairs


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
    """Divide each norm's weight by s and multiply its Linear's columns by s, in place (every pair of
    :func:`norm_inputs`; ``maxima`` from :func:`activation_maxima`). Computed in float64, stored in the
    parameters' dtype."""
    pairs = []
    for norm_name, linear_name in norm_inputs(model):
        norm: RMSNorm = model.get_submodule(norm_name)
        linear: Linear = model.get_submodule(linear_name)
        if linear_name not in maxima:
            raise TridentError(f"no activation maxima for {linear_name}; run the calibration over the whole model")
        s = smoothing_scales(maxima[linear_name], linear.weight, config)
        g = norm.weight.to(torch.float64)
        migrated = (1 + g) / s - 1 if norm.unit_offset else g / s
        norm.weight.copy_(migrated.to(norm.weight.dtype))
        linear.weight.copy_((linear.weight.to(torch.float64) * s[None, :]).to(linear.weight.dtype))
        a = maxima[linear_name].to(torch.float64)
        pairs.append(SmoothedPair(norm_name, linear_name, s, _spread(a), _spread(a / s)))
    return pairs


def _spread(channel_max: torch.Tensor) -> float:
    median = float(channel_max.median())
    return float(channel_max.max()) / median if median > 0 else float("inf")
