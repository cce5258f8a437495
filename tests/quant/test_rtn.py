"""Round-to-nearest quantization: the analytic error bound against float64, code ranges, int4 packing."""

from __future__ import annotations

import pytest
import torch

from trident.errors import TridentError
from trident.quant.rtn import QuantConfig, dequantize, pack_int4, quantize, unpack_int4

CONFIGS = [QuantConfig(bits=b, group_size=g, symmetric=s) for b in (8, 4) for g in (None, 32, 64, 128)
           for s in (True, False)]


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 3] = 1.5  # an outlier
    w[1] = w[1].abs() + 0.01  # an all-positive row: the asymmetric range must still contain 0
    w[2] = 0.0  # an all-zero row
    return w


def _id(c: QuantConfig) -> str:
    return f"int{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}"


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_error_within_half_a_step_in_float64(config: QuantConfig) -> None:
    w = _weight(24, 256, seed=config.bits + (config.group_size or 0))
    q = quantize(w, config)
    group = config.group_size or w.shape[1]
    assert q.scales.dtype == torch.float32 and q.scales.shape == (24, 256 // group)
    assert (q.zeros is None) == config.symmetric
    deq = dequantize(q, config, torch.float64)
    step = q.scales.to(torch.float64).repeat_interleave(group, dim=1)
    err = (w.to(torch.float64) - deq).abs()
    assert bool((err <= step / 2 * (1 + 1e-6) + 1e-12).all()), float((err / step).max())
    assert float(deq[2].abs().max()) == 0.0  # zeros stay exactly zero
    if config.symmetric:  # the largest magnitude of every group is exact up to float32 rounding
        assert float((deq - w.double()).abs()[0, 3]) < 1e-6
    # the stored codes span the documented ranges
    codes = unpack_int4(q.qweight) if config.bits == 4 else q.qweight.to(torch.int32)
    if config.bits == 8:
        assert q.qweight.dtype == torch.int8
        if not config.symmetric:
            codes = codes + 128  # stored as int8 code - 128
    lo, hi = ((1, 15) if config.bits == 4 else (-127, 127)) if config.symmetric else (0, 2 ** config.bits - 1)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert int(codes.max()) == hi or int(codes.min()) == lo  # the range is used to its end


def test_dequantize_in_float32_equals_float64_rounded() -> None:
    config = QuantConfig(bits=4, group_size=32, symmetric=False)
    q = quantize(_weight(8, 64, 0), config)
    assert torch.equal(dequantize(q, config, torch.float32), dequantize(q, config, torch.float64).float())


def test_int4_is_coarser_than_int8_and_groups_help() -> None:
    w = _weight(32, 256, seed=1)

    def error(config: QuantConfig) -> float:
        return float(torch.linalg.norm(w - dequantize(quantize(w, config), config)) / torch.linalg.norm(w))

    assert error(QuantConfig(bits=8)) < error(QuantConfig(bits=4, group_size=32)) < error(QuantConfig(bits=4))


def test_group_must_divide_k() -> None:
    with pytest.raises(TridentError, match="not a multiple of the group size 128.*64"):
        quantize(torch.randn(4, 192), QuantConfig(bits=4, group_size=128))
    with pytest.raises(TridentError, match="even K"):
        quantize(torch.randn(4, 7), QuantConfig(bits=4))
    quantize(torch.randn(4, 7), QuantConfig(bits=8))  # int8 per channel takes any K


@pytest.mark.parametrize("kwargs, message", [({"bits": 3}, "bits must be one of"),
                                             ({"group_size": 48}, "group size must be one of"),
                                             ({"symmetric": 1}, "symmetric must be"),
                                             ({"modules": ()}, "modules must be")])
def test_invalid_config(kwargs: dict, message: str) -> None:
    with pytest.raises(TridentError, match=message):
        QuantConfig(**kwargs)


def test_int4_packing_round_trips_and_nibble_order() -> None:
    codes = torch.randint(0, 16, (5, 34), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 17)
    assert torch.equal(unpack_int4(packed), codes.to(torch.int32))
    assert pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]  # element 2j low, 2j+1 high
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[16, 0]]))
