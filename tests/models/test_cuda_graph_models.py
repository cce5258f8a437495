"""Every architecture's decode forward is CUDA-graph capturable with the Triton attention backend and the
fused elementwise kernels in the path (RMSNorm + residual, rotary with Qwen3 / Gemma 3 head norms, gated
activation): replays, a padded bucket among them, give the eager forward's hidden states, with float and
int8 / fp8 KV caches. Mixture-of-experts models capture with the fused triton experts (and run eagerly with the
torch reference), whose forwards give the torch experts' greedy tokens; with int8 experts (trident/moe/quant.py)
too."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from hf_tiny import make_hf_model, tiny_hf_configs, tiny_moe_configs, trident_config
from test_hf_equivalence import BLOCK_SIZE, _Seq

from trident.attention.registry import create_backend
from trident.engine.plan import StepPlan
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.models.build import build_model
from trident.quant.kv import kv_cache_format

# Graph and eager run the same kernels, but a padded bucket may pick other GEMM algorithms and attention
# splits (last-bit differences that grow through the layers); a stale or wrong replay is off by order 1.
TOLERANCE = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 5e-2)}


DENSE = [name for name in tiny_hf_configs() if name not in tiny_moe_configs()]
"""The dense architectures (the MoE ones capture with the triton experts backend: see below)."""
GROUPED_QUERY_MOE = [name for name in tiny_moe_configs() if not name.startswith("deepseek")]
"""The MoE architectures on the triton attention backend (DeepSeek's latent attention runs on the torch one, which
captures no graphs)."""


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("dtype_name", list(TOLERANCE))
@pytest.mark.parametrize("name", DENSE)
def test_decode_graph_replays_match_eager(name: str, dtype_name: str, kv_cache_dtype: str) -> None:
    check_decode_graph_replays(name, dtype_name, kv_cache_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GROUPED_QUERY_MOE)
def test_moe_decode_graph_replays_match_eager(name: str) -> None:
    """With the fused triton experts (bfloat16: the kernels are 16-bit only)."""
    check_decode_graph_replays(name, "bfloat16", "auto", experts_backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", GROUPED_QUERY_MOE)
def test_moe_decode_graph_with_int8_experts_replays_match_eager(name: str) -> None:
    """int8 experts (codes and per-row scales) through the fused triton experts capture and replay as the eager
    forward."""
    from trident.moe.quant import QuantizedFusedExperts, quantize_model_experts

    def int8_experts(model) -> None:
        assert quantize_model_experts(model)
        assert any(isinstance(m, QuantizedFusedExperts) for m in model.modules())

    check_decode_graph_replays(name, "bfloat16", "auto", transform=int8_experts, experts_backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("experts_backend", ["torch", "auto"])
@pytest.mark.parametrize("name", list(tiny_moe_configs()))
def test_moe_models_capture_with_the_triton_experts(name: str, experts_backend: str) -> None:
    """auto picks the triton experts for a bfloat16 model on CUDA, and the engine captures graphs for it. The torch
    experts backend reads each expert's token count on the host, which a graph cannot replay: the model says so
    and the engine runs it eagerly. (DeepSeek's latent attention runs on the torch attention backend, which the
    engine picks for it, and which captures no graphs either.)"""
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.loader.checkpoint import Checkpoint

    hf_config = tiny_hf_configs()[name]
    config = trident_config(hf_config)
    model = build_model(config, make_hf_model(hf_config).state_dict(), dtype=torch.bfloat16,
                        device=torch.device("cuda"),
                        backend=create_backend("torch" if config.mla else "triton", torch.device("cuda")))
    assert model.supports_cuda_graphs is False  # build_model's default: the torch experts
    checkpoint = Checkpoint(config=config, tensors=make_hf_model(hf_config).state_dict(), tensor_types={},
                            tokenizer=None, format="hf", path="", file_bytes=0)
    engine = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", num_blocks=16, block_size=BLOCK_SIZE,
                                     max_model_len=48, experts_backend=experts_backend), checkpoint)
    triton_experts = experts_backend == "auto"
    assert engine.experts_backend == ("triton" if triton_experts else "torch")
    # DeepSeek's latent attention runs the torch reference, which declines graphs whatever the experts run
    assert engine.model.supports_cuda_graphs is (triton_experts and not config.mla)
    assert (engine.runner.graphs is not None) == (triton_experts and not config.mla)
    assert engine.attention_backend == ("torch" if config.mla else "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["float-experts", "int8-experts"])
@pytest.mark.parametrize("dtype_name", ["float16"])
@pytest.mark.parametrize("name", list(tiny_moe_configs()))
def test_triton_experts_give_the_torch_experts_tokens(name: str, dtype_name: str, int8: bool) -> None:
    """The same model built with either experts backend: a prefill of three sequences gives close logits (within the
    dtype's rounding through the layers) and the same greedy token wherever the torch backend's top two logits are
    apart by more than that. float16 only: in bfloat16 a token whose router scores nearly tie in some layer may pick
    another expert there (the two backends round the layer before differently), and through attention the rest of
    its sequence follows (seen on the H200: 9 of 24 tokens of the tiny Mixtral); the bfloat16 kernels are checked
    against float64 math on identical routings in tests/kernels/test_moe_experts.py. ``int8``: both models' experts
    quantized to int8 (the same codes: quantized from the same float16 weights on the same device)."""
    from trident.moe.quant import quantize_model_experts

    device = torch.device("cuda")
    dtype = getattr(torch, dtype_name)
    hf_config = tiny_hf_configs()[name]
    config = trident_config(hf_config)
    state = make_hf_model(hf_config).state_dict()
    logits = {}
    for experts_backend in ("torch", "triton"):
        backend = create_backend("torch" if config.mla else "triton", device)
        model = build_model(config, state, dtype=dtype, device=device, backend=backend,
                            experts_backend=experts_backend)
        if int8:
            assert quantize_model_experts(model)
        assert type(model.experts_backend).__name__ == ("TorchExperts" if experts_backend == "torch"
                                                        else "TritonExperts")
        runner = ModelRunner(model, backend=backend, num_blocks=40, block_size=BLOCK_SIZE,
                             kv_format=kv_cache_format("auto", dtype), device=device, sampler=Sampler(device=device),
                             max_num_seqs=4, max_model_len=48)
        rng = random.Random(7)
        seqs = [_Seq(i, [rng.randrange(hf_config.vocab_size) for _ in range(n)], list(range(4 * i, 4 * i + 4)))
                for i, n in enumerate((11, 5, 8))]
        with torch.inference_mode():
            input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=tuple(s.chunk(len(s.tokens))
                                                                                 for s in seqs)))
            logits[experts_backend] = model.compute_logits(model(input_ids, positions, runner.kv_caches, meta)).float()
    ref, out = logits["torch"], logits["triton"]
    scale = ref.abs().max()
    close = ((out - ref).abs().amax(-1) / scale) < 5e-2
    assert close.all(), close
    top2 = ref.topk(2, dim=-1).values
    clear = ((top2[:, 0] - top2[:, 1]) > 0.1 * scale) & close
    assert clear.any()
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])


def check_decode_graph_replays(name: str, dtype_name: str, kv_cache_dtype: str,
                               transform: Callable[[torch.nn.Module], object] | None = None,
                               experts_backend: str = "torch") -> None:
    """The test above on one configuration; ``transform(model)`` changes the built model first (quantization);
    ``experts_backend``: an MoE model's (trident/moe/registry.py)."""
    dtype, tolerance = TOLERANCE[dtype_name]
    device = torch.device("cuda")
    hf_config = tiny_hf_configs()[name]
    backend = create_backend("triton", device)
    model = build_model(trident_config(hf_config), make_hf_model(hf_config).state_dict(), dtype=dtype,
                        device=device, backend=backend, experts_backend=experts_backend)
    if transform is not None:
        transform(model)
    runner = ModelRunner(model, backend=backend, num_blocks=40, block_size=BLOCK_SIZE,
                         kv_format=kv_cache_format(kv_cache_dtype, dtype), device=device,
                         sampler=Sampler(device=device), max_num_seqs=4, max_model_len=48,
                         cuda_graph_batch_sizes=(1, 2, 4))
    rng = random.Random(len(name))
    free = list(range(40))
    rng.shuffle(free)
    seqs = [_Seq(i, [rng.randrange(hf_config.vocab_size) for _ in range(n)], [free.pop() for _ in range(12)])
            for i, n in enumerate((11, 5, 8))]
    with torch.inference_mode():
        prefill = StepPlan(chunks=tuple(s.chunk(len(s.tokens)) for s in seqs))
        input_ids, positions, meta, _, _ = runner.prepare(prefill)
        hidden = model(input_ids, positions, runner.kv_caches, meta)
        ends = torch.tensor([len(s.tokens) for s in seqs]).cumsum(0) - 1
        for s, row in zip(seqs, ends.tolist()):
            s.computed = len(s.tokens)
            s.tokens.append(int(model.compute_logits(hidden[row: row + 1]).argmax()))
        for step in range(6):
            batch = seqs[: 3 if step % 2 == 0 else 2]  # 3 sequences replay the padded bucket of 4
            plan = StepPlan(chunks=tuple(s.chunk(1) for s in batch))
            pos = [c.start_pos for c in plan.chunks]
            slots = [c.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for c, p in zip(plan.chunks, pos)]
            graphed = runner.graphs.run([c.token_ids[-1] for c in plan.chunks], pos, slots,
                                        [c.block_table for c in plan.chunks]).clone()
            input_ids, positions, meta, _, _ = runner.prepare(plan)
            eager = model(input_ids, positions, runner.kv_caches, meta)  # rewrites the same K/V slots
            rel = ((graphed.float() - eager.float()).abs().max() / eager.float().abs().max()).item()
            assert rel < tolerance, f"{name} {dtype_name} {kv_cache_dtype} step {step}: relative max diff {rel:.2e}"
            logits = model.compute_logits(eager)
            for s, row in zip(batch, logits):
                s.computed += 1
                s.tokens.append(int(row.argmax()))
    assert runner.graphs.replays == 6
