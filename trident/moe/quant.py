"""int8 routed experts: the format, its round-to-nearest quantization and dequantization, and the module that holds
a layer's experts that way.

Format (per layer; names as a quantized folder stores them, under the experts module, e.g.
``model.layers.0.mlp.experts``):

- ``gate_up_qweight`` int8 [E, 2I, H] and ``gate_up_scales`` float32 [E, 2I]: each expert's gate rows, then its up
  rows, as :class:`~trident.moe.experts.FusedExperts`' ``gate_up_proj``;
- ``down_qweight`` int8 [E, H, I] and ``down_scales`` float32 [E, H].

Symmetric, one scale per expert and output row (per output channel), no zero point:
``w[e, n, k] = scales[e, n] * qweight[e, n, k]``, codes in -127..127 with ``scales = absmax / 127`` of the row.
This is :mod:`trident.quant.rtn`'s int8 per-channel symmetric format (its :func:`~trident.quant.rtn.quantize`
does the rounding) with the experts' leading axis kept: every element satisfies ``|w - deq(w)| <= scale / 2``.
Half the bytes of bfloat16 (plus 4 bytes of scale per row: 0.5% at Qwen3-30B-A3B's 2048 / 768 columns).

The fused kernels (trident/kernels/moe_experts.py) multiply the codes converted to the activations' dtype (exact)
and apply the scales to their float32 accumulators; :class:`~trident.moe.experts.TorchExperts` dequantizes the
active experts (the reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from trident.models import ops
from trident.quant.rtn import QuantConfig, quantize

EXPERT_QUANT = QuantConfig(bits=8)
"""How routed experts are quantized: int8, per output channel, symmetric."""
EXPERT_TENSORS = ("gate_up_qweight", "gate_up_scales", "down_qweight", "down_scales")
"""The tensors of a quantized experts module, by the names it (and a quantized folder, under its name) holds."""
QUANTIZE_CHUNK = 8
"""Experts quantized at a time (bounds the float32 copies rounding takes: 8 of Qwen3-30B-A3B's are 50 MB)."""


class QuantizedExpertWeight(NamedTuple):
    """One fused expert tensor as int8: ``codes`` [E, N, K], ``scales`` float32 [E, N]."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantize_experts(weight: torch.Tensor) -> QuantizedExpertWeight:
    """Round-to-nearest int8 codes of ``weight`` [E, N, K] (any float dtype, computed in float32 on its device),
    one symmetric scale per expert and row."""
    if weight.dim() != 3:
        raise ValueError(f"quantize_experts expects a fused [E, N, K] tensor, got shape {tuple(weight.shape)}")
    num_experts, n, k = weight.shape
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((num_experts, n), dtype=torch.float32, device=weight.device)
    for start in range(0, num_experts, QUANTIZE_CHUNK):
        end = min(start + QUANTIZE_CHUNK, num_experts)
        q = quantize(weight[start:end].reshape(-1, k), EXPERT_QUANT)
        codes[start:end] = q.qweight.view(end - start, n, k)
        scales[start:end] = q.scales.view(end - start, n)
    return QuantizedExpertWeight(codes, scales)


def dequantize_experts(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., N, K] * scales [..., N] in ``dtype``, computed in float32 (float64 for float64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(compute) * scales.to(compute)[..., None]).to(dtype)


def expert_weight_bytes(named_tensors) -> int:
    """Bytes of every tensor among ``named_tensors`` (name, tensor) that holds routed experts: the fused float
    tensors (``experts.gate_up_proj`` / ``down_proj``) or the int8 codes and their scales."""
    suffixes = ("experts.gate_up_proj", "experts.down_proj", *(f"experts.{name}" for name in EXPERT_TENSORS))
    return sum(t.numel() * t.element_size() for name, t in named_tensors if name.endswith(suffixes))


class QuantizedFusedExperts(nn.Module):
    """The routed experts of one layer as int8 codes and float32 scales (buffers named as :data:`EXPERT_TENSORS`;
    the format: the module docstring), run through the same backend as :class:`~trident.moe.experts.FusedExperts`
    with the scales passed along."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str, backend,
                 gate_up: QuantizedExpertWeight, down: QuantizedExpertWeight) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.activation = ops.check_activation(activation)
        self.backend = backend
        expected = {"gate_up_qweight": ((num_experts, 2 * intermediate_size, hidden_size), torch.int8),
                    "gate_up_scales": ((num_experts, 2 * intermediate_size), torch.float32),
                    "down_qweight": ((num_experts, hidden_size, intermediate_size), torch.int8),
                    "down_scales": ((num_experts, hidden_size), torch.float32)}
        for name, t in zip(EXPERT_TENSORS, (*gate_up, *down)):
            shape, dtype = expected[name]
            if (tuple(t.shape), t.dtype) != (shape, dtype):
                from trident.errors import TridentError

                raise TridentError(f"experts' {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}: the "
                                   "checkpoint does not match its config")
            self.register_buffer(name, t.contiguous())

    @classmethod
    def from_float(cls, experts: nn.Module) -> QuantizedFusedExperts:
        """The int8 twin of a :class:`~trident.moe.experts.FusedExperts` (same backend), quantized where its
        weights lie."""
        hidden_size = experts.gate_up_proj.shape[2]
        return cls(experts.num_experts, hidden_size, experts.intermediate_size, experts.activation, experts.backend,
                   quantize_experts(experts.gate_up_proj), quantize_experts(experts.down_proj))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) in ``dtype``."""
        return (dequantize_experts(self.gate_up_qweight, self.gate_up_scales, dtype),
                dequantize_experts(self.down_qweight, self.down_scales, dtype))

    def storage_bytes(self) -> int:
        """Bytes of the codes and scales."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in EXPERT_TENSORS)

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(hidden, weights, expert_ids, self.gate_up_qweight, self.down_qweight,
                                    self.activation, gate_up_scales=self.gate_up_scales,
                                    down_scales=self.down_scales)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_qweight.shape
        return f"num_experts={e}, hidden_size={h}, intermediate_size={two_i // 2}, int8 per channel"


def quantize_model_experts(model: nn.Module) -> list[str]:
    """Replace every :class:`~trident.moe.experts.FusedExperts` of ``model`` by its int8 twin, in place, where
    its weights lie; returns the replaced modules' names in model order (empty for a dense model)."""
    from trident.moe.experts import FusedExperts
    from trident.quant.linear import replace_module

    names = [name for name, module in model.named_modules() if isinstance(module, FusedExperts)]
    for name in names:
        replace_module(model, name, QuantizedFusedExperts.from_float(model.get_submodule(name)))
    return names


def experts_sources(module_name: str, names, renames) -> dict[str, list[tuple[int, str, str]]]:
    """The checkpoint tensors (Hugging Face names among ``names``) that fill experts module ``module_name``
    (trident's name), for each fused tensor (``gate_up_proj``, ``down_proj``): [(expert, part, name)] of
    per-expert matrices (expert -1 and part "" for a tensor already fused). ``renames``: the model's checkpoint
    name fragment -> its own (as load_weights applies them)."""
    from trident.models.weights import _EXPERT_NAME

    found: dict[str, list[tuple[int, str, str]]] = {}
    for name in names:
        ours = name
        for old, new in (renames or {}).items():
            ours = ours.replace(old, new)
        if ours in (f"{module_name}.gate_up_proj", f"{module_name}.down_proj"):
            found.setdefault(ours.rpartition(".")[2], []).append((-1, "", name))
            continue
        match = _EXPERT_NAME.match(ours)
        if match is not None and match.group(1) == module_name:
            found.setdefault("experts", []).append((int(match.group(2)), match.group(3), name))
    return found


def fused_expert_tensors(tensors, module_name: str, num_experts: int, part_names: tuple[str, str, str], renames,
                         pop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, H], down [E, H, I]) of experts module ``module_name`` from a checkpoint's ``tensors``
    (fused, or per-expert matrices stacked: ``part_names`` = the gate, up and down parts' names), removed from
    ``tensors`` when ``pop``. A missing expert matrix is a TridentError."""
    from trident.errors import TridentError

    sources = experts_sources(module_name, list(tensors), renames)
    take = tensors.pop if pop else tensors.__getitem__
    if "gate_up_proj" in sources and "down_proj" in sources:
        return take(sources["gate_up_proj"][0][2]), take(sources["down_proj"][0][2])
    by_part = {(e, part): name for e, part, name in sources.get("experts", [])}
    gate, up, down = part_names
    missing = [f"{module_name}.{e}.{p}.weight" for e in range(num_experts) for p in part_names
               if (e, p) not in by_part]
    if missing:
        raise TridentError(f"the checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                           f"cannot quantize the experts of {module_name}")
    gate_up = torch.stack([torch.cat((take(by_part[e, gate]), take(by_part[e, up]))) for e in range(num_experts)])
    down_t = torch.stack([take(by_part[e, down]) for e in range(num_experts)])
    return gate_up, down_t
