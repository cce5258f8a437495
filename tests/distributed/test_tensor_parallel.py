"""Tensor parallelism over two gloo ranks on the CPU, against the same weights unsplit (TP=1) in this process.

One spawn of two ranks (the ``ranks`` fixture of conftest.py, shared with test_expert_parallel.py) runs every model
of tp_ranks.SHAPES and tp_ranks.QUANTIZED (int8 / int4 weight-only models, quantized whole before the split): the
logits of fixed prefill, mixed and decode steps through the engine's runner, and rank 0's greedy generation through
the engine (the other rank following its plans); then a model whose heads do not split. The tests compare what the
ranks saw with this process's unsplit engines (the same quantized weights).
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from tp_ranks import (
    ASYNC_SHAPES,
    EP_SHAPES,
    QUANTIZED,
    QUANTIZED_EP,
    SHAPES,
    SIZE,
    assert_ranks_logits_equal,
    checkpoint,
    engine_config,
    generate,
    shape_checkpoint,
    step_logits,
    torch_products,
)

from trident.attention.torch_ref import TorchAttention
from trident.config import ModelConfig
from trident.distributed.config import ParallelConfig
from trident.distributed.group import TensorParallel
from trident.distributed.layers import ColumnParallelLinear
from trident.distributed.shard import (
    ModelSharder,
    check_shardable,
    heads_of,
    kv_heads_of,
    shard_config,
    shard_model,
)
from trident.engine.engine import LLMEngine
from trident.errors import TridentError
from trident.models.build import build_model
from trident.models.layers import GatedMLP

SPLITS = ([pytest.param(name, "", id=name) for name in (*SHAPES, *QUANTIZED)]
          + [pytest.param(name, "ep/", id=f"expert-parallel-{name}") for name in (*EP_SHAPES, *QUANTIZED_EP)])
"""(model, prefix of what the ranks saw): every shape and quantized model split by tensor parallelism, the MoE ones
by expert parallelism too (test_expert_parallel.py)."""


@pytest.mark.parametrize(("name", "split"), SPLITS)
def test_logits_equal_unsplit(ranks, name, split):
    """Prefill, prefill beside decodes, decodes: every rank has the full logits, equal to TP=1's."""
    with torch_products(name):
        reference = step_logits(LLMEngine(engine_config(), shape_checkpoint(name)))
    assert_ranks_logits_equal(ranks, f"{split}{name}/logits", reference)


@pytest.mark.parametrize(("name", "split"), SPLITS)
def test_greedy_generation_equals_unsplit(ranks, name, split):
    """The engine split over two ranks (asynchronous scheduling for some shapes: pending tokens on every rank)
    generates TP=1's tokens."""
    with torch_products(name):
        engine = LLMEngine(engine_config(async_scheduling=name in ASYNC_SHAPES), shape_checkpoint(name))
        assert ranks[0][f"{split}{name}/tokens"] == generate(engine)


@pytest.mark.parametrize("name", SHAPES)
def test_kv_cache_holds_this_ranks_heads(ranks, name):
    """Each rank's cache holds its kv heads (its share, uneven where they do not split evenly, or the one it reads
    when there are fewer than ranks), with the same block count on every rank."""
    config = ModelConfig.from_hf_dict(SHAPES[name])
    expected = [kv_heads_of(config.num_kv_heads, SIZE, rank)[1] for rank in range(SIZE)]
    assert [seen[f"{name}/kv_heads"] for seen in ranks] == expected
    assert len({seen[f"{name}/num_blocks"] for seen in ranks}) == 1
    whole = LLMEngine(engine_config(), checkpoint(SHAPES[name])).kv_block_bytes
    assert [seen[f"{name}/kv_block_bytes"] for seen in ranks] == [whole * kv // config.num_kv_heads
                                                                  for kv in expected]


def test_heads_that_do_not_split_are_a_clear_error(ranks):
    for seen in ranks:
        assert seen["bad-heads/error"] == (
            "the model has 3 attention heads and 1 kv head, fewer than --tensor-parallel 2: each rank would need a "
            "whole share of one kv head's query heads; use a size that divides 3")


def _config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**SHAPES["llama-gqa-bias"], **overrides})


def test_unsplittable_shapes():
    with pytest.raises(TridentError, match="12 attention heads and 2 kv heads, fewer than --tensor-parallel 3"):
        check_shardable(_config(num_attention_heads=12, num_key_value_heads=2, head_dim=8), 3)
    with pytest.raises(TridentError, match=r"intermediate_size \(96\) does not split evenly over --tensor-parallel 64"):
        check_shardable(_config(num_attention_heads=64, num_key_value_heads=64, head_dim=8), 64)
    deepseek = ModelConfig.from_hf_dict({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1})
    with pytest.raises(TridentError, match="multi-head latent attention .* not supported with --tensor-parallel yet"):
        check_shardable(deepseek, 2)


def test_heads_per_rank():
    assert [kv_heads_of(4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_heads_of(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]  # replicated
    assert [heads_of(8, 2, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # SmolLM2-135M over two ranks (9 heads, 3 kv heads), and 6 kv heads over 4: as even as they go
    assert [(kv_heads_of(3, 2, r), heads_of(9, 3, 2, r)) for r in range(2)] == [((0, 1), (0, 3)), ((1, 2), (3, 6))]
    assert [kv_heads_of(6, 4, r) for r in range(4)] == [(0, 1), (1, 2), (3, 1), (4, 2)]
    local = shard_config(_config(), 2)
    assert (local.num_heads, local.num_kv_heads, local.hidden_size, local.vocab_size) == (2, 1, 64, 101)
    smollm = _config(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert [(c.num_heads, c.num_kv_heads) for c in (shard_config(smollm, 2, rank=r) for r in range(2))] == [(3, 1),
                                                                                                          (6, 2)]


_FAKE = TensorParallel(rank=0, size=2, group=None, control_group=None)
"""Rank 0 of two, for splits that must fail before any collective."""
MISALIGNED = ("model.layers.0.mlp.down_proj (int4 in groups of 32) does not split over --tensor-parallel 2: rank 0 "
              "would hold its input features 0..47, not whole quantization groups of 32; quantize it with a group "
              "size that divides 48 (or per channel), or use another --tensor-parallel size")
"""int4 in groups of 32 of llama-gqa-bias, whose MLP's 96 intermediate features give each of two ranks 48."""


def test_quantized_groups_that_do_not_split_are_a_clear_error():
    """Input features that would cut a quantization group are an error naming the layer, raised by shard_model
    before anything changes, and by check_shardable from the checkpoint's description (what the commands check
    before any rank starts); the same model in groups that split, or per channel, passes."""
    from trident.bench.quantized_weights import quantization_plan, quantize_checkpoint
    from trident.models.build import meta_model
    from trident.quant.rtn import QuantConfig

    int4 = QuantConfig(bits=4, group_size=32)
    engine = LLMEngine(engine_config(), quantize_checkpoint(checkpoint(SHAPES["llama-gqa-bias"]), int4))
    with pytest.raises(TridentError) as error:
        shard_model(engine.model, _FAKE)
    assert str(error.value) == MISALIGNED
    assert engine.model.config.num_heads == SHAPES["llama-gqa-bias"]["num_attention_heads"]  # nothing changed
    config = ModelConfig.from_hf_dict(SHAPES["llama-gqa-bias"])
    with pytest.raises(TridentError) as error:
        check_shardable(config, 2, quantization=quantization_plan(meta_model(config), int4))
    assert str(error.value) == MISALIGNED
    for fits in (QuantConfig(bits=4, group_size=None), QuantConfig(bits=8, group_size=None)):
        check_shardable(config, 2, quantization=quantization_plan(meta_model(config), fits))
    moe = ModelConfig.from_hf_dict({**QUANTIZED["int4-g32/qwen2-moe-shared"][0], "moe_intermediate_size": 96})
    plan = quantization_plan(meta_model(moe), int4)
    with pytest.raises(TridentError, match=r"model.layers.1.mlp.experts \(down\) \(int4 in groups of 32\) does not "
                                           "split over --tensor-parallel 2: rank 0 would hold its input features "
                                           "0..47, not whole quantization groups of 32"):
        check_shardable(moe, 2, quantization=plan)
    check_shardable(moe, 2, expert_parallel=True, quantization=plan)  # whole experts: their features stay whole
    int8 = QuantConfig(bits=8)  # int8 layers split anywhere; experts of their own int4 format are checked as such
    check_shardable(moe, 2, quantization=quantization_plan(meta_model(moe), int8))
    with pytest.raises(TridentError, match=r"model.layers.1.mlp.experts \(down\) \(int4 in groups of 32\) does not "
                                           "split over --tensor-parallel 2"):
        check_shardable(moe, 2, quantization=quantization_plan(meta_model(moe), int8, experts_config=int4))


def test_quantized_lm_heads_embeddings_and_w8a8_layers_are_refused_before_any_change():
    """What the split does not cut yet (an int8 LM head, an int8 embedding table as a tied head or a GGUF file's
    native one, W8A8 layers) is a clear error, nothing changed."""
    from trident.quant.head import quantize_head
    from trident.quant.linear import replace_module
    from trident.quant.w8a8 import W8A8Linear

    engine = LLMEngine(engine_config(), checkpoint(SHAPES["llama-gqa-bias"]))
    quantize_head(engine.model)
    with pytest.raises(TridentError, match="lm_head is a QuantizedLinear, which .quantized weights. is not supported "
                                           "with --tensor-parallel yet"):
        shard_model(engine.model, _FAKE)
    engine = LLMEngine(engine_config(), checkpoint(SHAPES["qwen3-tied"]))
    quantize_head(engine.model)
    with pytest.raises(TridentError, match=r"model.embed_tokens is a QuantizedEmbedding, which \(quantized weights\) "
                                           "is not supported with --tensor-parallel yet; use an unquantized checkpoint "
                                           r"\(for a GGUF file: --gguf-weights dequantize\)"):
        shard_model(engine.model, _FAKE)
    engine = LLMEngine(engine_config(), checkpoint(SHAPES["llama-gqa-bias"]))
    name = "model.layers.1.self_attn.o_proj"
    replace_module(engine.model, name, W8A8Linear.from_linear(engine.model.get_submodule(name)))
    with pytest.raises(TridentError, match=f"{name} is a W8A8Linear .quantized weights.: not supported with "
                                           "--tensor-parallel yet"):
        shard_model(engine.model, _FAKE)
    assert type(engine.model.model.layers[0].self_attn.o_proj).__name__ == "Linear"  # nothing changed


def test_parallel_config_is_validated():
    with pytest.raises(TridentError, match="rank 2 is outside"):
        ParallelConfig(tensor_parallel_size=2, rank=2)
    with pytest.raises(TridentError, match="backend"):
        ParallelConfig(backend="mpi")
    with pytest.raises(TridentError, match="positive integer"):
        ParallelConfig(tensor_parallel_size=0)


@pytest.mark.parametrize(("name", "expert_parallel"), [("llama-gqa-bias", False), ("mixtral", False),
                                                     ("mixtral", True)], ids=["dense", "moe", "moe-expert-parallel"])
def test_a_rank_splits_each_layer_as_it_loads(name, expert_parallel):
    """What an engine's rank does (ModelSharder as build_model's hook): when a decoder layer's weights are all set,
    the later layers are not loaded yet (meta) and the earlier ones hold their slices only; the full fused tensors
    the layer is cut from (qkv, gate|up, the routed experts) are released then (nothing keeps them alive); and the
    finished model equals shard_model's split of the whole loaded model."""
    ckpt = shape_checkpoint(name)
    parallel = dataclasses.replace(_FAKE, expert_parallel=expert_parallel)
    sharder = ModelSharder(parallel, torch.device("cpu"))
    freed = []

    def layer_loaded(model, path):
        parent, index = path.rsplit(".", 1)
        layers, index = model.get_submodule(parent), int(index)
        assert all(p.is_meta for layer in layers[index + 1:] for p in layer.parameters()), f"{path}: later loaded"
        assert all(isinstance(layer.self_attn.qkv_proj, ColumnParallelLinear) for layer in layers[:index]), path
        attn, mlp = layers[index].self_attn, layers[index].mlp
        fused = ([attn.qkv_proj.weight, mlp.gate_up_proj.weight] if isinstance(mlp, GatedMLP)
                 else [attn.qkv_proj.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj])
        refs = [weakref.ref(t) for t in fused]
        del fused, attn, mlp
        sharder.layer_loaded(model, path)
        gc.collect()
        freed.append([ref() is None for ref in refs])

    model = sharder.finish(build_model(ckpt.config, ckpt.tensors, dtype=torch.float32, device=torch.device("cpu"),
                                       backend=TorchAttention(), layer_loaded=layer_loaded))
    assert len(freed) == ckpt.config.num_layers >= 2 and all(all(layer) for layer in freed), freed
    whole = shard_model(build_model(ckpt.config, ckpt.tensors, dtype=torch.float32, device=torch.device("cpu"),
                                    backend=TorchAttention()), parallel)
    ours, theirs = dict(model.named_parameters()), dict(whole.named_parameters())
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
