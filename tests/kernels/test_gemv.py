"""The matrix-vector kernel (y = x W^T + b for 1 to GEMV_MAX_ROWS rows of x) equals float64 math on the same
inputs within the output dtype's rounding: every row count, N and K off the tiles (1 to 4099), with and without
bias, bfloat16 and float16 (and float32), strided and misaligned rows of x, every tile variant the benchmark
sweeps; its torch reference does too. The models' linear() sends a few rows on CUDA to it and more rows, other
dtypes, strided weights and CPU tensors to the paths it took before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from elementwise_checks import dtype_id

from trident.kernels import gemv as gemv_module
from trident.kernels.bench_gemv import VARIANTS
from trident.kernels.gemv import GEMV_MAX_ROWS, gemv, gemv_config, gemv_reference
from trident.models import layers, ops

pytestmark = pytest.mark.gpu

# Allowed error per element against float64 math on the same inputs: RTOL * (|exact| + rss), rss the
# root-sum-square of the row's K products (and the bias). RTOL * |exact| is the rounding of the output to its
# dtype: half a unit in the last place, at most 2^-8 / 2^-11 of |y| for bfloat16 / float16, allowed twice
# that (Triton's CPU interpreter truncates to bfloat16: a whole unit). RTOL * rss is the same for outputs
# that cancel to near zero, and covers the float32 accumulation (~sqrt(K) 2^-24 rss; tensor cores' truncating
# adds a few times that), 1000x smaller. A product missing or counted twice moves an output by ~rss / sqrt(K),
# 1.6% of rss at K = 4099 against 2^-7 = 0.8%: beyond the allowance for some output of every shape tested.
# float32: the products are exact; the accumulation is what remains.
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-16}
ATOL = 2**-24
"""float16's subnormal spacing: outputs that cancel below its normal range."""

SHAPES = [(1, 1), (1, 4099), (17, 17), (17, 1000), (100, 1000), (1000, 100), (4099, 17)]
"""(N, K): a single element, partial tiles, many tiles with a tail; no K a multiple of any K tile."""
DTYPES = [torch.bfloat16, torch.float16]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int, device: torch.device,
            row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [m, k] (a view into wider rows starting ``row_offset`` elements in, if given; rows of very
    different magnitudes), weight [n, k] ~ N(0, 0.05^2), bias [n] ~ N(0, 1) or None."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(m, 1, generator=g) * 3 - 2)  # 0.01 .. 10
    x = (torch.randn(m, k + 2 * row_offset, generator=g) * scales).to(dtype).to(device)
    x = x[:, row_offset: row_offset + k]
    weight = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, weight, b


def assert_matches_math(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        what: str) -> None:
    """y against float64 x W^T + b, element by element (see RTOL)."""
    xd, wd = x.double(), weight.double()
    exact = xd @ wd.T
    squares = (xd * xd) @ (wd * wd).T
    if bias is not None:
        exact = exact + bias.double()
        squares = squares + bias.double() ** 2
    assert y.shape == exact.shape and y.dtype == x.dtype, f"{what}: {y.dtype} {tuple(y.shape)}"
    assert not y.isnan().any(), f"{what}: NaN in the output (an unwritten element?)"
    allowed = RTOL[y.dtype] * (exact.abs() + squares.sqrt()) + ATOL
    excess = ((y.double() - exact).abs() / allowed).max().item() if y.numel() else 0.0
    assert excess <= 1, f"{what}: an element is off by {excess:.2f}x its allowance"


def _check(device: torch.device, m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int,
           row_offset: int = 0, config: tuple[int, int, int, int] | None = None) -> None:
    x, weight, b = _inputs(m, n, k, dtype, bias, seed, device, row_offset)
    what = f"gemv M={m} N={n} K={k} {dtype_id(dtype)} bias={bias} row_offset={row_offset} config={config}"
    x_before = x.clone()
    assert_matches_math(gemv(x, weight, b, config=config), x, weight, b, what)
    assert torch.equal(x, x_before), f"{what}: x changed"
    assert_matches_math(gemv_reference(x, weight, b), x, weight, b, f"{what} (the reference)")


@pytest.mark.parametrize("m", range(1, GEMV_MAX_ROWS + 1))
def test_every_row_count(kernel_device, m: int) -> None:
    _check(kernel_device, m, 100, 1000, torch.bfloat16, bias=m % 2 == 1, seed=m)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,k", SHAPES)
def test_shapes(kernel_device, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    m = 1 + (n + k) % GEMV_MAX_ROWS  # a different row count (and row bucket) per shape
    _check(kernel_device, m, n, k, dtype, bias, seed=n * 7 + k)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("row_offset", [8, 3])
def test_strided_rows(kernel_device, row_offset: int, dtype: torch.dtype) -> None:
    """Rows of x inside wider rows (stride K + 2 * offset); an odd offset also misaligns them."""
    _check(kernel_device, 5, 100, 1000, dtype, bias=True, seed=row_offset, row_offset=row_offset)
    _check(kernel_device, 1, 17, 4099, dtype, bias=False, seed=row_offset + 1, row_offset=row_offset)


def test_float32(kernel_device) -> None:
    _check(kernel_device, 3, 100, 1000, torch.float32, bias=True, seed=32)


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: "n{}_k{}_w{}_st{}".format(*c))
def test_benchmark_variants(kernel_device, config: tuple[int, int, int, int]) -> None:
    """Every tile shape the benchmark sweeps (gemv_config may be tuned to any): K and N tails, two row buckets."""
    _check(kernel_device, 3, 100, 1000, torch.bfloat16, bias=True, seed=sum(config), config=config)
    _check(kernel_device, 16, 33, 300, torch.float16, bias=False, seed=sum(config) + 1, config=config)


def test_no_rows(kernel_device) -> None:
    x, weight, _ = _inputs(1, 17, 40, torch.bfloat16, False, 0, kernel_device)
    assert gemv(x[:0], weight).shape == (0, 17)


def test_config_depends_on_shapes_only(kernel_device) -> None:
    """Tiles that compile for every shape (powers of two, K tiles of at least the mma's 16), the same for every
    row count: a new row count never changes the launch beyond the row bucket."""
    for n, k in SHAPES + [(6144, 4096), (4096, 14336), (128256, 4096), (1024, 3072)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            block_n, block_k, num_warps, num_stages = config = gemv_config(1, n, k, dtype)
            assert all(c & (c - 1) == 0 for c in (block_n, block_k, num_warps)), config
            assert block_n >= 8 and block_k >= 16 and num_stages >= 2, config
            assert all(gemv_config(m, n, k, dtype) == config for m in range(2, GEMV_MAX_ROWS + 1))


def test_linear_takes_the_kernel_for_few_rows(kernel_device, monkeypatch) -> None:
    """linear() on a CUDA tensor: the kernel for 1 to GEMV_MAX_ROWS rows of a 16-bit x and a contiguous weight
    of its dtype with 16-byte aligned rows, F.linear otherwise. Under the interpreter the tensors are on the
    CPU, where uses_kernels is patched to say yes."""
    if kernel_device.type == "cpu":
        monkeypatch.setattr(ops, "uses_kernels", lambda x: True)
    calls = []
    kernel, cublas = gemv_module.gemv, F.linear
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: calls.append("gemv") or kernel(*a, **kw))
    monkeypatch.setattr(F, "linear", lambda *a, **kw: calls.append("F.linear") or cublas(*a, **kw))

    def check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, path: str) -> None:
        what = f"linear M={x.shape[0]} K={x.shape[1]} {dtype_id(x.dtype)} stride={x.stride()}"
        calls.clear()
        y = layers.linear(x, weight, bias)
        assert calls == [path], f"{what}: {calls} instead of {path}"
        assert_matches_math(y, x, weight, bias, what)

    for dtype in DTYPES:
        for m, bias in ((1, False), (GEMV_MAX_ROWS, True), (GEMV_MAX_ROWS + 1, False)):
            check(*_inputs(m, 40, 64, dtype, bias, m, kernel_device), "gemv" if m <= GEMV_MAX_ROWS else "F.linear")
        check(*_inputs(2, 40, 72, dtype, False, 5, kernel_device), "F.linear")  # K not a multiple of 16
        check(*_inputs(2, 40, 64, dtype, False, 6, kernel_device, row_offset=3), "F.linear")  # misaligned rows
        check(*_inputs(2, 40, 64, dtype, False, 7, kernel_device, row_offset=8), "gemv")  # strided, aligned
        x, weight, _ = _inputs(2, 40, 64, dtype, False, 8, kernel_device)
        check(x, weight.T.contiguous().T, None, "F.linear")  # a strided weight
    check(*_inputs(2, 40, 64, torch.float32, True, 9, kernel_device), "F.linear")


def test_linear_on_the_cpu_is_unchanged(kernel_device, monkeypatch) -> None:
    """CPU tensors never reach the kernel: one bfloat16 row still goes through torch.mv, bit for bit."""
    calls = []
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: calls.append("gemv"))
    x, weight, b = _inputs(1, 40, 64, torch.bfloat16, True, 3, torch.device("cpu"))
    y = layers.linear(x, weight, b)
    assert not calls
    assert torch.equal(y, torch.mv(weight, x[0]).unsqueeze(0) + b)
    x, weight, _ = _inputs(3, 40, 64, torch.float16, False, 4, torch.device("cpu"))
    assert torch.equal(layers.linear(x, weight), F.linear(x, weight)) and not calls
