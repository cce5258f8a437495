"""The CUDA batch-1 int8 and int4 experts (trident/native/moe_gemv_cuda.cu) against float64 math.

Each of the two kernels quantizes its activation row to two int8 stages per block of 32 (one for int4 codes) and
multiplies the codes exactly (dp4a), so each must equal the float64 math on those activations (emulated by
moe_gemv_cuda.gate_up_reference / down_reference) within its output's rounding; the two together stay within
bfloat16's rounding of the torch reference backend. Random routings over several expert counts, k, shapes,
activations and dtypes; CUDA-graph replay with new routings; the experts backend's dispatch; a tiny MoE engine's
greedy decode against the Triton experts. The CPU tests check the emulation against exact float64 math and the
fallbacks."""

from __future__ import annotations

import pytest
import torch
from agreement import assert_cuda_kernels_agree_with_triton

from trident.moe.experts import TorchExperts
from trident.moe.quant import dequantize_experts, quantize_experts
from trident.native import cuda_build, moe_gemv_cuda

RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
"""Twice the output's rounding (half an ulp) of |y|, plus the same of the products' root-sum-square (outputs that
cancel to near zero): float32 accumulation of the per-block sums stays ~100x below it."""


def random_layer(num_experts: int, hidden: int, inter: int, top_k: int, seed: int, dtype: torch.dtype,
                 device: str = "cpu", bits: int = 8, group_size: int | None = None) -> dict:
    """One token, a random routing (k distinct experts, softmax-like weights) and int8 (int4 in groups of
    ``group_size``) experts from N(0, 0.05) weights; the hidden state's blocks of 32 span three orders of
    magnitude. The experts are drawn and quantized on ``device`` (a Qwen3-30B-A3B layer is 0.6 G weights: seconds
    on the CPU, which the GPU tests would spend on every case)."""
    g = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed(seed)
    gate_up = quantize_experts(torch.randn(num_experts, 2 * inter, hidden, generator=on_device, device=device) * 0.05,
                               bits, group_size)
    down = quantize_experts(torch.randn(num_experts, hidden, inter, generator=on_device, device=device) * 0.05, bits,
                            group_size)
    hidden_state = (torch.randn(1, hidden, generator=g) * 10 ** (torch.rand(1, hidden // 32, 1, generator=g) * 3 - 1)
                    .repeat_interleave(32, 1).view(1, hidden)).to(dtype)
    ids = torch.randperm(num_experts, generator=g)[:top_k].view(1, top_k)
    weights = torch.softmax(torch.randn(1, top_k, generator=g), dim=-1)
    layer = dict(hidden=hidden_state, weights=weights, expert_ids=ids, gate_up=gate_up.codes, down=down.codes,
                 gate_up_scales=gate_up.scales, down_scales=down.scales)
    return {name: t.to(device) for name, t in layer.items()}


@pytest.mark.parametrize("bits, group_size, within", [(8, None, 2**-7), (4, 32, 2**-5)])
def test_emulation_is_the_exact_math_within_the_activation_rounding(bits, group_size, within) -> None:
    """experts_reference (the kernels' quantized activations and their rounding of act) against exact float64
    math on the same weights: within bfloat16's rounding of act (int4: and the one-stage activations' 1/254 of a
    block's largest element), and not equal to it (it does round)."""
    layer = random_layer(16, 256, 96, 4, 0, torch.bfloat16, bits=bits, group_size=group_size)
    emulated = moe_gemv_cuda.experts_reference(activation="silu", **layer)
    x = layer["hidden"].double()[0]
    ids = layer["expert_ids"][0]
    gate_up = dequantize_experts(layer["gate_up"][ids], layer["gate_up_scales"][ids], torch.float64)
    down = dequantize_experts(layer["down"][ids], layer["down_scales"][ids], torch.float64)
    gate, up = (gate_up @ x).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    exact = (layer["weights"][0].double()[:, None] * torch.einsum("khi,ki->kh", down, act)).sum(0)
    scale = exact.abs().max()
    assert 0 < (emulated - exact).abs().max() < within * scale


def test_unavailable_on_the_cpu_for_float_experts_or_when_disabled(monkeypatch) -> None:
    layer = random_layer(4, 64, 32, 2, 1, torch.bfloat16)
    args = (layer["hidden"], layer["expert_ids"], layer["gate_up"], layer["down"], layer["gate_up_scales"],
            layer["down_scales"], "silu")
    assert not moe_gemv_cuda.takes(*args), "a CPU tensor took the CUDA kernel"
    assert not moe_gemv_cuda.takes(*args[:4], None, None, "silu"), "float experts took the int8 kernel"
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    assert cuda_build.load_cuda(moe_gemv_cuda.LIBRARY) is None
    assert moe_gemv_cuda.why_unavailable() == "TRIDENT_NO_NATIVE=1"


def _excess(y: torch.Tensor, reference: torch.Tensor, rss: torch.Tensor, dtype: torch.dtype) -> float:
    return ((y.double() - reference).abs() / (RTOL[dtype] * (reference.abs() + rss) + 2**-24)).max().item()


def _check(num_experts: int, hidden: int, inter: int, top_k: int, activation: str, dtype: torch.dtype,
           seed: int, bits: int = 8, group_size: int | None = None) -> None:
    layer = random_layer(num_experts, hidden, inter, top_k, seed, dtype, "cuda", bits, group_size)
    what = f"E={num_experts} H={hidden} I={inter} k={top_k} {activation} {dtype} int{bits} g{group_size}"
    assert moe_gemv_cuda.takes(layer["hidden"], layer["expert_ids"], layer["gate_up"], layer["down"],
                               layer["gate_up_scales"], layer["down_scales"], activation), what
    act = moe_gemv_cuda.gate_up_activation(layer["hidden"], layer["expert_ids"], layer["gate_up"],
                                           layer["gate_up_scales"], activation)
    expected = moe_gemv_cuda.gate_up_reference(layer["hidden"], layer["expert_ids"], layer["gate_up"],
                                               layer["gate_up_scales"], activation)
    excess = _excess(act.cpu(), expected, expected.abs().max() * 2**-12, dtype)
    assert excess <= 1, f"{what}: gate|up off the float64 math by {excess:.2f}x the allowance"
    y = moe_gemv_cuda.down_weighted_sum(act, layer["weights"], layer["expert_ids"], layer["down"],
                                        layer["down_scales"])
    expected = moe_gemv_cuda.down_reference(act, layer["weights"], layer["expert_ids"], layer["down"],
                                            layer["down_scales"])
    ids = layer["expert_ids"][0].cpu()
    down = dequantize_experts(layer["down"][ids].cpu(), layer["down_scales"][ids].cpu(), torch.float64)
    a = act.cpu().double()
    rss = torch.einsum("khi,ki->h", down * down, a * a).sqrt()
    excess = _excess(y[0].cpu(), expected, rss, dtype)
    assert excess <= 1, f"{what}: down off the float64 math by {excess:.2f}x the allowance"
    # the two launches are what experts() runs
    assert torch.equal(moe_gemv_cuda.experts(activation=activation, **layer), y)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_kernels_equal_float64_math_over_random_routings(activation: str, dtype: torch.dtype, bits: int) -> None:
    """Qwen3-30B-A3B's layer shape (128 experts, H 2048, I 768, k 8), Mixtral-like (8 experts, k 2) and small odd
    shapes, each over several random routings; int4 in groups of 128 where they divide H and I, else per channel."""
    for seed in range(3):
        for num_experts, hidden, inter, top_k in ((128, 2048, 768, 8), (8, 512, 1792, 2), (5, 96, 32, 1),
                                                  (64, 160, 224, 6), (40, 64, 32, 32)):
            group = None if bits == 8 or hidden % 128 or inter % 128 else 128
            _check(num_experts, hidden, inter, top_k, activation, dtype, seed * 100 + num_experts + top_k, bits, group)


@pytest.mark.gpu
def test_builds_on_the_gpu_machine() -> None:
    assert moe_gemv_cuda.why_unavailable() is None


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group_size, within", [(8, None, 2**-6), (4, 128, 2**-4)])
def test_backend_dispatch_and_cuda_graph_replay_with_new_routings(monkeypatch, bits, group_size, within) -> None:
    """TritonExperts sends one int8 / int4 token to these kernels (more tokens, or float experts, to Triton), its
    result within bfloat16's rounding of the torch reference (int4: and the one-stage activations'); a captured step
    replays on a new token and a new routing."""
    from trident.moe.experts_triton import TritonExperts

    layer = random_layer(32, 256, 128, 4, 9, torch.bfloat16, "cuda", bits, group_size)
    calls = []
    real = moe_gemv_cuda.experts
    monkeypatch.setattr(moe_gemv_cuda, "experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    backend, reference = TritonExperts(), TorchExperts()
    args = (layer["hidden"], layer["weights"], layer["expert_ids"], layer["gate_up"], layer["down"], "silu")
    scales = dict(gate_up_scales=layer["gate_up_scales"], down_scales=layer["down_scales"])
    y = backend.forward(*args, **scales)
    assert calls == [1]
    expected = reference.forward(*args, **scales).float()
    assert (y.float() - expected).abs().max() < within * expected.abs().max()
    two = torch.cat([layer["hidden"], layer["hidden"]])
    backend.forward(two, layer["weights"].repeat(2, 1), layer["expert_ids"].repeat(2, 1), *args[3:], **scales)
    assert calls == [1], "two tokens went to the one-token kernel"

    static = {name: layer[name].clone() for name in ("hidden", "weights", "expert_ids")}
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_y = moe_gemv_cuda.experts(static["hidden"], static["weights"], static["expert_ids"], *args[3:],
                                         **scales)
    other = random_layer(32, 256, 128, 4, 10, torch.bfloat16, "cuda", bits, group_size)
    for name in static:
        static[name].copy_(other[name])
    graph.replay()
    torch.cuda.synchronize()
    fresh = moe_gemv_cuda.experts(static["hidden"], static["weights"], static["expert_ids"], *args[3:], **scales)
    assert torch.equal(static_y, fresh)
    assert not torch.equal(static_y, y)


@pytest.fixture(scope="module", params=[("8", []), ("4", ["--group-size", "32"])], ids=["int8", "int4"])
def tiny_quantized_moe_dir(tmp_path_factory, request):
    from hf_tiny import make_hf_model, tiny_hf_configs

    from trident.cli import main

    bits, flags = request.param
    root = tmp_path_factory.mktemp("tiny-qwen3-moe-native")
    make_hf_model(tiny_hf_configs()["qwen3_moe"], seed=6).save_pretrained(root / "hf")
    assert main(["quantize", str(root / "hf"), "--bits", bits, *flags, "--out", str(root / f"int{bits}")]) == 0
    return root / f"int{bits}"


@pytest.mark.gpu
def test_engine_decode_agrees_with_the_triton_experts(tiny_quantized_moe_dir, monkeypatch) -> None:
    """A CUDA engine's batch-1 decode steps (CUDA graphs) on an int8 / int4 MoE model run these kernels and agree with
    the same engine on the Triton experts: the same greedy tokens, log-probabilities within the activations'
    rounding (int4 experts multiply one int8 stage of the activations, which the Triton experts do not emulate:
    0.3 nats, as much again as the 0.15 one stage moves these logits in a dense int4 model)."""
    assert_cuda_kernels_agree_with_triton(
        tiny_quantized_moe_dir, [(13 * i + 2) % 97 for i in range(29)], moe_gemv_cuda, "experts",
        "one-token MoE router and quantized experts: CUDA kernels",
        "one-token MoE router and experts: Triton (TRIDENT_NO_NATIVE=1)", monkeypatch,
        tolerance=0.3 if tiny_quantized_moe_dir.name == "int4" else 0.1)
