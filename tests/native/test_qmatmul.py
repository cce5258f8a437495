"""trident/native/qmatmul.c against float64: on random weights (int4 / int8, groups of 32 / 64 / 128 and per channel,
with and without offsets and bias, widths off the kernel's 4-row and 64-element tiles) and activations (float32 /
bfloat16, 1 to 16 rows), for every build this CPU runs (its own, AVX2, plain C): the kernel equals the product with
the activations quantized as documented (emulate.py) up to float32 rounding, and the exact product within the bound
the activations' rounding allows."""

from __future__ import annotations

import itertools

import pytest
import torch
from emulate import activation_error_bound, emulated_matmul, marches, random_weight

from trident.native import qmatmul as nq
from trident.quant.affine import affine_dequantize

CASES = [  # bits, n, k, group (None: per channel), offsets, bias, rows, x dtype
    (4, 37, 96, 32, True, False, 1, torch.float32),
    (4, 64, 576, 32, True, True, 3, torch.bfloat16),
    (4, 40, 256, 128, False, False, 16, torch.float32),
    (4, 9, 32, 32, True, False, 2, torch.bfloat16),
    (8, 33, 576, None, False, False, 2, torch.float32),
    (8, 50, 160, 32, True, True, 1, torch.float32),
    (8, 16, 192, 64, False, False, 5, torch.bfloat16),
]
EXPECTED_ISA = {"x86-64-v3": "avx2", "x86-64": "c"}


@pytest.fixture(params=marches())
def lib(request):
    lib = nq.library(request.param)
    assert lib is not None, nq.why_unavailable()
    if request.param in EXPECTED_ISA:  # the build really takes the path it is here to check
        assert nq.isa(lib) == EXPECTED_ISA[request.param]
    return lib


@pytest.mark.parametrize("case", CASES, ids=lambda c: "int{}_n{}_k{}_g{}_off{}_bias{}_rows{}_{}".format(
    *c[:7], str(c[7]).removeprefix("torch.")))
def test_matches_float64(lib, case) -> None:
    bits, n, k, group, offsets, bias, rows, dtype = case
    gen = torch.Generator().manual_seed(n * k + rows)
    w = random_weight(bits, n, k, group, offsets, gen)
    b = torch.randn(n, generator=gen) if bias else None
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 3).to(dtype)
    x[0, :7] = 0  # a block's head of zeros; and an all-zero block where K allows
    if k >= 64:
        x[-1, 32:64] = 0
    y = nq.pack(w, b).matmul(x, lib)
    assert y.dtype == dtype and y.shape == (rows, n)
    emulated = emulated_matmul(x, w, b)
    exact = x.double() @ affine_dequantize(w, torch.float64).T + (0 if b is None else b.double())
    out_rounding = (emulated.abs() * 2.0**-8) if dtype == torch.bfloat16 else 0
    scale = (x.double().abs() @ affine_dequantize(w, torch.float64).abs().T) + 1
    assert ((y.double() - emulated).abs() <= out_rounding + 1e-5 * scale).all(), \
        f"{case}: max {(y.double() - emulated).abs().max().item():.3g} off the emulated product"
    bound = activation_error_bound(x, w)
    assert ((y.double() - exact).abs() <= bound + out_rounding + 1e-5 * scale).all(), f"{case}: beyond the bound"


def test_every_row_count_and_width(lib) -> None:
    """1..16 rows and N = 1..9 (the 4-row tiles' tails) on one weight each."""
    gen = torch.Generator().manual_seed(7)
    for n, rows in itertools.product(range(1, 10), (1, 2, 7, 16)):
        w = random_weight(4, n, 64, 32, True, gen)
        x = torch.randn(rows, 64, generator=gen)
        y = nq.pack(w).matmul(x, lib)
        assert torch.allclose(y.double(), emulated_matmul(x, w), rtol=1e-5, atol=1e-5), (n, rows)


@pytest.mark.parametrize("bits", [4, 8])
def test_tile_path_agrees_with_the_vector_path(bits) -> None:
    """Where the CPU has AMX tiles (and the kernel grants them), 6-16 activation rows take the tile path:
    it equals the emulated product like the vector path does, and the vector path (tiles switched off) within
    float32 rounding; N off the 16-row tiles, with offsets and bias. Elsewhere no tile path is claimed."""
    lib = nq.library()
    if not lib.tq_amx_init(1):  # no tiles in this build or from this kernel: none claimed
        assert lib.tq_amx_min_rows() == 0 and "amx" not in nq.isa(lib)
        return
    gen = torch.Generator().manual_seed(bits)
    w = random_weight(bits, 37, 192, 32 if bits == 4 else 64, True, gen)
    b = torch.randn(37, generator=gen)
    packed = nq.pack(w, b)
    for rows, dtype in ((6, torch.float32), (11, torch.bfloat16), (16, torch.float32)):
        x = (torch.randn(rows, 192, generator=gen) * 2).to(dtype)
        assert lib.tq_amx_init(1) == 1 and "amx" in nq.isa(lib)
        tiles = packed.matmul(x, lib)
        lib.tq_amx_init(0)
        try:
            vector = packed.matmul(x, lib)
        finally:
            lib.tq_amx_init(1)
        emulated = emulated_matmul(x, w, b)
        tol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(tiles.double(), emulated, rtol=tol, atol=1e-4), (bits, rows)
        assert torch.allclose(tiles.float(), vector.float(), rtol=tol, atol=1e-4), (bits, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_activation_stages_equal_the_emulation_exactly(lib, dtype) -> None:
    """The two int8 stages the kernel quantizes x into (tq_quantize_activations: every build, the AVX-512 one on 16
    lanes) give exactly emulate.py's value per element: the same codes and units, for 1 to 16 rows, a padded pair
    (K = 96), an all-zero block, a block with one huge element and values on rounding ties."""
    from emulate import quantize_activations

    gen = torch.Generator().manual_seed(5)
    for rows, k in ((1, 96), (5, 576), (16, 160)):
        x = (torch.randn(rows, k, generator=gen) * 10 ** (torch.rand(rows, 1, generator=gen) * 4 - 2)).to(dtype)
        x[0, 32:64] = 0
        x[-1, 0] = 3e4
        x[-1, 1:32] = torch.arange(1, 32, dtype=torch.float32).to(dtype) * (3e4 / 127 / 2)  # multiples of half a step
        kp = -(-k // 64) * 64
        xq = torch.empty(rows, 2, kp, dtype=torch.int8)
        d = torch.empty(rows, kp // 32, dtype=torch.float32)
        assert lib.tq_quantize_activations(x.contiguous().data_ptr(), dtype == torch.bfloat16, rows, k, 0,
                                           xq.data_ptr(), d.data_ptr(), 2) == kp
        order = nq.lane_order()  # lane-order position -> element of the pair
        codes = torch.empty(rows, 2, kp, dtype=torch.int8)
        codes.view(rows, 2, kp // 64, 64)[..., order] = xq.view(rows, 2, kp // 64, 64)
        value = d.double().repeat_interleave(32, dim=1) * (256.0 * codes[:, 0].double() + codes[:, 1].double())
        expected, unit = quantize_activations(x)
        assert torch.equal(d[:, : k // 32].double(), unit), "units differ"
        assert torch.equal(value[:, :k], expected), f"rows {rows}, K {k}: {(value[:, :k] - expected).abs().max()}"
        assert (codes[:, :, k:] == 0).all() and (d[:, k // 32:] == 0).all()  # padding


NATURAL_CASES = [  # n, k, offsets, bias, rows, x dtype: per-channel int8 codes as stored
    (36, 576, False, False, 1, torch.float32),
    (12, 128, True, True, 3, torch.bfloat16),
    (64, 1536, False, True, 5, torch.bfloat16),
    (40, 192, True, False, 11, torch.float32),  # the tile path where the CPU has one
    (8, 64, False, False, 16, torch.bfloat16),
]


@pytest.mark.parametrize("case", NATURAL_CASES, ids=lambda c: "n{}_k{}_off{}_bias{}_rows{}_{}".format(
    *c[:5], str(c[5]).removeprefix("torch.")))
def test_natural_int8_matches_float64(lib, case) -> None:
    """Per-channel int8 codes multiplied as stored (natural order: no copy) equal the product with the activations
    quantized one unit per pair of blocks (emulate.py) up to float32 rounding, and the exact product within that
    rounding's bound; the packed weight's codes are the stored tensor itself."""
    n, k, offsets, bias, rows, dtype = case
    gen = torch.Generator().manual_seed(n + k + rows)
    w = random_weight(8, n, k, None, offsets, gen)
    b = torch.randn(n, generator=gen) if bias else None
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 3).to(dtype)
    x[0, :32] = 0  # one block of a pair all zero: its codes use the pair's unit
    x[-1, 40] = 50.0  # one large element sets its pair's unit
    assert nq.takes_natural(w)
    packed = nq.pack(w, b, lib, natural=True)
    assert packed.natural and packed.codes.data_ptr() == w.codes.data_ptr()
    y = packed.matmul(x, lib)
    emulated = emulated_matmul(x, w, b, natural=True)
    exact = x.double() @ affine_dequantize(w, torch.float64).T + (0 if b is None else b.double())
    out_rounding = (emulated.abs() * 2.0**-8) if dtype == torch.bfloat16 else 0
    scale = (x.double().abs() @ affine_dequantize(w, torch.float64).abs().T) + 1
    assert ((y.double() - emulated).abs() <= out_rounding + 1e-5 * scale).all(), \
        f"{case}: max {(y.double() - emulated).abs().max().item():.3g} off the emulated product"
    bound = activation_error_bound(x, w, natural=True)
    assert ((y.double() - exact).abs() <= bound + out_rounding + 1e-5 * scale).all(), f"{case}: beyond the bound"
    # the lane-order copy gives the per-block rounding: a different (also bounded) product, so the check above
    # would catch a kernel that ignored the flag
    lane = nq.pack(w, b, lib).matmul(x, lib)
    assert not torch.equal(lane, y)


def test_natural_activations_equal_the_emulation_exactly(lib) -> None:
    """tq_quantize_activations in natural order: the codes in element order, one unit per pair, exactly
    emulate.py's values (an all-zero block beside a large one, 1 to 16 rows)."""
    from emulate import quantize_activations

    gen = torch.Generator().manual_seed(9)
    for rows, k in ((1, 128), (6, 576), (16, 64)):
        x = torch.randn(rows, k, generator=gen) * 10 ** (torch.rand(rows, 1, generator=gen) * 4 - 2)
        x[0, :32] = 0
        x[-1, 33] = 3e4
        xq = torch.empty(rows, 2, k, dtype=torch.int8)
        d = torch.empty(rows, k // 32, dtype=torch.float32)
        assert lib.tq_quantize_activations(x.data_ptr(), 0, rows, k, 1, xq.data_ptr(), d.data_ptr(), 2) == k
        value = d.double().repeat_interleave(32, dim=1) * (256.0 * xq[:, 0].double() + xq[:, 1].double())
        expected, unit = quantize_activations(x, natural=True)
        assert torch.equal(d.double(), unit) and torch.equal(d[:, 0::2], d[:, 1::2])
        assert torch.equal(value, expected), f"rows {rows}, K {k}: {(value - expected).abs().max()}"
    assert lib.tq_quantize_activations(x.data_ptr(), 0, 1, 96, 1, xq.data_ptr(), d.data_ptr(), 2) == -1


def test_natural_order_refuses_what_it_cannot_take() -> None:
    gen = torch.Generator().manual_seed(3)
    for w in (random_weight(8, 8, 96, None, False, gen), random_weight(8, 6, 64, None, False, gen),
              random_weight(4, 8, 64, None, False, gen), random_weight(8, 8, 128, 32, False, gen)):
        assert not nq.takes_natural(w)
        with pytest.raises(ValueError, match="natural order"):
            nq.pack(w, natural=True)


def test_rejects_what_it_cannot_take() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="multiples of 32"):
        nq.pack(random_weight(4, 8, 48, 16, False, gen))
    packed = nq.pack(random_weight(4, 8, 64, 32, False, gen))
    with pytest.raises(ValueError, match="rows"):
        packed.matmul(torch.zeros(nq.MAX_ROWS + 1, 64))
    with pytest.raises(ValueError, match="float32/bfloat16"):
        packed.matmul(torch.zeros(1, 64, dtype=torch.float16))


@pytest.mark.parametrize("bits", [4, 8])
def test_c_packer_equals_the_torch_layout(lib, bits) -> None:
    """tq_pack (each build) lays the codes out exactly as pack_codes_torch, K off and on the 64-element pairs."""
    gen = torch.Generator().manual_seed(bits)
    for n, k in ((5, 32), (8, 64), (13, 96), (4, 576)):
        w = random_weight(bits, n, k, 32, True, gen)
        rows = -(-n // nq.ROWS) * nq.ROWS
        assert torch.equal(nq.pack(w, lib=lib).codes, nq.pack_codes_torch(w, rows)), (n, k)


DEQUANTIZE_FORMATS = [  # bits, group (None: per channel), symmetric, float zero points
    (4, 32, True, False), (4, 64, False, False), (4, 32, False, True), (4, None, True, False),
    (8, None, True, False), (8, 32, False, False), (8, 128, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", DEQUANTIZE_FORMATS, ids=lambda f: "int{}_g{}_{}{}".format(
    f[0], f[1], "sym" if f[2] else "asym", "_floatzp" if f[3] else ""))
def test_dequantize_equals_torch_bit_for_bit(lib, monkeypatch, fmt, dtype) -> None:
    """tq_dequantize gives exactly what rtn.dequantize's torch arithmetic gives (prefill runs on its output), for
    every stored format, with scales and zero points spanning magnitudes (and a scale that rounds to bf16 ties)."""
    from trident.quant.rtn import QuantConfig, QuantizedWeight, dequantize

    bits, group, symmetric, float_zp = fmt
    n, k = 19, 256
    gen = torch.Generator().manual_seed(bits * 100 + (group or 1) + symmetric)
    groups = 1 if group is None else k // group
    if bits == 4:
        qweight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    else:
        qweight = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = 10 ** (torch.rand(n, groups, generator=gen) * 4 - 3)
    scales[0, 0] = 1.0 + 2**-8  # products land on bfloat16 ties
    zeros = None
    if not symmetric:
        zeros = (torch.randn(n, groups, generator=gen) * 0.3 if float_zp
                 else torch.randint(0, 2**bits, (n, groups), generator=gen).to(torch.uint8))
    config = QuantConfig(bits=bits, group_size=group, symmetric=symmetric, float_zero_points=float_zp)
    q = QuantizedWeight(qweight, scales, zeros)
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    expected = dequantize(q, config, dtype)  # torch's arithmetic
    monkeypatch.delenv("TRIDENT_NO_NATIVE")
    got = nq.dequantize_stored(q, config, dtype, lib)
    assert got is not None and got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got, expected), f"{fmt}: max diff {(got.float() - expected.float()).abs().max().item():.3g}"
    calls = []
    real = nq.dequantize_stored
    monkeypatch.setattr(nq, "dequantize_stored", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(dequantize(q, config, dtype), expected) and calls == [1]  # rtn.dequantize takes it by default


def test_per_channel_int8_of_other_shapes_keeps_torchs_kernel_and_is_decided_once(monkeypatch) -> None:
    """A per-channel int8 layer the natural order does not take (N not a multiple of 4) gets no native weight (its
    codes would need a copy): the layer runs torch's int8 kernel, equal to the reference, and the decision is made
    once, not at every forward."""
    from trident.models.layers import Linear
    from trident.quant import linear as linear_module
    from trident.quant.linear import QuantizedLinear
    from trident.quant.rtn import QuantConfig

    layer = Linear(128, 6)
    layer.weight.copy_(torch.randn(6, 128, generator=torch.Generator().manual_seed(2)) * 0.05)
    q = QuantizedLinear.from_linear(layer, QuantConfig(bits=8))
    calls = []
    real = linear_module.affine_from_rtn
    monkeypatch.setattr(linear_module, "affine_from_rtn", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 128).bfloat16()
    for _ in range(3):
        assert q.native_weight(x.dtype, 2) is None
        y = q(x)
    assert len(calls) == 1
    reference = (x.float() @ q.dequantized_weight(torch.float32).T)
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)
