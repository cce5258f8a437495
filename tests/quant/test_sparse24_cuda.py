"""The 2:4 sparse Linear on CUDA (trident/quant/sparse24.py): its products equal float64 math on the same masked
weights within the 16-bit output's rounding, on several shapes and row counts (1 token, odd counts torch pads,
64 and more), with and without a bias, eagerly and replayed from a CUDA graph; and a tiny 2:4 model built with
--sparse-kernel gives the dense path's logits (prefill) and decodes through CUDA graphs to tokens its own eager
logits rank best."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trident.compress.sparsity import two_four_mask
from trident.models.layers import Linear
from trident.quant.sparse24 import SparseLinear24, is_two_four, resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compress"))
from byte_tokenizer import save_with_byte_tokenizer  # noqa: E402
from engine_logits import prefill_logits  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPES = ((128, 256), (960, 576), (4096, 4096), (1024, 14336))
"""(N, K): small, the default model's fused qkv, Llama-3-8B's o and a down-like K = 14336."""
ROWS = (1, 3, 16, 64, 200)


def _two_four_linear(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.05).to("cuda")
    weight = torch.where(two_four_mask(weight.abs()), weight, 0.0)
    layer = Linear(k, n, bias=bias)
    layer.weight = torch.nn.Parameter(weight.to("cuda", dtype), requires_grad=False)
    if bias:
        layer.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).to("cuda", dtype), requires_grad=False)
    return layer


def _check(got: torch.Tensor, x: torch.Tensor, layer: Linear) -> None:
    """got against float64 math on the same 16-bit inputs: the output's rounding (2^-8 of bf16, relative) plus
    float32 accumulation, as the dense cuBLAS product also meets."""
    expected = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    dense = F.linear(x, layer.weight, layer.bias).double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2 * scale)
    torch.testing.assert_close(dense, expected, rtol=1e-2, atol=1e-2 * scale)  # the same allowance holds for dense


def test_auto_backend_on_this_gpu() -> None:
    backend, why = resolve_backend(torch.device("cuda"))
    assert backend is not None, why  # cuSPARSELt on sm90 (H200); CUTLASS would do on sm8x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_sparse_linear_equals_the_dense_matmul(n: int, k: int, dtype: torch.dtype) -> None:
    backend, _ = resolve_backend(torch.device("cuda"))
    for bias in (False, True):
        layer = _two_four_linear(n, k, dtype, bias, seed=n + k)
        assert is_two_four(layer.weight)
        sparse = SparseLinear24.from_linear(layer, backend)
        assert sparse.packed.numel() * sparse.packed.element_size() < layer.weight.numel() * 2 * 0.7
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            got = sparse(x)
            assert got.shape == (m, n) and got.dtype == dtype and got.is_contiguous()
            _check(got, x, layer)
        x3 = torch.randn(2, 5, k, device="cuda", dtype=dtype)  # leading dimensions kept
        _check(sparse(x3).view(10, n), x3.view(10, k), layer)


def test_sparse_linear_replays_from_a_cuda_graph() -> None:
    backend, _ = resolve_backend(torch.device("cuda"))
    layer = _two_four_linear(960, 576, torch.bfloat16, True, seed=1)
    sparse = SparseLinear24.from_linear(layer, backend)
    static_x = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            sparse(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = sparse(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(8, 576, device="cuda", dtype=torch.bfloat16,
                                   generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        _check(static_y.clone(), static_x.clone(), layer)


def test_tiny_two_four_model_sparse_path_equals_dense(tmp_path) -> None:
    import transformers

    from trident import LLM, SamplingParams
    from trident.cli import main
    from trident.quant.sparse24 import SparseLinear24 as Sparse

    # sizes that are multiples of 64 everywhere: qkv 256x128, o 128x128, gate_up 512x128, down 128x256
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=0, bos_token_id=1)
    source = save_with_byte_tokenizer(config, tmp_path / "tiny", seed=4)
    out = tmp_path / "tiny-24"
    assert main(["prune", str(source), "--structure", "2:4", "--out", str(out), "--json",
                 str(tmp_path / "r.json")]) == 0
    assert json.loads((out / "config.json").read_text())["trident_sparsity"]["pattern"] == "2:4"

    options = dict(device="cuda", dtype="bfloat16", num_blocks=64, enable_prefix_caching=False)
    dense = LLM(str(out), **options).engine
    sparse = LLM(str(out), sparse_kernel=True, **options).engine
    assert dense.sparse_kernels is None
    report = sparse.sparse_kernels
    assert report.dense == {} and len(report.converted) == 2 * 4, report
    assert sum(isinstance(m, Sparse) for m in sparse.model.modules()) == 8
    assert sparse.memory_usage().weights_bytes < dense.memory_usage().weights_bytes

    tokens = torch.randint(2, 256, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    got, expected = prefill_logits(sparse, tokens).float(), prefill_logits(dense, tokens).float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2 * scale)

    # decode runs the sparse layers from CUDA graphs: each greedy token must be (within bf16 noise) the best of
    # the sparse model's own eager logits at its position
    llm = LLM(str(out), sparse_kernel=True, **options)
    result = llm.generate([tokens[:12]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    generated = list(result.outputs[0].token_ids)
    assert len(generated) == 10
    logits = prefill_logits(llm.engine, tokens[:12] + generated).float()
    for i, token in enumerate(generated):
        row = logits[11 + i]
        assert row[token] >= row.max() - 0.05 * row.abs().max(), (i, token)
