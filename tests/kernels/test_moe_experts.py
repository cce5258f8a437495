"""The fused MoE experts kernels: the routing alignment kernel equals its torch reference exactly; the fused backend
equals float64 math token by token, and the torch reference backend within the dtypes' rounding, over random
routings (1 to 200 tokens, top-1 / 2 / 8 of 4 / 8 / 64 experts, hidden and intermediate sizes multiples of 16 on and
off the tiles, experts that get no token, every token on one expert) and every row-block size; a decode step is
capturable in a CUDA graph, replays equal the eager call, and nothing in it waits for the device. Every tile
variant the benchmark sweeps computes the same. int8 and int4 experts (trident/moe/quant.py) likewise: the fused
kernels on the codes and scales equal float64 math on the dequantized weights, and the torch backend on the same
codes.

Shapes stay small so that Triton's CPU interpreter runs them too (TRITON_INTERPRET=1, see conftest.py): there,
``-k float16`` keeps to the dtype the interpreter multiplies natively (bfloat16 runs through conftest's widening)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from elementwise_checks import dtype_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.kernels.bench_moe_experts import VARIANTS, tiles_name
from trident.kernels.moe_align import align_routing
from trident.kernels.moe_experts import GemmTiles, MoeTiles, fused_experts, moe_tiles
from trident.moe.align import align_routing_reference
from trident.moe.experts import TorchExperts
from trident.moe.experts_triton import TritonExperts
from trident.moe.quant import dequantize_experts, quantize_experts

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
ROW_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
"""Per token, ||out - exact|| / ||exact|| against float64 math on the same (rounded) inputs: the roundings of the
intermediate, of each weighted expert output and of the sum to the dtype (about 2^-9 / 2^-12 each for bfloat16 /
float16, a whole unit under the interpreter's truncating bfloat16), allowed several times over. An expert missing
from a token's sum, counted twice, or a wrong expert's weights is off by 10% or more."""
TORCH_ROW_TOLERANCE = {torch.bfloat16: 6e-2, torch.float16: 8e-3}
"""Per token against TorchExperts, which also rounds the gate|up product and adds the k outputs in the dtype."""
ROUTINGS = ("random", "some_idle", "one_hot")


def random_routing(num_tokens: int, top_k: int, num_experts: int, how: str, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int64 [T, k]), ids distinct per token. random: uniform over the experts;
    some_idle: from the first max(k, E / 4) experts only, so most experts get no token; one_hot: expert E - 1 in
    every token's choice (with k = 1 every token goes to it)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if how == "some_idle":
        scores[:, max(top_k, num_experts // 4):] = -1.0
    elif how == "one_hot":
        scores[:, -1] = 2.0
    ids = scores.topk(top_k, dim=1).indices
    ids = ids[:, torch.randperm(top_k, generator=gen)]  # the slot order is arbitrary
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return weights / weights.sum(dim=1, keepdim=True), ids


def random_experts(num_experts: int, hidden: int, inter: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """gate_up [E, 2I, H], down [E, H, I] (float32) scaled so that gate, up and the outputs are of order 1."""
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    return gate_up, down


def exact_experts(hidden, weights, ids, gate_up, down, activation: str = "silu") -> torch.Tensor:
    """float64 [T, H]: sum over each token's k experts of weight * down(act(gate x) * up x), expert by expert over
    the (token, slot) pairs routed to it."""
    x, gate_up, down = hidden.cpu().double(), gate_up.cpu().double(), down.cpu().double()
    ids, weights = ids.cpu(), weights.cpu().double()
    inter = down.shape[2]
    act = {"silu": F.silu, "gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh"), "gelu": F.gelu}[activation]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in ids.unique().tolist():
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[tokens] @ gate_up[e].T).split(inter, dim=1)
        out.index_add_(0, tokens, weights[tokens, slots, None] * ((act(gate) * up) @ down[e].T))
    return out


def assert_rows_close(out: torch.Tensor, exact: torch.Tensor, tolerance: float, what: str) -> None:
    """Every token's row within ``tolerance`` of ``exact`` relative to its norm (rows of a tenth of the median norm
    or less are held to a tenth of the median norm)."""
    assert out.shape == exact.shape, what
    assert not out.isnan().any(), f"{what}: NaN in the output (an unwritten row?)"
    norms = exact.norm(dim=1)
    floor = 0.1 * norms.median()
    rel = (out.cpu().double() - exact).norm(dim=1) / torch.maximum(norms, floor)
    worst = int(rel.argmax())
    assert rel[worst] < tolerance, f"{what}: token {worst} off by {rel[worst]:.2e} (>= {tolerance:.0e})"


def check_experts(device, num_tokens: int, top_k: int, num_experts: int, hidden_size: int, inter: int,
                  how: str, dtype: torch.dtype, seed: int, activation: str = "silu",
                  tiles: MoeTiles | None = None, bits: int = 16, group_size: int | None = None) -> None:
    """The fused kernels against float64 math and TorchExperts; ``bits`` 8 / 4: on int8 / int4 codes and scales of the
    experts (int4 in groups of ``group_size``; the float64 math on the codes dequantized in float64)."""
    gen = torch.Generator().manual_seed(seed)
    weights, ids = random_routing(num_tokens, top_k, num_experts, how, gen)
    gate_up, down = random_experts(num_experts, hidden_size, inter, gen)
    scales = {}
    if bits != 16:
        (gate_up, gate_up_scales), (down, down_scales) = (quantize_experts(w, bits, group_size)
                                                          for w in (gate_up, down))
        scales = {"gate_up_scales": gate_up_scales.to(device), "down_scales": down_scales.to(device)}
        exact_weights = (dequantize_experts(gate_up, gate_up_scales, torch.float64),
                         dequantize_experts(down, down_scales, torch.float64))
    else:
        gate_up, down = gate_up.to(dtype), down.to(dtype)
        exact_weights = (gate_up, down)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    what = (f"T={num_tokens} k={top_k} E={num_experts} H={hidden_size} I={inter} {how} {dtype_id(dtype)} "
            f"{activation} {'' if bits == 16 else f'int{bits} g{group_size} '}"
            f"{tiles or moe_tiles(num_tokens * top_k, num_experts, hidden_size, inter)}")
    args = (hidden.to(device), weights.to(device), ids.to(device), gate_up.to(device), down.to(device), activation)
    out = fused_experts(*args, tiles=tiles, **scales)
    assert out.dtype == dtype and out.device.type == device.type
    exact = exact_experts(hidden, weights, ids, *exact_weights, activation)
    assert_rows_close(out, exact, ROW_TOLERANCE[dtype], what)
    reference = TorchExperts().forward(*args, **scales)
    assert_rows_close(out, reference.cpu().double(), TORCH_ROW_TOLERANCE[dtype], f"{what} (against TorchExperts)")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 200), top_k=st.sampled_from([1, 2, 8]), num_experts=st.sampled_from([4, 8, 64]),
       hidden_size=st.sampled_from([16, 48, 64, 80, 128]), inter=st.sampled_from([16, 32, 48, 96]),
       how=st.sampled_from(ROUTINGS), seed=st.integers(0, 2**16))
def test_fused_experts_match_float64_and_torch_reference(kernel_device, dtype, num_tokens, top_k, num_experts,
                                                         hidden_size, inter, how, seed) -> None:
    top_k = min(top_k, num_experts)
    check_experts(kernel_device, num_tokens, top_k, num_experts, hidden_size, inter, how, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 200), top_k=st.sampled_from([1, 2, 8]), num_experts=st.sampled_from([4, 8, 64]),
       hidden_size=st.sampled_from([16, 48, 64, 80, 128]), inter=st.sampled_from([16, 32, 48, 96]),
       how=st.sampled_from(ROUTINGS), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_match_float64_on_dequantized_weights_and_torch_reference(kernel_device, bits, dtype,
                                                                                    num_tokens, top_k, num_experts,
                                                                                    hidden_size, inter, how,
                                                                                    seed) -> None:
    """int8 codes and per-row scales, or int4 codes and per-group scales (groups of 32 where they divide both K, else
    per channel), through the fused kernels (moe_tiles' tiles) equal float64 math on the dequantized weights, and
    TorchExperts on the same codes."""
    top_k = min(top_k, num_experts)
    group = 32 if bits == 4 and hidden_size % 32 == inter % 32 == 0 else None
    check_experts(kernel_device, num_tokens, top_k, num_experts, hidden_size, inter, how, dtype, seed, bits=bits,
                  group_size=group)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_fused_experts_other_activations(kernel_device, dtype, activation) -> None:
    check_experts(kernel_device, 9, 2, 8, 64, 48, "random", dtype, seed=5, activation=activation)


TILE_VARIANTS = [
    MoeTiles(16, GemmTiles(16, 256, 4, 4), GemmTiles(64, 64, 4, 4)),
    MoeTiles(16, GemmTiles(32, 128, 4, 4), GemmTiles(32, 128, 4, 4)),
    MoeTiles(32, GemmTiles(64, 64, 4, 3), GemmTiles(64, 32, 4, 3)),
    MoeTiles(64, GemmTiles(64, 64, 4, 3), GemmTiles(128, 64, 4, 3)),
    MoeTiles(128, GemmTiles(128, 64, 8, 3), GemmTiles(64, 64, 4, 3)),
]
"""Every row-block size with decode and matrix-multiply tiles, K tiles on and off H = 80 / I = 48."""


@pytest.mark.parametrize("tiles", TILE_VARIANTS, ids=lambda t: f"m{t.block_m}_n{t.gate_up.block_n}_{t.down.block_n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_experts_every_tile_variant(kernel_device, dtype, tiles) -> None:
    check_experts(kernel_device, 37, 2, 8, 80, 48, "some_idle", dtype, seed=11, tiles=tiles)


@pytest.mark.parametrize("tiles", TILE_VARIANTS, ids=lambda t: f"m{t.block_m}_n{t.gate_up.block_n}_{t.down.block_n}")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_every_tile_variant(kernel_device, tiles, bits) -> None:
    """K tiles on and off H = 80 / I = 48 (masked code loads), columns off the tiles (masked scale loads); int4 per
    channel here."""
    check_experts(kernel_device, 37, 2, 8, 80, 48, "some_idle", torch.float16, seed=12, tiles=tiles, bits=bits)


@pytest.mark.parametrize("tiles", TILE_VARIANTS, ids=lambda t: f"m{t.block_m}_n{t.gate_up.block_n}_{t.down.block_n}")
def test_int4_groups_cut_the_k_tiles(kernel_device, tiles) -> None:
    """int4 in groups of 32: every K tile wider than a group is cut to it (each tile takes one scale per row)."""
    check_experts(kernel_device, 37, 2, 8, 128, 64, "some_idle", torch.bfloat16, seed=14, tiles=tiles, bits=4,
                  group_size=32)


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 128)])
@pytest.mark.parametrize("num_tokens", [1, 40, 300])
def test_quantized_tiles_of_each_regime(kernel_device, num_tokens, bits, group_size) -> None:
    """moe_tiles' choices (decode, 64- and 128-row blocks) on int8 / int4 codes, on a layer whose K fills the tiles."""
    tiles = moe_tiles(num_tokens * 2, 4, 256, 256)
    assert tiles.block_m == {1: 16, 40: 64, 300: 128}[num_tokens]
    check_experts(kernel_device, num_tokens, 2, 4, 256, 256, "random", torch.float16, seed=num_tokens, bits=bits,
                  group_size=group_size)


@pytest.mark.parametrize("tiles", VARIANTS, ids=tiles_name)
def test_every_benchmark_variant(kernel_device, tiles) -> None:
    """The tiles the benchmark sweeps (trident/kernels/bench_moe_experts.py), on a small layer: K tiles wider than
    H = 128 / I = 64 too."""
    check_experts(kernel_device, 24, 8, 16, 128, 64, "random", torch.float16, seed=13, tiles=tiles)


def test_decode_step_of_the_target_layer_shape(kernel_device) -> None:
    """Batch 1 through 128 experts, top-8 (Qwen3-30B-A3B's routing, smaller matrices): 8 row blocks, all used."""
    tiles = moe_tiles(8, 128, 256, 64)
    assert tiles.block_m == 16
    check_experts(kernel_device, 1, 8, 128, 256, 64, "random", torch.float16, seed=3)
    gen = torch.Generator().manual_seed(0)
    aligned = align_routing(random_routing(1, 8, 128, "random", gen)[1].to(kernel_device), 128, 16)
    assert aligned.block_experts.numel() == 8 and (aligned.block_experts >= 0).all()


def test_no_tokens(kernel_device) -> None:
    gate_up, down = random_experts(4, 32, 16, torch.Generator().manual_seed(0))
    hidden = torch.empty(0, 32, dtype=torch.float16, device=kernel_device)
    out = fused_experts(hidden, torch.empty(0, 2, device=kernel_device),
                        torch.empty(0, 2, dtype=torch.long, device=kernel_device),
                        gate_up.half().to(kernel_device), down.half().to(kernel_device), "silu")
    assert out.shape == (0, 32)


def test_backend_class_runs_the_kernels(kernel_device) -> None:
    gen = torch.Generator().manual_seed(7)
    weights, ids = random_routing(5, 2, 8, "random", gen)
    gate_up, down = (w.half() for w in random_experts(8, 32, 16, gen))
    hidden = torch.randn(5, 32, generator=gen).half()
    backend = TritonExperts()
    assert backend.supports_cuda_graphs
    out = backend.forward(hidden.to(kernel_device), weights.to(kernel_device), ids.to(kernel_device),
                          gate_up.to(kernel_device), down.to(kernel_device), "silu")
    assert_rows_close(out, exact_experts(hidden, weights, ids, gate_up, down), ROW_TOLERANCE[torch.float16],
                      "TritonExperts")


@pytest.mark.parametrize("bits", [8, 4])
def test_backend_class_runs_quantized_experts(kernel_device, bits) -> None:
    gen = torch.Generator().manual_seed(8)
    weights, ids = random_routing(5, 2, 8, "random", gen)
    (gate_up, gate_up_scales), (down, down_scales) = (quantize_experts(w, bits) for w in random_experts(8, 32, 16, gen))
    hidden = torch.randn(5, 32, generator=gen).half()
    on = {"device": kernel_device}
    out = TritonExperts().forward(hidden.to(**on), weights.to(**on), ids.to(**on), gate_up.to(**on), down.to(**on),
                                  "silu", gate_up_scales=gate_up_scales.to(**on), down_scales=down_scales.to(**on))
    exact = exact_experts(hidden, weights, ids, dequantize_experts(gate_up, gate_up_scales, torch.float64),
                          dequantize_experts(down, down_scales, torch.float64))
    assert_rows_close(out, exact, ROW_TOLERANCE[torch.float16], f"TritonExperts int{bits}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 300), top_k=st.sampled_from([1, 2, 6, 8]),
       num_experts=st.sampled_from([4, 8, 60, 64, 128, 256]), block_m=st.sampled_from([16, 32, 64, 128]),
       how=st.sampled_from(ROUTINGS), seed=st.integers(0, 2**16))
def test_alignment_kernel_equals_reference(kernel_device, num_tokens, top_k, num_experts, block_m, how,
                                           seed) -> None:
    """Bit for bit, over one to many chunks of pairs, expert counts that are not powers of two."""
    top_k = min(top_k, num_experts)
    _, ids = random_routing(num_tokens, top_k, num_experts, how, torch.Generator().manual_seed(seed))
    ids = ids.to(kernel_device)
    out = align_routing(ids, num_experts, block_m)
    ref = align_routing_reference(ids, num_experts, block_m)
    for name in ("sorted_pairs", "block_experts", "num_blocks"):
        assert torch.equal(getattr(out, name).cpu(), getattr(ref, name).cpu()), name


@pytest.mark.parametrize("bits", [16, 8, 4], ids=["bf16", "int8", "int4"])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_decode_step_is_capturable_and_replays_match_eager(num_tokens: int, bits: int) -> None:
    """A graph of the fused experts (bfloat16, int8 or int4-g128 weights) replays with new hidden states and a new
    routing copied into its inputs and gives the eager result; the eager call never synchronises with the host (CUDA's
    sync debug mode would raise)."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(num_tokens)
    num_experts, top_k, hidden_size, inter = 64, 8, 256, 128
    gate_up, down = random_experts(num_experts, hidden_size, inter, gen)
    scales = {}
    quantized = bits != 16
    if quantized:
        group = 128 if bits == 4 else None
        (gate_up, gate_up_scales), (down, down_scales) = (quantize_experts(w, bits, group) for w in (gate_up, down))
        scales = {"gate_up_scales": gate_up_scales.to(device), "down_scales": down_scales.to(device)}
        exact_weights = (dequantize_experts(gate_up, gate_up_scales), dequantize_experts(down, down_scales))
    gate_up, down = (w.to(device) if quantized else w.to(device, torch.bfloat16) for w in (gate_up, down))
    if not quantized:
        exact_weights = (gate_up, down)

    def inputs():
        weights, ids = random_routing(num_tokens, top_k, num_experts, "random", gen)
        hidden = torch.randn(num_tokens, hidden_size, generator=gen)
        return hidden.to(device, torch.bfloat16), weights.to(device), ids.to(device)

    static = inputs()

    def run(*args):
        return TritonExperts().forward(*args, **scales)

    torch.cuda.set_sync_debug_mode("error")
    try:
        run(*static, gate_up, down, "silu")  # compiles the kernels too
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(*static, gate_up, down, "silu")
        torch.cuda.current_stream().wait_stream(stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = run(*static, gate_up, down, "silu")
    for _ in range(3):
        new = inputs()
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        graph.replay()
        eager = run(*new, gate_up, down, "silu")
        assert torch.equal(graphed, eager)
        assert_rows_close(eager, exact_experts(*new, *exact_weights), ROW_TOLERANCE[torch.bfloat16], "eager")
