"""Expert parallelism over two gloo ranks on the CPU, against the same weights unsplit in this process.

The spawn of conftest.py's ``ranks`` fixture also runs tp_ranks.EP_SHAPES (Qwen2-MoE with a gated shared expert and
a dense layer, Mixtral) with expert parallelism: two whole experts of four per rank. Their step logits and greedy
tokens are compared with this process's unsplit engines in test_tensor_parallel.py (its SPLITS), their expert load
statistics here; the dispatch of one layer (compacted and masked) is checked here against the unsplit experts for
every rank of a group, without communication.
"""

from __future__ import annotations

import pytest
import torch
from tp_ranks import (
    ATOL,
    EP_SHAPES,
    SHAPES,
    SIZE,
    checkpoint,
    engine_config,
    step_logits,
)

from trident.cli import main
from trident.config import ModelConfig
from trident.distributed.config import ParallelConfig
from trident.distributed.experts import ExpertParallelExperts, expert_range
from trident.distributed.group import TensorParallel
from trident.distributed.shard import check_shardable, shard_config
from trident.engine.engine import LLMEngine
from trident.errors import TridentError
from trident.moe.experts import FusedExperts, TorchExperts

NUM_EXPERTS = 4


@pytest.mark.parametrize("name", EP_SHAPES)
def test_each_rank_holds_its_whole_experts(ranks, name):
    """Rank r's experts are the model's experts 2r and 2r + 1, every intermediate feature of them (not a slice of
    all four, as tensor parallelism alone keeps)."""
    config = ModelConfig.from_hf_dict(SHAPES[name])
    features = config.moe.moe_intermediate_size
    for rank, seen in enumerate(ranks):
        assert seen[f"ep/{name}/experts"] == [(2 * rank, (2, 2 * features, config.hidden_size))] * len(
            config.moe.sparse_layers)
        assert seen[f"{name}/experts"] == [(0, (NUM_EXPERTS, 2 * features // SIZE, config.hidden_size))] * len(
            config.moe.sparse_layers)  # tensor parallelism alone, for contrast


@pytest.mark.parametrize("name", EP_SHAPES)
def test_each_rank_reports_its_experts_load(ranks, name):
    """After the same steps, each rank's statistics report its own experts: their token counts, concatenated in rank
    order, are the unsplit model's, and so are their mean probabilities; imbalance is over the rank's experts; the
    whole view (any rank, no communication) is the unsplit model's."""
    engine = LLMEngine(engine_config(), checkpoint(SHAPES[name]))
    step_logits(engine)
    whole = engine.moe_stats()
    assert whole.num_tokens > 0 and whole.first_expert == 0
    per_rank = [seen[f"ep/{name}/moe_stats"] for seen in ranks]
    for rank, stats in enumerate(per_rank):
        assert (stats["first_expert"], stats["num_experts"]) == expert_range(NUM_EXPERTS, SIZE, rank)
        assert stats["num_tokens"] == whole.num_tokens
    for i, layer in enumerate(whole.layers):
        loads = [stats["layers"][i] for stats in per_rank]
        assert [load["layer"] for load in loads] == [layer.layer] * SIZE
        assert sum((load["token_counts"] for load in loads), ()) == layer.token_counts
        assert sum(layer.token_counts) == whole.top_k * whole.num_tokens
        got_probs = torch.tensor(sum((load["mean_probs"] for load in loads), ()))
        torch.testing.assert_close(got_probs, torch.tensor(layer.mean_probs), atol=ATOL, rtol=0)
        for load in loads:
            counts = load["token_counts"]
            assert load["imbalance"] == pytest.approx(max(counts) / (sum(counts) / len(counts)))
            assert load["entropy_term"] == pytest.approx(layer.entropy_term, abs=ATOL)
    for seen in ranks:
        assert [load["token_counts"] for load in seen[f"ep/{name}/moe_stats_whole"]["layers"]] == [
            layer.token_counts for layer in whole.layers]


def test_experts_that_do_not_split_are_a_clear_error(ranks):
    for seen in ranks:
        assert seen["ep/bad-experts/error"] == ("the model's 3 routed experts do not split evenly over "
                                                "--tensor-parallel 2 with --expert-parallel; use a size that "
                                                "divides 3")


class _CountingBackend(TorchExperts):
    """The torch reference, remembering how many (token, slot) pairs it was given."""

    def __init__(self) -> None:
        self.pairs: list[int] = []

    def forward(self, hidden, weights, expert_ids, *args, **kwargs):
        self.pairs.append(expert_ids.numel())
        return super().forward(hidden, weights, expert_ids, *args, **kwargs)


def _full_experts(num_experts: int, hidden: int, features: int) -> FusedExperts:
    generator = torch.Generator().manual_seed(3)
    experts = FusedExperts(num_experts, hidden, features, "silu", TorchExperts())
    experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.1)
    experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * 0.1)
    return experts


@pytest.mark.parametrize("masked", [False, True], ids=["compacted", "masked"])
@pytest.mark.parametrize("size", [2, 4])
def test_ranks_outputs_sum_to_the_unsplit_experts(masked, size):
    """Each rank's experts (compacted: only its pairs reach the backend; masked: every pair, the others' with
    weight 0), summed over the ranks as the block's all-reduce sums them, give the unsplit layer's output; a token
    none of whose experts a rank holds gets zeros there."""
    full = _full_experts(8, 16, 12)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 16, generator=generator)
    expert_ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(9)])
    expert_ids[0] = torch.tensor([7, 6])  # both on the last rank: zeros on the others
    weights = torch.rand(9, 2, generator=generator)
    want = full(hidden, weights, expert_ids)
    assert want.abs().max() > 1e-2
    total = torch.zeros_like(want)
    for rank in range(size):
        backend = _CountingBackend()
        full.backend = backend
        local = ExpertParallelExperts.shard(full, TensorParallel(rank=rank, size=size, group=None,
                                                                 control_group=None), masked=masked)
        first, count = expert_range(8, size, rank)
        assert (local.first_expert, local.num_experts) == (first, count)
        torch.testing.assert_close(local.gate_up_proj, full.gate_up_proj[first: first + count], atol=0, rtol=0)
        out = local(hidden, weights, expert_ids)
        if rank < size - 1:
            assert out[0].abs().max() == 0
        here = ((expert_ids >= first) & (expert_ids < first + count)).sum().item()
        assert backend.pairs == [expert_ids.numel() if masked else here]
        total += out
    torch.testing.assert_close(total, want, atol=ATOL, rtol=0)


def _moe_config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**SHAPES["qwen2-moe-shared"], **overrides})


def test_what_expert_parallelism_needs():
    """Whole experts per rank: the experts must split, their features need not; a dense model has none to split;
    expert parallelism needs more than one rank."""
    with pytest.raises(TridentError, match=r"model's 4 routed experts do not split evenly over --tensor-parallel 8 "
                                           "with --expert-parallel"):
        check_shardable(_moe_config(num_attention_heads=8, num_key_value_heads=8, head_dim=8), 8, True)
    odd_features = _moe_config(moe_intermediate_size=33)
    check_shardable(odd_features, 2, expert_parallel=True)
    assert shard_config(odd_features, 2, expert_parallel=True).moe.moe_intermediate_size == 33
    with pytest.raises(TridentError, match=r"moe_intermediate_size \(33\) does not split evenly"):
        check_shardable(odd_features, 2)
    with pytest.raises(TridentError, match=r"shared_expert_intermediate_size \(49\) does not split evenly"):
        check_shardable(_moe_config(shared_expert_intermediate_size=49), 2, expert_parallel=True)
    with pytest.raises(TridentError, match="llama has no routed experts for --expert-parallel to split"):
        check_shardable(ModelConfig.from_hf_dict(SHAPES["llama-gqa-bias"]), 2, expert_parallel=True)
    with pytest.raises(TridentError, match="--expert-parallel splits experts over the ranks of --tensor-parallel N"):
        ParallelConfig(expert_parallel=True)
    assert ParallelConfig(tensor_parallel_size=2, rank=1, expert_parallel=True).expert_parallel


def test_generate_expert_parallel_without_tensor_parallel_is_one_line(capsys):
    """The flag alone is an error before any model is read (the model path here does not exist)."""
    assert main(["generate", "/nonexistent/model", "--prompt", "hi", "--expert-parallel"]) == 2
    assert capsys.readouterr().err == ("error: --expert-parallel splits experts over the ranks of --tensor-parallel N; "
                                       "add --tensor-parallel N with N > 1 (a divisor of the number of experts)\n")


def test_quantized_experts_are_refused_before_any_change():
    """int8 experts are not split, whole or by features (no collective is reached: the group here is fake)."""
    from trident.distributed.shard import shard_model
    from trident.moe.quant import quantize_model_experts

    engine = LLMEngine(engine_config(), checkpoint(SHAPES["mixtral"]))
    quantize_model_experts(engine.model, bits=8)
    fake = TensorParallel(rank=0, size=2, group=None, control_group=None, expert_parallel=True)
    with pytest.raises(TridentError, match="QuantizedFusedExperts .quantized experts.: not supported with "
                                           "--tensor-parallel yet"):
        shard_model(engine.model, fake)
    assert engine.model.config.num_heads == SHAPES["mixtral"]["num_attention_heads"]  # nothing changed
    assert engine.model.load_stats.snapshot().num_experts == NUM_EXPERTS
