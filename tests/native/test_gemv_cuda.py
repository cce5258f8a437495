"""The CUDA batch-1 integer matmul (trident/native/gemv_cuda.cu) against float64 math.

The kernel quantizes x per block of 32 to two int8 stages (int8 codes) or one (int4 codes) and multiplies the codes
exactly (dp4a, int32), so it must equal float64 x_hat W^T + b, x_hat that rounding of x (emulated by
quantize_activations_reference), within the output's rounding; and it stays within the activation rounding's
bound of the exact x W^T + b. Formats: int8 and int4, per channel and groups of 32 / 64 / 128, with and without
offsets and bias, bfloat16 and float16, odd N, K up to 32768 (more than 48 KB of shared memory). The CPU tests
check the emulation against its float64 bound and the fallbacks when the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch
from agreement import assert_cuda_kernels_agree_with_triton
from emulate import random_weight

from trident.native import cuda_build, gemv_cuda
from trident.quant.affine import AffineWeight, affine_dequantize, affine_linear

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
"""Twice the output's rounding (half an ulp) of |y|, plus the same of the products' root-sum-square for outputs that
cancel to near zero: float32 accumulation of the per-block sums stays ~100x below it."""
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
"""One ulp of a 16-bit value, relative (the normed tests' allowance for the norm's last bit)."""
ROUNDING = {2: 1 / (2 * 127 * 127), 1: 1 / 254}
"""|x - x_hat| per element, as a fraction of its block's largest |x|, by stages: stage one leaves at most
s1 / 2 = max / 254, stage two rounds that remainder to s2 / 2 <= (max / 254) / 254 (plus float32 rounding, a few
2^-24 of max)."""


def codes_part(w: AffineWeight) -> torch.Tensor:
    """float64 W without its offsets (codes times scales), on the CPU."""
    return affine_dequantize(AffineWeight(w.codes, w.scales, None, w.bits), torch.float64).cpu()


def kernel_product(x: torch.Tensor, w: AffineWeight, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 x W^T + b as the kernel computes it, the root-sum-square of its terms) for x [1, K] and a float64
    bias [N]: the codes' part of W times x's rounding (quantize_activations_reference, ACTIVATION_STAGES), the
    offsets' part times x itself (the kernel adds offset x the sum of x over the block), or with a zero point
    times x's rounding too (the kernel takes zero point x the sum of x's codes off each block's integer sum)."""
    wd, codes = affine_dequantize(w, torch.float64).cpu(), codes_part(w)
    x_hat = gemv_cuda.quantize_activations_reference(x, gemv_cuda.ACTIVATION_STAGES[w.bits]).double()
    product = x_hat @ codes.T + (x_hat if w.zero_point else x.double()) @ (wd - codes).T + b
    return product, ((x_hat * x_hat) @ (wd * wd).T + b**2).sqrt()


OFFSETS = ("none", "per_group", "zero_point")
"""How a test weight's offsets look: none, random per group (asymmetric codes), or -8 x the scales with the zero
point 8 (symmetric int4 as stored)."""


def make_weight(bits: int, n: int, k: int, group_size: int | None, offsets: str, g: torch.Generator) -> AffineWeight:
    """emulate.random_weight's weight on the GPU, with OFFSETS ``offsets``."""
    w = random_weight(bits, n, k, group_size, offsets == "per_group", g)
    if offsets == "zero_point":
        w = w._replace(offsets=-8.0 * w.scales, zero_point=8)
    return cuda_weight(w)


def normed_inputs(n: int, k: int, bits: int, group_size: int | None, offsets: str, residual: bool,
                  dtype: torch.dtype) -> tuple:
    """(weight on the GPU, x, residual or None, norm weight, bias): a decoder layer's norm and product on the CPU."""
    g = torch.Generator().manual_seed(n + k + bits)
    w = make_weight(bits, n, k, group_size, offsets, g)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype)
    r = (torch.randn(1, k, generator=g) * 10).to(dtype) if residual else None
    norm_weight = (1 + torch.randn(k, generator=g) * 0.2).to(dtype)
    return w, x, r, norm_weight, torch.randn(n, generator=g).to(dtype)


def normed_allowance(h: torch.Tensor, w: AffineWeight, b: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel_product of the norm reference's row h, what the kernel may differ from it by): the output's rounding
    as in _check, plus one ulp of h per element (the kernel sums the squares in another order, so its scale may
    differ in the last float32 bits and round a few elements the other way)."""
    product, rss = kernel_product(h, w, b.double())
    wd = affine_dequantize(w, torch.float64).cpu()
    return product, RTOL[dtype] * (product.abs() + rss) + 2 * ULP[dtype] * (h.double().abs() @ wd.abs().T) + 2**-24


def cuda_weight(w: AffineWeight) -> AffineWeight:
    """emulate.random_weight's weight (built on the CPU) on the GPU."""
    return AffineWeight(w.codes.cuda(), w.scales.cuda(), None if w.offsets is None else w.offsets.cuda(), w.bits,
                        w.zero_point)


@pytest.mark.parametrize("stages", [2, 1])
def test_activation_emulation_within_its_bound(stages: int) -> None:
    """x_hat - x per element within ROUNDING[stages] of its block's largest |x| (float64 check), for blocks of very
    different magnitudes, an all-zero block and a block with one large element; one stage is the first of two."""
    g = torch.Generator().manual_seed(0)
    magnitudes = 10 ** (torch.rand(4, 8, 1, generator=g) * 6 - 3)
    x = torch.randn(4, 256, generator=g) * magnitudes.repeat_interleave(32, 1).view(4, 256)
    x[1, 32:64] = 0
    x[2, 64] = 1e4
    x_hat = gemv_cuda.quantize_activations_reference(x, stages).double()
    block_max = x.double().abs().view(4, 8, 32).amax(-1, keepdim=True).expand(4, 8, 32).reshape(4, 256)
    error = (x_hat - x.double()).abs()
    relative = error / block_max.clamp_min(1e-30)
    assert (error <= block_max * (ROUNDING[stages] + 2**-20)).all(), relative.max()
    assert torch.equal(x_hat[1, 32:64], torch.zeros(32, dtype=torch.float64))
    # not a no-op, and the stages differ: one stage's rounding is ~127x coarser than two's bound
    assert relative.max() > ROUNDING[stages] / (1000 if stages == 2 else 3)
    if stages == 1:
        first = x_hat.view(4, 8, 32) / block_max.view(4, 8, 32).clamp_min(1e-30) * 127
        assert torch.allclose(first, first.round(), atol=1e-4), "one stage is not the integer codes times max / 127"


def test_unavailable_without_cuda_or_when_disabled(monkeypatch) -> None:
    w = random_weight(8, 8, 64, None, False, torch.Generator().manual_seed(1))
    assert not gemv_cuda.takes(torch.randn(1, 64, dtype=torch.bfloat16), w, None), "a CPU tensor took the CUDA kernel"
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    assert cuda_build.load_cuda(gemv_cuda.LIBRARY) is None
    assert cuda_build.cuda_unavailable_reason(gemv_cuda.LIBRARY) == "TRIDENT_NO_NATIVE=1"
    monkeypatch.delenv("TRIDENT_NO_NATIVE")
    monkeypatch.setattr(cuda_build, "_nvcc", lambda: None)
    cuda_build._build.cache_clear()
    try:
        library, why = cuda_build._build(gemv_cuda.LIBRARY, "90a")
        assert library is None and why.startswith("no nvcc")
    finally:
        cuda_build._build.cache_clear()
    with pytest.raises(Exception, match="no CUDA library"):
        cuda_build._build("nonexistent", "90a")


def _check(n: int, k: int, bits: int, group_size: int | None, offsets: str, bias: bool, dtype: torch.dtype,
           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = make_weight(bits, n, k, group_size, offsets, g)
    x = (torch.randn(1, k, generator=g) * 10 ** (torch.rand(1, k // 32, 1, generator=g) * 3 - 2)
         .repeat_interleave(32, 1).view(1, k)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    what = f"N={n} K={k} int{bits} group={group_size} offsets={offsets} bias={bias} {dtype}"
    assert gemv_cuda.takes(x.cuda(), w, None if b is None else b.cuda()), what
    y = gemv_cuda.gemv(x.cuda(), w, None if b is None else b.cuda()).cpu().double()
    wd = affine_dequantize(w, torch.float64).cpu()
    bd = b.double() if bias else torch.zeros(n, dtype=torch.float64)
    emulated, rss = kernel_product(x, w, bd)
    excess = ((y - emulated).abs() / (RTOL[dtype] * (emulated.abs() + rss) + 2**-24)).max().item()
    assert excess <= 1, f"{what}: off the emulated float64 product by {excess:.2f}x the allowance"
    # and the exact product, within the activations' rounding (bounded by ROUNDING per block)
    exact = x.double() @ wd.T + bd
    block_max = x.double().abs().view(1, -1, 32).amax(-1, keepdim=True).expand(1, k // 32, 32).reshape(1, k)
    rounding = (block_max * (ROUNDING[gemv_cuda.ACTIVATION_STAGES[bits]] + 2**-20)) @ codes_part(w).abs().T
    excess = ((y - exact).abs() / (RTOL[dtype] * (exact.abs() + rss) + rounding + 2**-24)).max().item()
    assert excess <= 1, f"{what}: off the exact product by {excess:.2f}x the allowance"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, None], ids=lambda g: f"group{g}" if g else "per_channel")
@pytest.mark.parametrize("bits,offsets", [(8, "none"), (8, "per_group"), (4, "none"), (4, "per_group"),
                                          (4, "zero_point")])
def test_formats(bits: int, group_size: int | None, offsets: str, dtype: torch.dtype) -> None:
    seed = bits * 1000 + (group_size or 1) * 10 + OFFSETS.index(offsets)
    # the last shape is one the kernel takes a row per warp (launch_shape: 1 on an H200), the others in pairs
    for n, k, bias in ((37, 384, True), (1, 128, False), (515, 2048, True), (301, 8192, True)):
        _check(n, k, bits, group_size, offsets, bias, dtype, seed + n)


@pytest.mark.gpu
def test_one_row_per_warp_where_pairs_leave_the_busiest_warp_more_steps() -> None:
    """tq_gemv_rows_for over an H200's 132 x 16 resident warps: pipeline steps of the busiest warp, row pairs in
    steps of 4 chunks per lane against single rows in steps of 8 (int8 K = 4096: 256 chunks a row)."""
    lib, warps = gemv_cuda.library(), 132 * 16
    assert lib.tq_gemv_rows_for(8, 6144, 4096, warps) == 1  # pairs: 2 rounds x 2 steps; rows: 3 x 1
    assert lib.tq_gemv_rows_for(8, 2048, 4096, warps) == 1  # 1 x 2 against 1 x 1
    assert lib.tq_gemv_rows_for(8, 4096, 4096, warps) == 2  # 1 x 2 against 2 x 1: a tie keeps pairs
    assert lib.tq_gemv_rows_for(8, 5120, 2048, warps) == 2  # 2 x 1 against 3 x 1
    assert lib.tq_gemv_rows_for(4, 6144, 4096, warps) == 2  # int4 K = 4096 is one step a row either way
    assert lib.tq_gemv_rows_for(4, 301, 8192, warps) == 1 and lib.tq_gemv_rows_for(8, 301, 8192, warps) == 1


@pytest.mark.gpu
def test_groups_of_three_blocks_are_left_to_the_triton_product() -> None:
    """The kernel finds a chunk's scale column by a shift: a group of 3 blocks (96 columns) is not its product, and
    affine_linear still gives the float64 product of those weights."""
    g = torch.Generator().manual_seed(96)
    w = make_weight(4, 40, 384, 96, "per_group", g)
    x = torch.randn(1, 384, generator=g).to(torch.bfloat16)
    assert not gemv_cuda.takes(x.cuda(), w, None)
    assert gemv_cuda.takes(x.cuda(), make_weight(4, 40, 384, 128, "per_group", g), None)
    exact = x.double() @ affine_dequantize(w, torch.float64).cpu().T
    y = affine_linear(x.cuda(), w).cpu().double()
    assert torch.allclose(y, exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits", [(4096, 14336, 4), (3000, 14336, 8), (257, 32768, 4), (6, 32768, 8),
                                      (20000, 1024, 4)])
def test_large_shapes(n: int, k: int, bits: int) -> None:
    """Llama-3-8B's down projection, K beyond 48 KB of shared memory, and more row groups than the grid has warps
    (each warp walks several)."""
    _check(n, k, bits, 128, ("zero_point" if n % 2 else "per_group") if bits == 4 else "none", n % 2 == 1,
           torch.bfloat16, n + k)


@pytest.mark.gpu
def test_builds_on_the_gpu_machine() -> None:
    assert gemv_cuda.why_unavailable() is None
    assert gemv_cuda.library() is not None


@pytest.mark.gpu
def test_cuda_graph_replay_and_affine_linear_dispatch(monkeypatch) -> None:
    """affine_linear sends one row to the kernel (and more rows to Triton); a captured call replays on new x."""
    g = torch.Generator().manual_seed(7)
    w = cuda_weight(random_weight(4, 300, 512, 64, True, g))
    calls = []
    real = gemv_cuda.gemv
    monkeypatch.setattr(gemv_cuda, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(1, 512, generator=g).to(torch.bfloat16).cuda()
    y = affine_linear(x, w)
    affine_linear(torch.randn(3, 512, generator=g).to(torch.bfloat16).cuda(), w)
    assert calls == [torch.Size([1, 512])]
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_y = gemv_cuda.gemv(static_x, w)
    static_x.copy_(torch.randn(1, 512, generator=g).to(torch.bfloat16).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, gemv_cuda.gemv(static_x, w))
    assert not torch.equal(static_y, y)


@pytest.mark.gpu
def test_engine_decode_agrees_with_the_triton_kernel(tiny_int4_llama_dir, monkeypatch) -> None:
    """A CUDA engine's batch-1 decode steps (CUDA graphs) on an int4 model run this kernel and agree with the same
    engine on Triton's kernels (its one-row products the kernel's arithmetic in float32 torch: agreement.py): the
    same greedy tokens, log-probabilities within 0.1 nats."""
    assert_cuda_kernels_agree_with_triton(
        tiny_int4_llama_dir, [(11 * i + 5) % 256 for i in range(37)], gemv_cuda, "gemv",
        "batch-1 quantized products: CUDA dp4a kernel", "batch-1 quantized products: Triton (TRIDENT_NO_NATIVE=1)",
        monkeypatch)



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first_layer"])
@pytest.mark.parametrize("bits,group_size,offsets", [(8, None, "none"), (4, 128, "zero_point"), (4, 32, "per_group")])
def test_normed_product_equals_the_norm_then_the_product(bits: int, group_size: int | None, offsets: str,
                                                         residual: bool, dtype: torch.dtype) -> None:
    """gemv_normed = fused_add_rms_norm_reference (Llama's form) then the product: the new residual stream bit for
    bit, the product within the kernel's activation rounding of float64 math on the reference's normalised row,
    plus one ulp of that row per element (the kernel sums the squares in another order, so its scale may differ in
    the last float32 bits and round a few elements the other way: normed_allowance). K up to the block's limit."""
    from trident.kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_reference

    for n, k in ((515, 2048), (37, 4096), (300, 8192), (64, 16384)):
        w, x, r, norm_weight, b = normed_inputs(n, k, bits, group_size, offsets, residual, dtype)
        args = (x.cuda(), None if r is None else r.cuda(), norm_weight.cuda())
        assert gemv_cuda.takes_normed(*args, w, b.cuda())
        y, stream = gemv_cuda.gemv_normed(*args, 1e-5, w, b.cuda())
        if residual:
            h, expected_stream = fused_add_rms_norm_reference(x, r, norm_weight, 1e-5, False)
        else:
            h, expected_stream = rms_norm_reference(x, norm_weight, 1e-5, False), x
        assert torch.equal(stream.cpu(), expected_stream)
        emulated, allowance = normed_allowance(h, w, b, dtype)
        excess = ((y.cpu().double() - emulated).abs() / allowance).max().item()
        assert excess <= 1, f"N={n} K={k} int{bits} residual={residual} {dtype}: {excess:.2f}x the allowance"
    too_long = torch.zeros(1, gemv_cuda.library().tq_gemv_norm_max_k() + 32, dtype=dtype, device="cuda")
    wide = cuda_weight(random_weight(8, 4, too_long.shape[1], None, False, torch.Generator().manual_seed(0)))
    assert gemv_cuda.takes(too_long, wide, None)
    assert not gemv_cuda.takes_normed(too_long, None, too_long[0], wide, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("bits,group_size,offsets", [(8, None, "none"), (4, 128, "zero_point"),
                                                     (4, 64, "per_group")])
def test_gated_product_equals_the_norm_the_product_and_the_activation(bits: int, group_size: int | None,
                                                                      offsets: str, activation: str,
                                                                      dtype: torch.dtype) -> None:
    """gemv_normed with an activation over a fused gate|up weight [2I, K] = act(gate) * up of float64 math on the
    norm reference's row (its two-stage rounding): within the output's rounding of |y| plus what the gate's and
    the up's own allowances (as in the test above) can move act(gate) * up (|act'| <= 1.13 for these three)."""
    from trident.kernels.rms_norm import fused_add_rms_norm_reference

    act64 = gemv_cuda.REFERENCE_ACTIVATIONS[activation]
    for inter, k in ((259, 2048), (1024, 4096)):
        w, x, r, norm_weight, b = normed_inputs(2 * inter, k, bits, group_size, offsets, True, dtype)
        args = (x.cuda(), r.cuda(), norm_weight.cuda())
        assert gemv_cuda.takes_normed(*args, w, b.cuda(), activation)
        y, stream = gemv_cuda.gemv_normed(*args, 1e-5, w, b.cuda(), activation)
        h, expected_stream = fused_add_rms_norm_reference(x, r, norm_weight, 1e-5, False)
        assert y.shape == (1, inter) and torch.equal(stream.cpu(), expected_stream)
        sums, own = normed_allowance(h, w, b, dtype)
        gate, up = sums.chunk(2, dim=-1)
        gate_allowance, up_allowance = own.chunk(2, dim=-1)
        emulated = act64(gate) * up
        allowance = (RTOL[dtype] * emulated.abs() + 1.13 * gate_allowance * (up.abs() + up_allowance)
                     + act64(gate).abs() * up_allowance + 2**-24)
        excess = ((y.cpu().double() - emulated).abs() / allowance).max().item()
        assert excess <= 1, f"I={inter} K={k} int{bits} {activation} {dtype}: {excess:.2f}x the allowance"
    even, odd = (cuda_weight(random_weight(8, rows, 64, None, False, torch.Generator().manual_seed(1)))
                 for rows in (6, 7))
    row, weight = args[0][:, :64], args[2][:64]
    assert gemv_cuda.takes_normed(row, None, weight, even, None, "silu")
    assert not gemv_cuda.takes_normed(row, None, weight, odd, None, "silu")
    assert not gemv_cuda.takes_normed(row, None, weight, even, None, "relu")


@pytest.mark.gpu
def test_engine_decode_with_fused_norms_agrees_with_the_triton_kernel(tiny_int4_llama_dir, monkeypatch) -> None:
    """The same engines as above, counting the products that took their layer's norm along (every dense layer's
    input and post-attention norms at batch 1; the MLP's gate|up takes its activation too)."""
    assert_cuda_kernels_agree_with_triton(
        tiny_int4_llama_dir, [(7 * i + 3) % 256 for i in range(21)], gemv_cuda, "gemv_normed",
        "batch-1 quantized products: CUDA dp4a kernel", "batch-1 quantized products: Triton (TRIDENT_NO_NATIVE=1)",
        monkeypatch)
