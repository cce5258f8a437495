"""int8 / fp8 KV caches in the reference backend (TorchAttention) and the quantization math
(``trident.quant.kv``).

Each step writes keys/values through the backend (quantized on write) and attends; the output must equal a
float64 attention, computed here from scratch, over the keys/values the cache holds (its codes times its scales,
in float64: the dequantized-exact expectation), and stay within a documented tolerance of the float64 attention
over the original keys/values (the float path). Steps: GQA ratios 1, 2 and 4, chunks ending on, before and after
block boundaries, prefill chunks after prefix-cached context, decode batches, sliding windows, soft-capping.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from trident.attention.base import AttentionMetadata
from trident.attention.cache_spec import KVCacheSpec
from trident.attention.torch_ref import TorchAttention
from trident.config import CacheConfig
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.errors import TridentError
from trident.quant.kv import dequantize_kv, kv_cache_format, quantize_kv

CPU = torch.device("cpu")
FLOAT_PATH_TOLERANCE = {"int8": 2e-2, "fp8": 8e-2}
"""||out - float attention|| / ||float attention|| on unit-normal keys/values and peaked softmaxes: int8's step
is absmax / 127 per (token, head); e4m3 keeps 3 mantissa bits (relative error up to 2^-4 per element)."""


# -- quantization math --------------------------------------------------------------------------------------

def test_int8_codes_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g, dtype=torch.float64) * torch.logspace(-6, 6, 50, dtype=torch.float64)[
        :, None, None]
    codes, scale = quantize_kv(x.float(), kv_cache_format("int8", torch.float32))
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.abs().max() <= 127
    step = x.abs().amax(dim=-1) / 127
    torch.testing.assert_close(scale.double(), step, rtol=1e-6, atol=0)
    error = (x - codes.double() * scale.double()[..., None]).abs()
    assert (error <= step[..., None] * (0.5 + 1e-5)).all()
    assert (codes.abs().amax(dim=-1) == 127).all()  # the absmax maps to the largest code


def test_fp8_codes_within_an_e4m3_rounding() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 32, generator=g, dtype=torch.float64) * 10.0 ** torch.arange(-20, 20, dtype=torch.float64)[
        :, None, None]
    codes, scale = quantize_kv(x.float(), kv_cache_format("fp8", torch.float32))
    assert codes.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale.double(), x.abs().amax(dim=-1) / 448, rtol=1e-6, atol=0)
    y = x / scale.double()[..., None]  # the value the code rounds
    error = (y - codes.double()).abs()
    assert (error <= 2.0**-4 * y.abs() + 2.0**-10 + 1e-5).all()  # half an e4m3 step (2^-10 among subnormals)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_large_and_zero_rows_saturate_without_nan(name: str) -> None:
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-30, -2e-30, 0.0, 5e-31]])
    codes, scale = quantize_kv(x, kv_cache_format(name, torch.float32))
    back = dequantize_kv(codes, scale, torch.float32)
    assert torch.isfinite(codes.float()).all() and torch.isfinite(back).all()
    assert back[1].eq(0).all() and back[0, 3] == 0
    torch.testing.assert_close(back[0, :2], x[0, :2], rtol=2e-2, atol=0)  # the extremes come back (saturated)
    torch.testing.assert_close(back[2], x[2], rtol=7e-2, atol=0)


def test_formats_and_bad_names() -> None:
    assert kv_cache_format("auto", torch.bfloat16).dtype == torch.bfloat16
    assert kv_cache_format("int8", torch.float32).bytes_per_token_head(64) == 64 + 4
    assert kv_cache_format("fp8", torch.float32).bytes_per_token_head(128) == 128 + 4
    assert kv_cache_format("float16", torch.float32).bytes_per_token_head(64) == 128
    with pytest.raises(TridentError, match="int8"):
        kv_cache_format("int4", torch.float32)
    with pytest.raises(TridentError, match="auto, float32, bfloat16, float16, int8, fp8"):
        CacheConfig(kv_cache_dtype="int4")


# -- attention over a quantized cache -----------------------------------------------------------------------

def _attention64(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: list[int],
                 scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """float64 attention of queries [L, H, D] at ``positions`` over keys/values [S, kv_heads, D] at 0..S-1."""
    group = query.shape[1] // keys.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for i, pos in enumerate(positions):
        for h in range(query.shape[1]):
            lo = 0 if window is None else max(0, pos - window + 1)
            k, v = keys[lo: pos + 1, h // group].double(), values[lo: pos + 1, h // group].double()
            s = (k @ query[i, h].double()) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            out[i, h] = torch.softmax(s, dim=0) @ v
    return out


def _stored(cache: torch.Tensor, scale: torch.Tensor, table: tuple[int, ...], length: int) -> torch.Tensor:
    """What a head-major cache holds for a sequence's first ``length`` tokens, as float64 [S, kv_heads, D]."""
    bs = cache.shape[2]
    slots = [(table[p // bs], p % bs) for p in range(length)]
    blocks, offsets = torch.tensor([b for b, _ in slots]), torch.tensor([o for _, o in slots])
    codes = cache[:, blocks, offsets].double()  # [kv_heads, S, D]
    return (codes * scale[:, blocks, offsets].double()[..., None]).transpose(0, 1)


# (num_heads, num_kv_heads, head_dim, block_size, window, softcap)
SHAPES = [
    (4, 4, 32, 16, None, None),
    (8, 2, 64, 16, None, None),
    (8, 4, 16, 4, 6, 5.0),  # gemma2-like: window and soft-capping
    (12, 3, 32, 8, 20, None),
]


def _run_step(name: str, shape, chunks: list[tuple[int, int]], seed: int) -> None:
    """chunks: (cached tokens, new tokens) per sequence; cached tokens are written first (a prefix hit or
    earlier steps), then the step's tokens, then it attends."""
    num_heads, num_kv_heads, head_dim, bs, window, softcap = shape
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    needed = [-(-(c + n) // bs) for c, n in chunks]
    physical = list(range(sum(needed) + 2))
    rng.shuffle(physical)
    plan, tables = [], []
    for i, ((cached, n), k) in enumerate(zip(chunks, needed)):
        tables.append(tuple(physical[:k]))
        physical = physical[k:]
        plan.append(ScheduledChunk(seq_id=i, token_ids=tuple(range(n)), start_pos=cached, block_table=tables[-1],
                                   sample=True, params=SamplingParams(temperature=0.0)))
    step = StepPlan(chunks=tuple(plan))
    model = SimpleNamespace(config=SimpleNamespace(
        num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=1,
        kv_cache_spec=KVCacheSpec(num_kv_heads=num_kv_heads, key_dim=head_dim)))
    backend = TorchAttention()
    runner = ModelRunner(model, backend=backend, num_blocks=sum(needed) + 2, block_size=bs,
                         kv_format=kv_cache_format(name, torch.float32), device=CPU, sampler=Sampler(device=CPU),
                         max_num_seqs=8)
    cache = runner.kv_caches[0]
    contexts = [torch.randn(2, c + n, num_kv_heads, head_dim, generator=g) for c, n in chunks]
    for chunk, kv in zip(step.chunks, contexts):
        if chunk.start_pos:
            slots = [chunk.block_table[p // bs] * bs + p % bs for p in range(chunk.start_pos)]
            meta = AttentionMetadata(slot_mapping=torch.tensor(slots), prefills=(), decode=None,
                                     num_tokens=len(slots))
            backend.write_kv(kv[0, : chunk.start_pos], kv[1, : chunk.start_pos], cache, meta)
    _, _, meta, _, _ = runner.prepare(step)
    new_k = torch.cat([kv[0, c.start_pos:] for c, kv in zip(step.chunks, contexts)])
    new_v = torch.cat([kv[1, c.start_pos:] for c, kv in zip(step.chunks, contexts)])
    backend.write_kv(new_k, new_v, cache, meta)
    query = torch.randn(step.num_tokens, num_heads, head_dim, generator=g)
    scale = 2 * head_dim ** -0.5
    out = backend.forward(query, cache, meta, scale=scale, sliding_window=window, logit_softcap=softcap)
    row = 0
    for chunk, kv, table in zip(step.chunks, contexts, tables):
        n, length = chunk.num_tokens, chunk.start_pos + chunk.num_tokens
        rows = slice(row, row + n)
        row += n
        positions = list(range(chunk.start_pos, length))
        keys, values = _stored(cache.key, cache.key_scale, table, length), _stored(
            cache.value, cache.value_scale, table, length)
        # the cache holds a quantization of what was written: within half a step (int8) / an e4m3 rounding
        bound = (2**-4 if name == "fp8" else 0.5 / 127) * kv[0].abs().amax(dim=-1, keepdim=True) * 1.0001
        assert ((keys - kv[0].double()).abs() <= bound + 1e-30).all()
        exact = _attention64(query[rows], keys, values, positions, scale, window, softcap)
        rel = ((out[rows].double() - exact).norm() / exact.norm()).item()
        assert rel < 1e-5, f"{name} {shape} {chunks}: {rel:.2e} from the dequantized-exact attention"
        float_path = _attention64(query[rows], kv[0], kv[1], positions, scale, window, softcap)
        rel = ((out[rows].double() - float_path).norm() / float_path.norm()).item()
        assert rel < FLOAT_PATH_TOLERANCE[name], f"{name} {shape} {chunks}: {rel:.2e} from the float attention"


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_mixed_step_on_a_quantized_cache(name: str, index: int) -> None:
    bs = SHAPES[index][3]
    # a prefix hit, a fresh prompt, chunks crossing blocks, decodes between them
    chunks = [(bs + 4, 1), (2 * bs, 9), (30, 1), (0, 2 * bs + 1), (bs - 1, bs + 2), (3, 1)]
    _run_step(name, SHAPES[index], chunks, seed=index)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_decode_step_on_a_quantized_cache(name: str, index: int) -> None:
    bs = SHAPES[index][3]
    _run_step(name, SHAPES[index], [(n - 1, 1) for n in (1, bs, bs + 1, 2 * bs - 1, 41)], seed=10 + index)
