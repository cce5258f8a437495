"""How quantized layers split over tensor-parallel ranks: slices of their stored codes, scales and zero points that
are exactly the unsplit layer's rows, input features or experts (nothing is requantized).

- Output features (a column-parallel QuantizedLinear's rows, an experts module's gate|up rows): every stored tensor
  is cut by rows alike, in any format (:func:`quantized_rows`).
- Input features (K: a row-parallel QuantizedLinear, the experts' down): int8 codes by columns, packed int4 codes by
  bytes (two codes a byte along K, so a slice starts and ends on an even feature), and the scales and zero points of
  a grouped format by groups, so a slice holds whole groups; a per-channel scale applies to every feature of its
  row and stays whole (:func:`quantized_columns`). :func:`check_columns` raises a TridentError, before anything is
  cut, when some rank's features would not cut so.
- Whole experts (expert parallelism): the leading axis of every tensor (:func:`quantized_whole_experts`).

The slices are copies (``take``), so the full tensors can be freed; a QuantizedLinear slice is a plain
QuantizedLinear (what looks for quantized layers, such as the batch-1 CUDA product that takes the norm, finds it),
which derives its kernel layouts and its CUDA offsets again on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

from trident.distributed.layers import Ranges, take
from trident.errors import TridentError
from trident.moe.quant import QuantizedExpertWeight, QuantizedFusedExperts
from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantizedWeight


def describe_format(bits: int, group_size: int | None) -> str:
    """``int8 per channel``, ``int4 in groups of 32``."""
    return f"int{bits} " + ("per channel" if group_size is None else f"in groups of {group_size}")


def columns_error(bits: int, group_size: int | None, start: int, length: int) -> str | None:
    """Why input features ``start : start + length`` of a weight of ``bits`` in groups of ``group_size`` along K
    (None: per channel) cannot be cut from its stored tensors; None when they can."""
    features = f"input features {start}..{start + length - 1}"
    if group_size is not None and (start % group_size or length % group_size):
        return f"{features}, not whole quantization groups of {group_size}"
    if bits == 4 and (start % 2 or length % 2):
        return f"{features}, which cut int4 bytes (two codes a byte along K)"
    return None


def check_columns(path: str, bits: int, group_size: int | None, ranges: Sequence[tuple[int, int]]) -> None:
    """Raise a TridentError unless each rank's input features (``ranges``: (start, length) of rank 0, 1, ...) can
    be cut from the stored weight of ``path`` (``bits``, groups of ``group_size`` along K, None per channel)."""
    size = len(ranges)
    for rank, (start, length) in enumerate(ranges):
        why = columns_error(bits, group_size, start, length)
        if why is None:
            continue
        fix = (f"quantize it with a group size that divides {length} (or per channel), or use another "
               "--tensor-parallel size" if group_size is not None and length % group_size
               else "use a --tensor-parallel size that gives every rank whole groups and an even number of features")
        raise TridentError(f"{path} ({describe_format(bits, group_size)}) does not split over --tensor-parallel "
                           f"{size}: rank {rank} would hold its {why}; {fix}")


def _codes_range(bits: int, start: int, length: int) -> tuple[int, int]:
    """The range of stored code columns (int8) or bytes (packed int4) holding input features start:start+length."""
    return (start // 2, length // 2) if bits == 4 else (start, length)


def quantized_rows(full: QuantizedLinear, ranges: Ranges) -> QuantizedLinear:
    """The rows ``ranges`` of ``full`` (codes, scales, zero points and bias), in that order: a column-parallel
    slice, in any format."""
    q = full.quantized
    sliced = QuantizedWeight(take(q.qweight, ranges), take(q.scales, ranges),
                             None if q.zeros is None else take(q.zeros, ranges))
    bias = None if full.bias is None else take(full.bias.detach(), ranges)
    return QuantizedLinear(full.in_features, sum(length for _, length in ranges), full.config, sliced, bias)


def quantized_columns(full: QuantizedLinear, start: int, length: int) -> QuantizedLinear:
    """Input features ``start : start + length`` of ``full`` without its bias (a row-parallel slice: the bias is
    added once, after the ranks' sum); a TridentError where they do not cut (:func:`columns_error`)."""
    config = full.config
    why = columns_error(config.bits, config.group_size, start, length)
    if why is not None:
        raise TridentError(f"an {describe_format(config.bits, config.group_size)} layer cannot be cut at its {why}")
    q = full.quantized
    qweight = take(q.qweight, (_codes_range(config.bits, start, length),), dim=1)
    if config.group_size is None:  # one scale (and zero point) per row, for every input feature
        scales, zeros = q.scales.clone(), None if q.zeros is None else q.zeros.clone()
    else:
        groups = ((start // config.group_size, length // config.group_size),)
        scales, zeros = take(q.scales, groups, dim=1), None if q.zeros is None else take(q.zeros, groups, dim=1)
    return QuantizedLinear(length, full.out_features, config, QuantizedWeight(qweight, scales, zeros))


def experts_down_group_size(experts: QuantizedFusedExperts) -> int | None:
    """The group length of the experts' down along the intermediate features (None: per channel: int8, or int4
    with one scale per row)."""
    if experts.bits == 8 or experts.down_scales.shape[-1] == 1:
        return None
    return experts.group_sizes[1]


def check_expert_columns(path: str, experts: QuantizedFusedExperts, ranges: Sequence[tuple[int, int]]) -> None:
    """:func:`check_columns` for the intermediate features of every expert's down."""
    check_columns(f"{path} (down)", experts.bits, experts_down_group_size(experts), ranges)


def _experts(full: QuantizedFusedExperts, num_experts: int, intermediate_size: int,
             gate_up: QuantizedExpertWeight, down: QuantizedExpertWeight) -> QuantizedFusedExperts:
    return QuantizedFusedExperts(num_experts, full.down_qweight.shape[1], intermediate_size, full.activation,
                                 full.backend, gate_up, down)


def quantized_expert_features(full: QuantizedFusedExperts, start: int, local: int) -> QuantizedFusedExperts:
    """Every expert's intermediate features ``start : start + local`` (tensor parallelism): gate_up's rows of those
    gate and up features (codes and scales), down's input features (:func:`quantized_columns`' rule)."""
    bits, group = full.bits, experts_down_group_size(full)
    why = columns_error(bits, group, start, local)
    if why is not None:
        raise TridentError(f"{describe_format(bits, group)} experts cannot be cut at their down's {why}")
    rows = ((start, local), (full.intermediate_size + start, local))
    gate_up = QuantizedExpertWeight(take(full.gate_up_qweight, rows, dim=1), take(full.gate_up_scales, rows, dim=1))
    codes = take(full.down_qweight, (_codes_range(bits, start, local),), dim=2)
    scales = (full.down_scales.clone() if group is None
              else take(full.down_scales, ((start // group, local // group),), dim=2))
    return _experts(full, full.num_experts, local, gate_up, QuantizedExpertWeight(codes, scales))


def quantized_whole_experts(full: QuantizedFusedExperts, first: int, count: int) -> QuantizedFusedExperts:
    """Experts ``first : first + count`` of ``full``, whole (expert parallelism)."""
    def kept(name: str):
        return getattr(full, name)[first: first + count].clone()

    return _experts(full, count, full.intermediate_size,
                    QuantizedExpertWeight(kept("gate_up_qweight"), kept("gate_up_scales")),
                    QuantizedExpertWeight(kept("down_qweight"), kept("down_scales")))
