"""Quantized routed experts: the formats (int8 per channel, int4 in groups), their round-to-nearest quantization
and dequantization, and the module that holds a layer's experts that way.

Format (per layer; names as a quantized folder stores them, under the experts module, e.g.
``model.layers.0.mlp.experts``), each expert's gate rows then its up rows as :class:`~trident.moe.experts.
FusedExperts`' ``gate_up_proj``:

- int8, one scale per expert and output row (per channel): ``gate_up_qweight`` int8 [E, 2I, H],
  ``gate_up_scales`` float32 [E, 2I]; ``down_qweight`` int8 [E, H, I], ``down_scales`` float32 [E, H];
  ``w[e, n, k] = scales[e, n] * qweight[e, n, k]``, codes in -127..127 with ``scales = absmax / 127`` of the row.
  Half the bytes of bfloat16 (plus 4 bytes of scale per row: 0.5% at Qwen3-30B-A3B's 2048 / 768 columns).
- int4, one scale per expert, output row and group of G consecutive inputs: ``gate_up_qweight`` uint8
  [E, 2I, H / 2] (two codes a byte along K: element 2j in the low nibble, as :func:`trident.quant.rtn.pack_int4`),
  ``gate_up_scales`` float32 [E, 2I, H / G]; ``down_qweight`` uint8 [E, H, I / 2], ``down_scales`` float32
  [E, H, I / G]; codes in -7..7 stored as ``q + 8``, ``w = scales[e, n, k // G] * (stored - 8)``, with
  ``scales = absmax / 7`` of the group. A quarter of bfloat16's bytes plus 4 bytes per group (0.25 bits a weight at
  G = 128).

The codes' dtype tells the two apart (int8 or uint8). Both are :mod:`trident.quant.rtn`'s symmetric formats (its
:func:`~trident.quant.rtn.quantize` does the rounding) with the experts' leading axis kept: every element satisfies
``|w - deq(w)| <= scale / 2``.

The fused kernels (trident/kernels/moe_experts.py) multiply the codes converted to the activations' dtype (exact)
and apply the scales to their float32 accumulators; :class:`~trident.moe.experts.TorchExperts` dequantizes the
active experts (the reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from trident.errors import TridentError
from trident.models import ops
from trident.quant.rtn import INT4_ZERO_POINT, QuantConfig, quantize, unpack_int4

EXPERT_BITS = (8, 4)
"""Bits routed experts may be quantized to."""
EXPERT_TENSORS = ("gate_up_qweight", "gate_up_scales", "down_qweight", "down_scales")
"""The tensors of a quantized experts module, by the names it (and a quantized folder, under its name) holds."""
QUANTIZE_CHUNK = 8
"""Experts quantized at a time (bounds the float32 copies rounding takes: 8 of Qwen3-30B-A3B's are 50 MB)."""


class QuantizedExpertWeight(NamedTuple):
    """One fused expert tensor [E, N, K] as codes and float32 scales: int8 ``codes`` [E, N, K] with ``scales``
    [E, N], or packed int4 ``codes`` uint8 [E, N, K / 2] with ``scales`` [E, N, K / G]."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def bits(self) -> int:
        return expert_bits(self.codes)


def expert_bits(codes: torch.Tensor) -> int:
    """8 for int8 expert codes, 4 for packed int4 ones (uint8)."""
    if codes.dtype == torch.int8:
        return 8
    if codes.dtype == torch.uint8:
        return 4
    raise TridentError(f"expert codes are int8 (int8 experts) or uint8 (packed int4), got {codes.dtype}")


def expert_quant_config(bits: int, group_size: int | None) -> QuantConfig:
    """The round-to-nearest config of quantized experts: symmetric; int8 per channel, int4 per channel or in groups
    of ``group_size`` along K."""
    if bits not in EXPERT_BITS:
        raise TridentError(f"routed experts are quantized to {' or '.join(map(str, EXPERT_BITS))} bits, got {bits}")
    if bits == 8 and group_size is not None:
        raise TridentError("int8 experts are per channel (one scale per row): no group size")
    return QuantConfig(bits=bits, group_size=group_size)


def experts_group_size(config: QuantConfig) -> int | None:
    """The group length routed experts take when a model's Linear layers are quantized with ``config`` and the
    experts have no format of their own: int8 experts are per channel (None) whatever its groups; int4 ones take its
    group size (None: per channel). Read the experts' format through ``QuantizedModules.experts_format``."""
    return None if config.bits == 8 else config.group_size


def experts_config_of(config: QuantConfig, bits: int, group_size: int | None) -> QuantConfig | None:
    """``QuantizedModules.experts_config`` for routed experts quantized to ``bits`` beside Linear layers quantized
    with ``config``: int8 per channel (``group_size`` ignored), int4 in groups of ``group_size`` (None: per channel);
    None when that is the format ``config`` implies (:func:`experts_group_size`), so that such a checkpoint's
    quantization_config reads as before experts had a format of their own."""
    experts = expert_quant_config(bits, group_size if bits == 4 else None)
    return None if experts == expert_quant_config(config.bits, experts_group_size(config)) else experts


def quantize_experts(weight: torch.Tensor, bits: int = 8, group_size: int | None = None) -> QuantizedExpertWeight:
    """Round-to-nearest codes of ``weight`` [E, N, K] (any float dtype, computed in float32 on its device), symmetric:
    int8 with one scale per expert and row, or int4 with one per expert, row and group of ``group_size`` along K
    (None: the whole row)."""
    if weight.dim() != 3:
        raise ValueError(f"quantize_experts expects a fused [E, N, K] tensor, got shape {tuple(weight.shape)}")
    config = expert_quant_config(bits, group_size)
    num_experts, n, k = weight.shape
    groups = 1 if group_size is None else k // group_size
    codes = torch.empty((num_experts, n, k if bits == 8 else k // 2), dtype=torch.int8 if bits == 8 else torch.uint8,
                        device=weight.device)
    scales = torch.empty((num_experts, n) if bits == 8 else (num_experts, n, groups), dtype=torch.float32,
                         device=weight.device)
    for start in range(0, num_experts, QUANTIZE_CHUNK):
        end = min(start + QUANTIZE_CHUNK, num_experts)
        q = quantize(weight[start:end].reshape(-1, k), config)
        codes[start:end] = q.qweight.view(end - start, n, -1)
        scales[start:end] = q.scales.view(scales[start:end].shape)
    return QuantizedExpertWeight(codes, scales)


def quantized_experts_bytes(num_experts: int, n: int, k: int, bits: int, group_size: int | None) -> int:
    """Bytes of a fused [E, N, K] expert tensor's codes and float32 scales in the format (``group_size`` None: per
    channel)."""
    groups = 1 if group_size is None else k // group_size
    return num_experts * n * (k * bits // 8 + 4 * groups)


def dequantize_experts(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights [..., N, K] that int8 ``codes`` [..., N, K] and ``scales`` [..., N], or packed int4 ``codes``
    [..., N, K / 2] and ``scales`` [..., N, G], stand for, in ``dtype`` (computed in float32, float64 for float64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if expert_bits(codes) == 8:
        return (codes.to(compute) * scales.to(compute)[..., None]).to(dtype)
    values = (unpack_int4(codes) - INT4_ZERO_POINT).to(compute)
    *lead, k = values.shape
    groups = scales.shape[-1]
    grouped = values.reshape(*lead, groups, k // groups) * scales.to(compute)[..., None]
    return grouped.reshape(*lead, k).to(dtype)


def expert_weight_bytes(named_tensors) -> int:
    """Bytes of every tensor among ``named_tensors`` (name, tensor) that holds routed experts: the fused float
    tensors (``experts.gate_up_proj`` / ``down_proj``) or the codes and their scales."""
    suffixes = ("experts.gate_up_proj", "experts.down_proj", *(f"experts.{name}" for name in EXPERT_TENSORS))
    return sum(t.numel() * t.element_size() for name, t in named_tensors if name.endswith(suffixes))


def expert_layout(bits: int, num_experts: int, n: int, k: int, groups: int
                     ) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype]]:
    """((codes' shape, dtype), (scales' shape, dtype)) of a fused [E, N, K] expert tensor in the format."""
    if bits == 8:
        return ((num_experts, n, k), torch.int8), ((num_experts, n), torch.float32)
    return ((num_experts, n, k // 2), torch.uint8), ((num_experts, n, groups), torch.float32)


class QuantizedFusedExperts(nn.Module):
    """The routed experts of one layer as int8 or int4 codes and float32 scales (buffers named as
    :data:`EXPERT_TENSORS`; the formats: the module docstring), run through the same backend as
    :class:`~trident.moe.experts.FusedExperts` with the scales passed along."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str, backend,
                 gate_up: QuantizedExpertWeight, down: QuantizedExpertWeight) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.activation = ops.check_activation(activation)
        self.backend = backend
        bits = expert_bits(gate_up.codes)
        int4 = bits == 4
        gate_up_groups = gate_up.scales.shape[-1] if int4 and gate_up.scales.dim() == 3 else 1
        down_groups = down.scales.shape[-1] if int4 and down.scales.dim() == 3 else 1
        expected = dict(zip(EXPERT_TENSORS, (
            *expert_layout(bits, num_experts, 2 * intermediate_size, hidden_size, gate_up_groups),
            *expert_layout(bits, num_experts, hidden_size, intermediate_size, down_groups))))
        for name, t in zip(EXPERT_TENSORS, (*gate_up, *down)):
            shape, dtype = expected[name]
            if (tuple(t.shape), t.dtype) != (shape, dtype):
                raise TridentError(f"experts' {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}: the "
                                   "checkpoint does not match its config")
            self.register_buffer(name, t.contiguous())
        for name, k, groups in (("gate_up", hidden_size, gate_up_groups), ("down", intermediate_size, down_groups)):
            if k % groups:
                raise TridentError(f"experts' {name}_scales has {groups} groups, which do not divide K = {k}")

    @property
    def bits(self) -> int:
        """8 or 4 (from the codes' dtype)."""
        return expert_bits(self.gate_up_qweight)

    @property
    def group_sizes(self) -> tuple[int, int] | None:
        """int4: the group lengths along K of gate_up and down (None for int8)."""
        if self.bits == 8:
            return None
        hidden_size, intermediate_size = self.down_qweight.shape[1], self.intermediate_size
        return hidden_size // self.gate_up_scales.shape[2], intermediate_size // self.down_scales.shape[2]

    @classmethod
    def from_float(cls, experts: nn.Module, bits: int = 8, group_size: int | None = None) -> QuantizedFusedExperts:
        """The quantized twin (``bits``, int4 in groups of ``group_size``) of a
        :class:`~trident.moe.experts.FusedExperts` (same backend), quantized where its weights lie."""
        hidden_size = experts.gate_up_proj.shape[2]
        return cls(experts.num_experts, hidden_size, experts.intermediate_size, experts.activation, experts.backend,
                   quantize_experts(experts.gate_up_proj, bits, group_size),
                   quantize_experts(experts.down_proj, bits, group_size))

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
        e, two_i, _ = self.gate_up_qweight.shape
        h = self.down_qweight.shape[1]
        fmt = "int8 per channel" if self.bits == 8 else "int4 in groups of {} / {}".format(*self.group_sizes)
        return f"num_experts={e}, hidden_size={h}, intermediate_size={two_i // 2}, {fmt}"


def quantize_model_experts(model: nn.Module, bits: int = 8, group_size: int | None = None) -> list[str]:
    """Replace every :class:`~trident.moe.experts.FusedExperts` of ``model`` by its quantized twin (``bits``; int4
    in groups of ``group_size``, None: per channel), in place, where its weights lie; returns the replaced modules'
    names in model order (empty for a dense model)."""
    from trident.quant.linear import replace_module

    names = experts_module_names(model)
    for name in names:
        replace_module(model, name, QuantizedFusedExperts.from_float(model.get_submodule(name), bits, group_size))
    return names


def experts_module_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s float experts modules (:class:`~trident.moe.experts.FusedExperts`), in model order
    (empty for a dense model)."""
    from trident.moe.experts import FusedExperts

    return [name for name, module in model.named_modules() if isinstance(module, FusedExperts)]


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
