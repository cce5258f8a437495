"""The CUDA batched int4 experts (trident/native/moe_batched_cuda.cu) against float64 math.

The gate|up kernel quantizes each token's hidden row to one int8 stage per block of 128 and multiplies the int4 codes
exactly (integer mma), so its act must equal the float64 math on those activations (moe_batched_cuda.gate_up_reference)
within act's rounding; the down kernel, from the kernel's own act (quantized again the same way), must equal
down_reference within out_pairs' rounding; the sum over k is the slot-order float32 sum of out_pairs, bit for bit.
Several token counts, routings (uniform, a quarter of the experts in use, every token through one expert), group
sizes, dtypes and activations, a Qwen3-30B-A3B-shaped layer; what takes() refuses; CUDA-graph replay with new
routings. The CPU tests check the emulation against exact float64 math and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from trident.moe.experts import TorchExperts
from trident.moe.quant import dequantize_experts, quantize_experts
from trident.native import cuda_build, moe_batched_cuda

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
"""Twice the output's rounding (half an ulp) of |y|, plus the same of the products' root-sum-square (outputs that
cancel to near zero): float32 accumulation of the per-block sums stays ~100x below it."""
ROUTINGS = ("uniform", "idle", "one")
"""uniform: each token's k experts drawn from all; idle: from a quarter of them (the rest get no pairs); one: every
token routed to the same expert in a random slot (one expert with T pairs: many row blocks of one expert)."""


def random_ids(num_tokens: int, num_experts: int, top_k: int, routing: str, g: torch.Generator) -> torch.Tensor:
    """int64 [T, k]: k distinct experts a token, drawn as ``routing`` says (ROUTINGS)."""
    if routing == "uniform":
        return torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    if routing == "idle":
        pool = torch.randperm(num_experts, generator=g)[:max(top_k, num_experts // 4)]
        return torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:top_k]] for _ in range(num_tokens)])
    assert routing == "one"
    chosen = int(torch.randint(num_experts, (1,), generator=g))
    others = torch.tensor([e for e in range(num_experts) if e != chosen])
    rows = []
    for _ in range(num_tokens):
        row = others[torch.randperm(others.numel(), generator=g)[:top_k - 1]].tolist()
        row.insert(int(torch.randint(top_k, (1,), generator=g)), chosen)
        rows.append(row)
    return torch.tensor(rows)


def random_step(num_experts: int, hidden: int, inter: int, num_tokens: int, top_k: int, routing: str, seed: int,
                dtype: torch.dtype, device: str = "cpu", group_size: int | None = None) -> dict:
    """T tokens, a routing (ROUTINGS), softmax-like weights and int4 experts (groups of ``group_size``, None: per
    channel) from N(0, 0.05) weights; the hidden rows' blocks of 32 span three orders of magnitude. The experts are
    drawn and quantized on ``device`` (a Qwen3-30B-A3B layer is 0.6 G weights: too slow on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed(seed)
    gate_up = quantize_experts(torch.randn(num_experts, 2 * inter, hidden, generator=on_device, device=device) * 0.05,
                               4, group_size)
    down = quantize_experts(torch.randn(num_experts, hidden, inter, generator=on_device, device=device) * 0.05, 4,
                            group_size)
    magnitude = 10 ** (torch.rand(num_tokens, hidden // 32, 1, generator=g) * 3 - 1)
    hidden_state = (torch.randn(num_tokens, hidden // 32, 32, generator=g) * magnitude).view(num_tokens, hidden)
    ids = random_ids(num_tokens, num_experts, top_k, routing, g)
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), dim=-1)
    layer = dict(hidden=hidden_state.to(dtype), weights=weights, expert_ids=ids, gate_up=gate_up.codes,
                 down=down.codes, gate_up_scales=gate_up.scales, down_scales=down.scales)
    return {name: t.to(device) for name, t in layer.items()}


def _takes(layer: dict, activation: str = "silu") -> bool:
    return moe_batched_cuda.takes(layer["hidden"], layer["expert_ids"], layer["gate_up"], layer["down"],
                                  layer["gate_up_scales"], layer["down_scales"], activation)


def exact_experts(layer: dict, activation: str) -> torch.Tensor:
    """float64 [T, H]: the MoE on the dequantized experts with exact math (no activation quantization, no
    rounding)."""
    x = layer["hidden"].double()
    num_tokens, top_k = layer["expert_ids"].shape
    out = torch.zeros_like(x)
    for t in range(num_tokens):
        for j in range(top_k):
            e = int(layer["expert_ids"][t, j])
            gate_up = dequantize_experts(layer["gate_up"][e], layer["gate_up_scales"][e], torch.float64)
            down = dequantize_experts(layer["down"][e], layer["down_scales"][e], torch.float64)
            gate, up = (gate_up @ x[t]).chunk(2)
            act = moe_batched_cuda.REFERENCE_ACTIVATIONS[activation](gate) * up
            out[t] += layer["weights"][t, j].double() * (down @ act)
    return out


@pytest.mark.parametrize("group_size", [128, None])
def test_emulation_is_the_exact_math_within_the_activation_rounding(group_size) -> None:
    """experts_reference (one-stage activations, act rounded to bfloat16 and quantized again, out_pairs rounded)
    against exact float64 math on the same weights: within the one-stage activations' 1/254 of a block's largest
    element (twice: hidden and act) and bfloat16's roundings, and not equal to it (it does round)."""
    layer = random_step(16, 256, 128, 5, 4, "uniform", 0, torch.bfloat16, group_size=group_size)
    emulated = moe_batched_cuda.experts_reference(activation="silu", **layer)
    exact = exact_experts(layer, "silu")
    assert emulated.shape == exact.shape == (5, 256)
    scale = exact.abs().max()
    assert 0 < (emulated - exact).abs().max() < 2**-5 * scale


def test_stage_references_compose_to_the_whole() -> None:
    """experts_reference is gate_up_reference then down_reference with the roundings between (the stages the GPU
    tests bound one at a time), and its rows follow the pairs p = t k + slot."""
    layer = random_step(8, 128, 128, 3, 2, "one", 1, torch.float16)
    act = moe_batched_cuda.gate_up_reference(layer["hidden"], layer["expert_ids"], layer["gate_up"],
                                             layer["gate_up_scales"], "silu")
    assert act.shape == (6, 128) and act.dtype == torch.float64
    pairs = moe_batched_cuda.down_reference(act.half(), layer["weights"], layer["expert_ids"], layer["down"],
                                            layer["down_scales"])
    whole = moe_batched_cuda.experts_reference(activation="silu", **layer)
    assert torch.equal(whole, pairs.half().double().view(3, 2, 128).sum(1))


def test_unavailable_on_the_cpu_for_float_experts_or_when_disabled(monkeypatch) -> None:
    layer = random_step(8, 64, 32, 4, 2, "uniform", 2, torch.bfloat16)
    assert not _takes(layer), "a CPU tensor took the CUDA kernel"
    assert not moe_batched_cuda.takes(layer["hidden"], layer["expert_ids"], layer["gate_up"], layer["down"], None,
                                      None, "silu"), "float experts took the int4 kernel"
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    assert cuda_build.load_cuda(moe_batched_cuda.LIBRARY) is None
    assert moe_batched_cuda.why_unavailable() == "TRIDENT_NO_NATIVE=1"


def _excess(y: torch.Tensor, reference: torch.Tensor, rss: torch.Tensor, dtype: torch.dtype) -> float:
    return ((y.double() - reference).abs() / (RTOL[dtype] * (reference.abs() + rss) + 2**-24)).max().item()


def _down_rss(act: torch.Tensor, layer: dict) -> torch.Tensor:
    """[T k, H]: |weight| x the root-sum-square of each pair's down products (act [T k, I] float64, on the layer's
    device)."""
    rss = torch.zeros((act.shape[0], layer["down"].shape[1]), dtype=torch.float64, device=act.device)
    flat_ids, weights = layer["expert_ids"].reshape(-1), layer["weights"].reshape(-1).double()
    for e in flat_ids.unique().tolist():
        pairs = (flat_ids == e).nonzero().squeeze(1)
        w = dequantize_experts(layer["down"][e], layer["down_scales"][e], torch.float64)
        rss[pairs] = ((act[pairs] ** 2) @ (w**2).T).sqrt() * weights[pairs, None].abs()
    return rss


def _check(layer: dict, activation: str, what: str) -> None:
    """Each stage of the kernels against its float64 emulation, and experts() against the stages. The emulation
    runs on the GPU, in float64: on the CPU a Qwen3-30B-A3B layer's took minutes per case with several pytest
    workers sharing the cores (the first GPU run stopped progressing after 34 cases)."""
    dtype = layer["hidden"].dtype
    assert _takes(layer, activation), what
    stages = moe_batched_cuda.experts_stages(activation=activation, keep_act=True, **layer)
    device = layer["hidden"].device
    num_tokens, top_k = layer["expert_ids"].shape
    hidden_size = layer["hidden"].shape[1]
    sorted_pairs = stages.sorted_pairs.long()
    real = sorted_pairs >= 0
    assert torch.equal(sorted_pairs[real].sort().values, torch.arange(num_tokens * top_k, device=device)), \
        f"{what}: layout"
    act = torch.empty((num_tokens * top_k, stages.act_rows.shape[1]), dtype=dtype, device=device)
    act[sorted_pairs[real]] = stages.act_rows[real]

    expected = moe_batched_cuda.gate_up_reference(layer["hidden"], layer["expert_ids"], layer["gate_up"],
                                                  layer["gate_up_scales"], activation)
    excess = _excess(act, expected, expected.abs().max() * 2**-12, dtype)
    assert excess <= 1, f"{what}: gate|up off the float64 math by {excess:.2f}x the allowance"

    expected = moe_batched_cuda.down_reference(act, layer["weights"], layer["expert_ids"], layer["down"],
                                               layer["down_scales"])
    out_pairs = stages.out_pairs
    excess = _excess(out_pairs, expected, _down_rss(act.double(), layer), dtype)
    assert excess <= 1, f"{what}: down off the float64 math by {excess:.2f}x the allowance"

    total = torch.zeros((num_tokens, hidden_size), dtype=torch.float32, device=device)
    for j in range(top_k):  # the sum over k: slot order, float32, one rounding
        total += out_pairs.view(num_tokens, top_k, hidden_size)[:, j].float()
    assert torch.equal(stages.out, total.to(dtype)), f"{what}: the sum over k"
    assert torch.equal(moe_batched_cuda.experts(activation=activation, **layer), stages.out), f"{what}: experts()"


@pytest.mark.gpu
def test_builds_on_the_gpu_machine() -> None:
    assert moe_batched_cuda.why_unavailable() is None


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [128, None], ids=["g128", "channel"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("num_tokens", [2, 5, 64, moe_batched_cuda.PREFILL_TOKENS, moe_batched_cuda.MAX_TOKENS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernels_equal_float64_math(dtype: torch.dtype, num_tokens: int, routing: str, group_size: int) -> None:
    """128 experts, top-8, H 512, I 256, silu."""
    seed = num_tokens * 10 + ROUTINGS.index(routing) + (group_size or 0)
    layer = random_step(128, 512, 256, num_tokens, 8, routing, seed, dtype, "cuda", group_size)
    _check(layer, "silu", f"T={num_tokens} {routing} g{group_size} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_qwen3_30b_a3b_layer(dtype: torch.dtype) -> None:
    """Qwen3-30B-A3B's layer shape (128 experts, top-8, H 2048, I 768, int4 in groups of 128) at 64 tokens; the
    hidden rows scaled by 1/16 (float16's act overflows otherwise: |gate| ~ 200 over 2048 inputs)."""
    layer = random_step(128, 2048, 768, 64, 8, "uniform", 30, dtype, "cuda", 128)
    layer["hidden"] = layer["hidden"] / 16
    _check(layer, "silu", f"Qwen3-30B-A3B T=64 {dtype}")


@pytest.mark.gpu
def test_qwen3_30b_a3b_layer_at_prefill_size() -> None:
    """The same layer at 1,024 tokens: the prefill build (32-row blocks)."""
    assert moe_batched_cuda.library_for(1024, 2048, 768).tq_moeb_block_m() == moe_batched_cuda.PREFILL_BLOCK_M
    layer = random_step(128, 2048, 768, 1024, 8, "uniform", 31, torch.bfloat16, "cuda", 128)
    layer["hidden"] = layer["hidden"] / 16
    _check(layer, "silu", "Qwen3-30B-A3B T=1024")


@pytest.mark.gpu
def test_builds_by_token_count_and_shared_memory() -> None:
    """8-row blocks below PREFILL_TOKENS, 32-row ones from it, and 8-row ones again where 32 rows of activations do
    not fit in a block's shared memory (H = 16,384: 566 KB)."""
    below, at = moe_batched_cuda.PREFILL_TOKENS - 1, moe_batched_cuda.PREFILL_TOKENS
    assert moe_batched_cuda.library_for(below, 2048, 768).tq_moeb_block_m() == moe_batched_cuda.BLOCK_M
    assert moe_batched_cuda.library_for(at, 2048, 768).tq_moeb_block_m() == moe_batched_cuda.PREFILL_BLOCK_M
    assert moe_batched_cuda.library_for(at, 16384, 768).tq_moeb_block_m() == moe_batched_cuda.BLOCK_M


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_other_activations_and_shapes(activation: str) -> None:
    """The gelu activations, and shapes off the kernels' tiles: H = 640 (5 blocks of 128: a down block's last 128
    rows of its 256, per channel), I = 384 (3 gate|up blocks), k = 2 of 6 experts, and k = 1 (no sum)."""
    _check(random_step(6, 640, 384, 7, 2, "uniform", 40, torch.bfloat16, "cuda", None), activation, "E=6 k=2")
    _check(random_step(6, 384, 128, 3, 1, "uniform", 41, torch.float16, "cuda", 128), activation, "E=6 k=1")


@pytest.mark.gpu
def test_takes_refuses_what_the_kernels_do_not_run() -> None:
    layer = random_step(16, 256, 128, 4, 4, "uniform", 50, torch.bfloat16, "cuda", 128)
    assert _takes(layer)
    one = {**layer, "hidden": layer["hidden"][:1], "expert_ids": layer["expert_ids"][:1]}
    assert not _takes(one), "one token (moe_gemv_cuda's)"
    many = moe_batched_cuda.MAX_TOKENS + 1
    assert not _takes({**layer, "hidden": layer["hidden"][:1].expand(many, -1).contiguous(),
                       "expert_ids": layer["expert_ids"][:1].expand(many, -1).contiguous()}), "too many tokens"
    int8 = quantize_experts(torch.randn(16, 256, 256, device="cuda"), 8)
    assert not _takes({**layer, "gate_up": int8.codes, "gate_up_scales": int8.scales}), "int8 codes"
    flat = torch.empty(layer["hidden"].numel() + 1, dtype=layer["hidden"].dtype, device="cuda")
    shifted = flat[1:].view_as(layer["hidden"])
    shifted.copy_(layer["hidden"])
    assert not _takes({**layer, "hidden": shifted}), "hidden not 16-byte aligned"
    codes = torch.empty(layer["gate_up"].numel() + 8, dtype=torch.uint8, device="cuda")[8:].view_as(layer["gate_up"])
    assert not _takes({**layer, "gate_up": codes}), "codes not 16-byte aligned"
    assert not _takes({**layer, "hidden": layer["hidden"].t().contiguous().t()}), "hidden not contiguous"
    assert not _takes({**layer, "expert_ids": layer["expert_ids"].int()}), "int32 ids"
    odd = random_step(16, 768, 128, 4, 4, "uniform", 51, torch.bfloat16, "cuda", 128)
    assert _takes(odd), "H = 6 blocks of 128"
    groups_of_64 = quantize_experts(torch.randn(16, 256, 768, device="cuda"), 4, 64)
    assert not _takes({**odd, "gate_up": groups_of_64.codes, "gate_up_scales": groups_of_64.scales}), \
        "groups of 64 (the Triton kernels')"
    assert not _takes(random_step(16, 160, 128, 4, 4, "uniform", 52, torch.bfloat16, "cuda", None)), "H = 160"


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_routings_equals_eager() -> None:
    """A captured call replays on new hidden rows and a new routing exactly as an eager call computes them, and
    stays within bfloat16's rounding and the one-stage activations' of the torch reference backend."""
    layer = random_step(32, 256, 128, 16, 4, "uniform", 60, torch.bfloat16, "cuda", 128)
    experts = (layer["gate_up"], layer["down"], "silu", layer["gate_up_scales"], layer["down_scales"])
    eager = moe_batched_cuda.experts(layer["hidden"], layer["weights"], layer["expert_ids"], *experts)
    reference = TorchExperts().forward(layer["hidden"], layer["weights"], layer["expert_ids"], *experts[:3],
                                       gate_up_scales=layer["gate_up_scales"],
                                       down_scales=layer["down_scales"]).float()
    assert (eager.float() - reference).abs().max() < 2**-4 * reference.abs().max()

    static = {name: layer[name].clone() for name in ("hidden", "weights", "expert_ids")}
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = moe_batched_cuda.experts(static["hidden"], static["weights"], static["expert_ids"], *experts)
    for seed, routing in ((61, "idle"), (62, "one")):
        other = random_step(32, 256, 128, 16, 4, routing, seed, torch.bfloat16, "cuda", 128)
        for name in static:
            static[name].copy_(other[name])
        graph.replay()
        torch.cuda.synchronize()
        fresh = moe_batched_cuda.experts(static["hidden"], static["weights"], static["expert_ids"], *experts)
        assert torch.equal(static_out, fresh), routing
        assert not torch.equal(static_out, eager)
