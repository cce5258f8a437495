"""Mixed 4/8-bit weight quantization: each unit (one Linear module of a decoder layer) is stored as int4 or int8,
chosen by its measured sensitivity under a budget of average bits per weight.

Average bits: the stored bits of the quantized modules (codes, scales and zero points; :func:`stored_bits`) over
the number of weights they stand for. int4 in groups of 64 with float32 scales is 4 + 32/64 = 4.5 bits (4.625
asymmetric: a uint8 zero point per group more); int8 per channel 8 + 32/K (8.06 for K = 576).

Sensitivity of a unit: how much the calibration loss (the mean negative log-likelihood of the calibration tokens,
in nats) rises when that unit alone is quantized to int4, every other weight kept as it was (float). The loss is
a function argument, so that the caller decides the text and windows (the ``calib`` slice, never ``eval``).

Choice (:func:`choose_bits`): every unit starts at int4; moving a unit to int8 costs its extra stored bits and is
worth (by the measurement) its sensitivity. Units are taken in decreasing order of sensitivity per extra bit,
each one that still fits the budget, which gives a greedy answer to the knapsack over (bits, sensitivity); no unit
left at int4 fits the remaining budget. It assumes sensitivities add up (units interact little at these sizes).

The quantizer of a module is a function argument too (:data:`ModuleQuantizer`, round-to-nearest by default), so
an error-compensating one measures through the same choice: with GPTQ (``--method gptq``), each module's int4
codes are computed once, on the float model's inputs, and handed out by :func:`prequantized`; the final model is
then quantized by GPTQ layer after layer with the chosen per-module grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from trident.errors import TridentError
from trident.models.layers import Linear
from trident.quant.linear import QuantizedLinear, replace_module
from trident.quant.rtn import QuantConfig, quantized_bytes

ModuleQuantizer = Callable[[str, Linear, QuantConfig], nn.Module]
"""(module name, its float Linear, config) -> the module that replaces it, quantized (a QuantizedLinear)."""


def rtn_quantizer(name: str, layer: Linear, config: QuantConfig) -> nn.Module:
    """Round-to-nearest (:func:`trident.quant.rtn.quantize`); the name is not needed."""
    return QuantizedLinear.from_linear(layer, config)


def prequantized(modules: Mapping[str, nn.Module], config: QuantConfig) -> ModuleQuantizer:
    """A quantizer handing out ``modules`` (by name), quantized beforehand on ``config``'s grid: e.g. GPTQ's codes
    of each module on the float model's inputs (:func:`trident.quant.calibrate.gptq_model` with ``install``)."""

    def quantizer(name: str, layer: Linear, asked: QuantConfig) -> nn.Module:
        if asked != config or name not in modules:
            raise TridentError(f"{name} was not quantized beforehand with {asked}")
        return modules[name]

    return quantizer


def stored_bits(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bits a weight [out_features, in_features] is stored in under ``config``: codes, scales and zero points."""
    return 8 * quantized_bytes(out_features, in_features, config)


@dataclass(frozen=True)
class MixedConfig:
    """How mixed bits quantize: a budget, and the two ways a unit can be stored."""

    average_bits: float
    """At most this many stored bits per weight on average over the quantized modules (see the module docstring)."""
    low: QuantConfig
    """The 4-bit way (usually in groups); it also says which modules are quantized."""
    high: QuantConfig
    """The 8-bit way (usually per channel) of the units worth it."""

    def __post_init__(self) -> None:
        if self.low.bits != 4 or self.high.bits != 8:
            raise TridentError(f"mixed bits choose between int4 and int8, got int{self.low.bits} and "
                               f"int{self.high.bits}")
        if not isinstance(self.average_bits, (int, float)) or not math.isfinite(self.average_bits):
            raise TridentError(f"the average bits must be a finite number, got {self.average_bits!r}")


@dataclass(frozen=True)
class Unit:
    """One unit of the choice: a Linear module, its shape and its measured sensitivity."""

    name: str
    out_features: int
    in_features: int
    sensitivity: float
    """Rise of the calibration loss (mean NLL, nats) with this unit alone at int4."""

    @property
    def num_weights(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class MixedPlan:
    """The chosen bits of every unit and what they cost."""

    units: tuple[Unit, ...]
    high_units: frozenset[str]
    """Names of the units stored as int8; the others are int4."""
    config: MixedConfig
    average_bits: float
    """Achieved: stored bits of all units over their weights."""
    min_average_bits: float
    """All units at int4."""
    max_average_bits: float
    """All units at int8."""

    @property
    def module_configs(self) -> dict[str, QuantConfig]:
        """The units stored otherwise than ``config.low``, for :class:`trident.quant.format.QuantizedModules`."""
        return {u.name: self.config.high for u in self.units if u.name in self.high_units}

    def bits_of(self, name: str) -> int:
        return 8 if name in self.high_units else 4

    def as_dict(self) -> dict:
        return {"average_bits_budget": self.config.average_bits, "average_bits": self.average_bits,
                "min_average_bits": self.min_average_bits, "max_average_bits": self.max_average_bits,
                "low": _config_dict(self.config.low), "high": _config_dict(self.config.high),
                "num_units": len(self.units), "num_high_units": len(self.high_units),
                "units": [{**asdict(u), "bits": self.bits_of(u.name),
                           "extra_bits": stored_bits(u.out_features, u.in_features, self.config.high)
                           - stored_bits(u.out_features, u.in_features, self.config.low)} for u in self.units]}


def _config_dict(config: QuantConfig) -> dict:
    return {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric}


def average_bits_range(shapes: Sequence[tuple[int, int]], config: MixedConfig) -> tuple[float, float]:
    """(all int4, all int8) average bits of weights of these (out_features, in_features) shapes."""
    weights = sum(n * k for n, k in shapes)
    if not weights:
        raise TridentError("mixed bits need at least one module to quantize")
    return (sum(stored_bits(n, k, config.low) for n, k in shapes) / weights,
            sum(stored_bits(n, k, config.high) for n, k in shapes) / weights)


def check_budget(shapes: Sequence[tuple[int, int]], config: MixedConfig) -> None:
    """A TridentError unless ``config.average_bits`` lies between the all-int4 and the all-int8 cost."""
    low, high = average_bits_range(shapes, config)
    budget = config.average_bits
    if budget < low or budget > high:
        side = "below the all-int4" if budget < low else "above the all-int8"
        raise TridentError(f"--avg-bits {budget:g} is {side} cost of these modules: int4 ({_describe(config.low)}) "
                           f"takes {low:.4f} bits per weight with its scales and zero points, int8 "
                           f"({_describe(config.high)}) {high:.4f}; choose --avg-bits in "
                           f"[{math.ceil(low * 1e4) / 1e4:.4f}, {math.floor(high * 1e4) / 1e4:.4f}] (or --bits 4 / "
                           "--bits 8 for one width)")


def _describe(config: QuantConfig) -> str:
    groups = f"groups of {config.group_size}" if config.group_size else "per channel"
    return f"{groups}, {'symmetric' if config.symmetric else 'asymmetric'}"


def choose_bits(units: Sequence[Unit], config: MixedConfig) -> MixedPlan:
    """int4 or int8 for each unit under ``config.average_bits`` (see the module docstring for the rule)."""
    shapes = [(u.out_features, u.in_features) for u in units]
    check_budget(shapes, config)
    low_avg, high_avg = average_bits_range(shapes, config)
    weights = sum(u.num_weights for u in units)
    low = [stored_bits(u.out_features, u.in_features, config.low) for u in units]
    extra = [stored_bits(u.out_features, u.in_features, config.high) - b for u, b in zip(units, low)]
    left = config.average_bits * weights * (1 + 1e-12) - sum(low)  # the budget's float rounding, no more
    order = sorted(range(len(units)), key=lambda i: (-units[i].sensitivity / extra[i], i))
    high: set[str] = set()
    total = sum(low)
    for i in order:
        if extra[i] <= left:
            high.add(units[i].name)
            left -= extra[i]
            total += extra[i]
    return MixedPlan(units=tuple(units), high_units=frozenset(high), config=config, average_bits=total / weights,
                     min_average_bits=low_avg, max_average_bits=high_avg)


class _Replay(nn.Module):
    """Stands in for a decoder layer before the one being measured: its inputs are those of the baseline run, so
    it returns the outputs it gave then (copies: a later layer may update its inputs in place), call by call."""

    def __init__(self, outputs: list) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


@torch.no_grad()
def measure_sensitivities(model: nn.Module, names: Sequence[str], config: QuantConfig, loss: Callable[[], float],
                          quantizer: ModuleQuantizer = rtn_quantizer, layers: Sequence[str] = (),
                          progress: Callable[[str], None] | None = None) -> tuple[float, list[Unit]]:
    """(the loss of ``model`` as it is, one :class:`Unit` per name): each module in turn quantized with
    ``quantizer(name, layer, config)`` while every other stays as it is, ``loss()`` measured, the module put back.
    ``progress(name)`` is called after each.

    ``layers``: the names of the decoder layers in order (``model.layers.0``, ...), to save time: while a module of
    layer i is measured, layers 0..i-1 replay the outputs they gave in the baseline run instead of computing them
    again (same inputs, same outputs). ``loss()`` must then run the same forwards in the same order every call.
    """
    outputs: dict[str, list] = {layer: [] for layer in layers}
    hooks = [model.get_submodule(layer).register_forward_hook(
        lambda _module, _args, out, layer=layer: outputs[layer].append(
            tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone())) for layer in layers]
    try:
        baseline = loss()
    finally:
        for hook in hooks:
            hook.remove()
    units = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, Linear):
            raise TridentError(f"{name} is not a float linear layer of the model; measure before quantizing")
        owner = next((i for i, prefix in enumerate(layers) if name.startswith(prefix + ".")), 0)
        replayed = {prefix: model.get_submodule(prefix) for prefix in layers[:owner]}
        replace_module(model, name, quantizer(name, layer, config))
        try:
            for prefix in replayed:
                replace_module(model, prefix, _Replay(outputs[prefix]))
            value = loss()
        finally:
            replace_module(model, name, layer)
            for prefix, original in replayed.items():
                replace_module(model, prefix, original)
        units.append(Unit(name, layer.out_features, layer.in_features, value - baseline))
        if progress is not None:
            progress(name)
    return baseline, units


def decoder_layer_names(model: nn.Module) -> list[str]:
    """The names of the model's decoder layers in order (the children of ``model.layers``), or [] if it has none
    there."""
    try:
        layers = model.get_submodule("model.layers")
    except AttributeError:
        return []
    return [f"model.layers.{i}" for i in range(len(layers))] if isinstance(layers, nn.ModuleList) else []
