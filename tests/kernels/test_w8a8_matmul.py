"""The W8A8 kernels (trident/kernels/w8a8_matmul.py) against float64: per-token quantization (bit for bit the
torch reference's codes and scales, and every element within half a step of x), the int8 product with its scale
epilogue (against float64 on the same codes, within the output's rounding), on random shapes with odd M, and K
and N off every tile; W8A8Linear's kernel path against float64 x W^T within the quantization bound. The bounds
are documented in tests/quant/w8a8_checks.py.

Shapes stay small so that Triton's CPU interpreter runs them too (TRITON_INTERPRET=1, see conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from elementwise_checks import dtype_id

from trident.kernels.bench_w8a8 import VARIANTS
from trident.kernels.w8a8_matmul import DECODE_MAX_ROWS, W8A8Tiles, quantize_rows, w8a8_config, w8a8_matmul
from trident.models import ops
from trident.models.layers import Linear
from trident.quant.w8a8 import W8A8Linear, quantize_per_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))
from w8a8_checks import (  # noqa: E402
    assert_product_matches,
    assert_quantized_rows,
    assert_w8a8_within_bound,
)

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
"""VARIANTS: every tile shape the benchmark sweeps (trident/kernels/bench_w8a8.py), which includes every one
w8a8_config chooses (test_config_depends_on_shapes_only)."""


def _x(m: int, k: int, dtype: torch.dtype, g: torch.Generator, device: torch.device,
       row_offset: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (0.01 .. 10) with a few outlier channels (x30), as activations have;
    a view into wider rows when row_offset."""
    x = torch.randn(m, k + 2 * row_offset, generator=g) * 10 ** (torch.rand(m, 1, generator=g) * 3 - 2)
    x[:, :: 7] *= 30
    return x.to(dtype).to(device)[:, row_offset: row_offset + k]


def _operands(m: int, n: int, k: int, g: torch.Generator, device: torch.device):
    x_codes = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x_scales = 10 ** (torch.rand(m, generator=g) * 3 - 4)
    w_scales = 10 ** (torch.rand(n, generator=g) * 2 - 4)
    return [t.to(device) for t in (x_codes, x_scales, w_codes, w_scales)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 7), (5, 300), (3, 2500), (17, 64)], ids=lambda s: f"M{s[0]}_K{s[1]}")
def test_quantize_rows_equals_the_reference_bit_for_bit(kernel_device, shape, dtype: torch.dtype) -> None:
    """Codes and scales equal quantize_per_token's exactly and pass the float64 checks; K = 2500 is more than
    one block of the row; a zero row gets scale 0 and codes 0."""
    m, k = shape
    g = torch.Generator().manual_seed(m * 10_000 + k)
    x = _x(m, k, dtype, g, kernel_device)
    x[m // 2] = 0
    codes, scales = quantize_rows(x)
    ref_codes, ref_scales = quantize_per_token(x.cpu())
    what = f"M={m} K={k} {dtype_id(dtype)}"
    assert torch.equal(scales.cpu(), ref_scales), what
    assert torch.equal(codes.cpu(), ref_codes), what
    assert_quantized_rows(codes, scales, x, what)


def test_quantize_rows_strided(kernel_device) -> None:
    for row_offset in (3, 8):
        x = _x(6, 130, torch.bfloat16, torch.Generator().manual_seed(row_offset), kernel_device, row_offset)
        codes, scales = quantize_rows(x)
        assert_quantized_rows(codes, scales, x, f"row_offset={row_offset}")
        assert torch.equal(codes.cpu(), quantize_per_token(x.cpu())[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 50, 130])
def test_product_against_float64(kernel_device, m: int, dtype: torch.dtype) -> None:
    """Decode and large-M tiles; N and K off every tile (37 / 129 columns, K 77 / 200 / 300)."""
    for n, k, bias in ((37, 200, True), (129, 77, False), (45, 300, m % 2 == 1)):
        g = torch.Generator().manual_seed(m * 1000 + n + k)
        x_codes, x_scales, w_codes, w_scales = _operands(m, n, k, g, kernel_device)
        b = torch.randn(n, generator=g).to(dtype).to(kernel_device) if bias else None
        y = w8a8_matmul(x_codes, x_scales, w_codes, w_scales, b, dtype)
        assert_product_matches(y, x_codes, x_scales, w_codes, w_scales, b, dtype,
                               f"M={m} N={n} K={k} {dtype_id(dtype)} bias={bias}")


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: "m{}_n{}_k{}_w{}_st{}".format(*c))
def test_every_tile_variant(kernel_device, config: W8A8Tiles) -> None:
    """Each tile shape with its row tile filled and partial, N and K tails."""
    for m in (config.block_m, max(1, config.block_m - 3)):
        g = torch.Generator().manual_seed(sum(config) + m)
        x_codes, x_scales, w_codes, w_scales = _operands(m, 70, 150, g, kernel_device)
        b = torch.randn(70, generator=g).to(torch.bfloat16).to(kernel_device)
        y = w8a8_matmul(x_codes, x_scales, w_codes, w_scales, b, torch.bfloat16, config=config)
        assert_product_matches(y, x_codes, x_scales, w_codes, w_scales, b, torch.bfloat16, f"{config} M={m}")


def test_no_rows(kernel_device) -> None:
    x = torch.zeros(0, 64, dtype=torch.bfloat16, device=kernel_device)
    codes, scales = quantize_rows(x)
    assert codes.shape == (0, 64) and scales.shape == (0,)
    w = torch.zeros(9, 64, dtype=torch.int8, device=kernel_device)
    assert w8a8_matmul(codes, scales, w, torch.ones(9, device=kernel_device)).shape == (0, 9)


def test_config_depends_on_shapes_only(kernel_device) -> None:
    """Powers of two, int8 mma K (>= 32), decode tiles up to DECODE_MAX_ROWS rows, one config for every row
    count of a decode bucket (the engine's CUDA-graph buckets)."""
    for n, k in [(37, 200), (1536, 576), (6144, 4096), (4096, 14336), (151936, 1024)]:
        for m in (1, 3, 16, 17, 64, 65, 256, 4096):
            config = w8a8_config(m, n, k)
            assert all(c & (c - 1) == 0 for c in config[:3]), config
            assert config.block_k >= 32 and config.block_m >= 16, config
            assert (config.block_m == 16) == (m <= DECODE_MAX_ROWS), config
            assert config in VARIANTS, config
        assert len({w8a8_config(m, n, k) for m in range(1, DECODE_MAX_ROWS + 1)}) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_w8a8_linear_kernel_path_within_the_bound(kernel_device, monkeypatch, dtype: torch.dtype) -> None:
    """W8A8Linear on CUDA runs both kernels and stays within the quantization bound of float64 x W^T + b (1, 7,
    40 rows, 3-D input); under the interpreter the layer is on the CPU with uses_kernels patched to say yes."""
    import trident.kernels.w8a8_matmul as kernel_module

    g = torch.Generator().manual_seed(5)
    layer = Linear(200, 43, bias=True)
    layer.weight.data = (torch.randn(43, 200, generator=g) * 0.05).to(dtype)
    layer.bias.data = torch.randn(43, generator=g).to(dtype)
    qlayer = W8A8Linear.from_linear(layer.to(kernel_device))
    if kernel_device.type == "cpu":
        monkeypatch.setattr(ops, "uses_kernels", lambda x: True)
    calls = []
    for fn in ("quantize_rows", "w8a8_matmul"):
        original = getattr(kernel_module, fn)
        monkeypatch.setattr(kernel_module, fn, lambda *a, _f=original, _n=fn, **kw: calls.append(_n) or _f(*a, **kw))
    for rows in (1, 7, 40):
        x = _x(rows, 200, dtype, g, kernel_device).reshape(1, rows, 200)
        calls.clear()
        y = qlayer(x)
        what = f"{dtype_id(dtype)} rows={rows}"
        assert calls == ["quantize_rows", "w8a8_matmul"], f"{what}: {calls}"
        assert y.shape == (1, rows, 43) and y.dtype == dtype
        assert_w8a8_within_bound(y[0], x[0], layer.weight, qlayer.scales, layer.bias, what)
