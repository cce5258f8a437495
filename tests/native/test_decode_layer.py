"""trident/native/decode_layer.c against a float64 torch layer: one Llama-form decoder layer's decode step for three
sequences at once (their blocks not consecutive, one of them past a sliding window in one case), with int4 / int8
projections (emulate.py's quantized-activation products), per-head query / key norms or none, both activations,
float32, bfloat16 and int8 caches, for every build this CPU runs. Checks the residual stream after the layer and
the keys and values written into the cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from emulate import emulated_matmul, marches, random_weight

from trident.native import qmatmul as nq
from trident.native.decode_layer import LayerSpec, NativeLayer, NativeStep
from trident.quant.kv import format_of_codes, quantize_kv

H, HEADS, KV_HEADS, D, INTER = 64, 4, 2, 16, 96
BLOCK_SIZE, NUM_BLOCKS = 4, 16
ROWS = [(5, [3, 1]), (9, [0, 5, 2]), (27, [8, 15, 9, 14, 10, 13, 11])]
"""(position of the new token, block table) per sequence."""
ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _rotate(v: torch.Tensor, inv_freq: torch.Tensor, position: int) -> torch.Tensor:
    angle = (torch.tensor(float(position)) * inv_freq).double()  # float32 product, as the C code and torch
    c, s = angle.cos(), angle.sin()
    x1, x2 = v[..., : D // 2], v[..., D // 2:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _slot(table: list[int], t: int) -> int:
    return table[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE


@pytest.fixture(params=marches())
def lib(request):
    lib = nq.library(request.param)
    assert lib is not None, nq.why_unavailable()
    return lib


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8],
                         ids=["f32cache", "bf16cache", "i8cache"])
@pytest.mark.parametrize("variant", ["qknorm_silu", "plain_gelu_window"])
def test_layer_matches_float64(lib, cache_dtype, variant) -> None:
    gen = torch.Generator().manual_seed(11)
    head_norms, window = variant == "qknorm_silu", (4 if "window" in variant else None)
    activation = "silu" if "silu" in variant else "gelu_pytorch_tanh"
    weights = {"qkv": random_weight(4, (HEADS + 2 * KV_HEADS) * D, H, 32, True, gen),
               "o": random_weight(8, H, HEADS * D, 32, False, gen),
               "gate_up": random_weight(4, 2 * INTER, H, 32, True, gen),
               "down": random_weight(4, H, INTER, None, True, gen)}  # per channel over K = 96: a padded pair
    bias = {"qkv": torch.randn((HEADS + 2 * KV_HEADS) * D, generator=gen) * 0.1}
    norms = {name: 1 + 0.2 * torch.randn(size, generator=gen)
             for name, size in (("in", H), ("post", H), ("q", D), ("k", D))}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    slots_total = NUM_BLOCKS * BLOCK_SIZE
    scales = [None, None]
    if cache_dtype == torch.int8:  # trident/quant/kv.py's format: codes and a float32 scale per (kv head, slot)
        cache = [torch.randint(-127, 128, (KV_HEADS, slots_total, D), generator=gen, dtype=torch.int8)
                 for _ in range(2)]
        scales = [torch.rand(KV_HEADS, slots_total, generator=gen) * 0.02 for _ in range(2)]
        scales_before = [t.clone() for t in scales]
    else:
        cache = [torch.randn(KV_HEADS, slots_total, D, generator=gen).to(cache_dtype) for _ in range(2)]
    before = [c.clone() for c in cache]
    eps, scale = 1e-5, 1 / math.sqrt(D)
    spec = LayerSpec(*(nq.pack(weights[n], bias.get(n)) for n in ("qkv", "o", "gate_up", "down")),
                     norms["in"], norms["post"], norms["q"] if head_norms else None,
                     norms["k"] if head_norms else None, eps, eps, inv_freq, HEADS, KV_HEADS, D, scale, activation,
                     window, cache[0], cache[1], *scales)
    residual = torch.randn(len(ROWS), H, generator=gen) * 2
    expected = residual.double().clone()
    got = NativeStep(H).run([NativeLayer(spec)], residual.clone(), [p for p, _ in ROWS], [t for _, t in ROWS],
                            BLOCK_SIZE, lib)

    if cache_dtype == torch.int8:
        keys, values = (c.double() * t.double()[..., None] for c, t in zip(before, scales_before))
    else:
        keys, values = before[0].double(), before[1].double()
    for m, (pos, table) in enumerate(ROWS):
        r = expected[m:m + 1]
        qkv = emulated_matmul(_rms(r, norms["in"], eps).float(), weights["qkv"], bias["qkv"])[0]
        q = qkv[: HEADS * D].view(HEADS, D)
        k = qkv[HEADS * D: (HEADS + KV_HEADS) * D].view(KV_HEADS, D)
        v = qkv[(HEADS + KV_HEADS) * D:].view(KV_HEADS, D)
        if head_norms:
            q, k = _rms(q, norms["q"], eps), _rms(k, norms["k"], eps)
        q, k = _rotate(q, inv_freq, pos), _rotate(k, inv_freq, pos)
        slot = _slot(table, pos)
        if cache_dtype == torch.int8:  # quantized as kv.py does (from float32)
            for store, new_rows in ((keys, k), (values, v)):
                codes, row_scales = quantize_kv(new_rows.float(), format_of_codes(torch.int8))
                store[:, slot] = codes.double() * row_scales.double()[:, None]
        else:
            keys[:, slot], values[:, slot] = k.to(cache_dtype).double(), v.to(cache_dtype).double()
        start = 0 if window is None else max(0, pos + 1 - window)
        slots = [_slot(table, t) for t in range(start, pos + 1)]
        kk, vv = keys[:, slots], values[:, slots]  # [kv_heads, S, D]
        group = HEADS // KV_HEADS
        att = torch.cat([torch.softmax(kk[h // group] @ q[h] * scale, -1) @ vv[h // group] for h in range(HEADS)])
        r = r + emulated_matmul(att.float()[None], weights["o"])
        gu = emulated_matmul(_rms(r, norms["post"], eps).float(), weights["gate_up"])
        mlp_in = ACT[activation](gu[:, :INTER]) * gu[:, INTER:]
        expected[m:m + 1] = r + emulated_matmul(mlp_in.float(), weights["down"])
    tolerance = 2e-4 * expected.abs().max().item()  # room for an activation code rounded the other way
    assert (got.double() - expected).abs().max().item() <= tolerance, (got, expected)
    for index, (written, reference) in enumerate(((cache[0], keys), (cache[1], values))):
        if cache_dtype == torch.int8:  # a code may round the other way at a tie: one step of its row's scale
            deq = written.double() * scales[index].double()[..., None]
            assert ((deq - reference).abs() <= scales[index].double()[..., None] * 1.001 + 1e-7).all(), \
                "cache contents differ"
            continue
        step = 2.0**-7 if cache_dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(written.double(), reference, rtol=step, atol=1e-3), "cache contents differ"
    touched = {_slot(t, p) for p, t in ROWS}
    untouched = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in touched]
    assert torch.equal(cache[0][:, untouched], before[0][:, untouched])  # only the new tokens' slots are written
    if cache_dtype == torch.int8:
        assert torch.equal(scales[1][:, untouched], scales_before[1][:, untouched])
        assert not torch.equal(scales[1], scales_before[1])  # and the new slots' scales are


def test_unknown_activation_and_workspace_growth(lib) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [nq.pack(random_weight(4, n, k, 32, False, gen)) for n, k in
               (((HEADS + 2 * KV_HEADS) * D, H), (H, HEADS * D), (2 * INTER, H), (H, INTER))]
    cache = torch.zeros(KV_HEADS, NUM_BLOCKS * BLOCK_SIZE, D)
    common = (torch.ones(H), torch.ones(H), None, None, 1e-5, 1e-5, torch.ones(D // 2), HEADS, KV_HEADS, D, 0.25)
    with pytest.raises(ValueError, match="relu"):
        NativeLayer(LayerSpec(*weights, *common, "relu", None, cache, cache.clone()))
    layer = NativeLayer(LayerSpec(*weights, *common, "silu", None, cache, cache.clone()))
    step = NativeStep(H)
    step.run([layer], torch.zeros(1, H), [3], [[0]], BLOCK_SIZE, lib)
    assert step._capacity == (1, 4)
    out = step.run([layer], torch.ones(2, H), [9, 2], [[1, 2, 3], [4]], BLOCK_SIZE, lib)  # grows for 2 x 10 tokens
    assert step._capacity == (2, 16) and out.isfinite().all()
