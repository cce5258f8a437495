"""Expert parallelism over two gloo ranks on the CPU, against the same weights unsplit in this process.

The spawn of conftest.py's ``ranks`` fixture also runs tp_ranks.EP_SHAPES (Qwen2-MoE with a gated shared expert and
a dense layer, Mixtral) and tp_ranks.QUANTIZED_EP (Qwen2-MoE with int8 and int4 experts) with expert parallelism: two
whole experts of four per rank. Their step logits and greedy tokens are compared with this process's unsplit engines
in test_tensor_parallel.py (its SPLITS), their expert load statistics here; the dispatch of one layer (compacted and
masked, float and quantized experts) is checked here against the unsplit experts for every rank of a group, without
communication, and so are the feature slices of quantized experts.
"""

from __future__ import annotations

import pytest
import torch
from tp_ranks import (
    ATOL,
    EP_SHAPES,
    QUANTIZED,
    QUANTIZED_EP,
    SHAPES,
    SIZE,
    checkpoint,
    engine_config,
    step_logits,
)

from trident.cli import main
from trident.config import ModelConfig
from trident.distributed.config import ParallelConfig
from trident.distributed.experts import ExpertParallelExperts, expert_features
from trident.distributed.group import TensorParallel
from trident.distributed.layers import even_share
from trident.distributed.shard import check_shardable, shard_config
from trident.engine.engine import LLMEngine
from trident.errors import TridentError
from trident.moe.experts import FusedExperts, TorchExperts
from trident.moe.quant import QuantizedFusedExperts

NUM_EXPERTS = 4


@pytest.mark.parametrize("name", (*EP_SHAPES, *QUANTIZED_EP))
def test_each_rank_holds_its_whole_experts(ranks, name):
    """Rank r's experts are the model's experts 2r and 2r + 1, every intermediate feature of them (not a slice of
    all four, as tensor parallelism alone keeps); int4 experts hold two codes a byte along H."""
    hf_config = QUANTIZED[name][0] if name in QUANTIZED else SHAPES[name]
    config = ModelConfig.from_hf_dict(hf_config)
    features = config.moe.moe_intermediate_size
    columns = config.hidden_size // (2 if name.startswith("int4") else 1)
    for rank, seen in enumerate(ranks):
        assert seen[f"ep/{name}/experts"] == [(2 * rank, (2, 2 * features, columns))] * len(
            config.moe.sparse_layers)
        assert seen[f"{name}/experts"] == [(0, (NUM_EXPERTS, 2 * features // SIZE, columns))] * len(
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
        assert (stats["first_expert"], stats["num_experts"]) == even_share(NUM_EXPERTS, SIZE, rank)
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


QUANTIZED_EXPERTS = {"float": None, "int8": (8, None), "int4-g32": (4, 32)}
"""Experts of the dispatch tests: float, int8 per channel, int4 in groups of 32 (bits, group size)."""


def _full_experts(num_experts: int, hidden: int, features: int, quantized: tuple[int, int | None] | None = None
                  ) -> FusedExperts | QuantizedFusedExperts:
    generator = torch.Generator().manual_seed(3)
    experts = FusedExperts(num_experts, hidden, features, "silu", TorchExperts())
    experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.1)
    experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * 0.1)
    return experts.double() if quantized is None else QuantizedFusedExperts.from_float(experts, *quantized)


def _routing(tokens: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [tokens, 64] float64, weights, expert ids [tokens, 2]) drawn at random."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(tokens, 64, generator=generator, dtype=torch.float64)
    expert_ids = torch.stack([torch.randperm(num_experts, generator=generator)[:2] for _ in range(tokens)])
    return hidden, torch.rand(tokens, 2, generator=generator), expert_ids


@pytest.mark.parametrize("quantized", QUANTIZED_EXPERTS)
@pytest.mark.parametrize("masked", [False, True], ids=["compacted", "masked"])
@pytest.mark.parametrize("size", [2, 4])
def test_ranks_outputs_sum_to_the_unsplit_experts(masked, size, quantized):
    """Each rank's experts (compacted: only its pairs reach the backend; masked: every pair, the others' with
    weight 0), summed over the ranks as the block's all-reduce sums them, give the unsplit layer's output; a token
    none of whose experts a rank holds gets zeros there. Quantized experts keep their codes and scales, whole."""
    full = _full_experts(8, 64, 64, QUANTIZED_EXPERTS[quantized])
    hidden, weights, expert_ids = _routing(9, 8)
    expert_ids[0] = torch.tensor([7, 6])  # both on the last rank: zeros on the others
    want = full(hidden, weights, expert_ids)
    assert want.abs().max() > 1e-2
    total = torch.zeros_like(want)
    for rank in range(size):
        backend = _CountingBackend()
        full.backend = backend
        local = ExpertParallelExperts.shard(full, TensorParallel(rank=rank, size=size, group=None,
                                                                 control_group=None), masked=masked)
        first, count = even_share(8, size, rank)
        assert (local.first_expert, local.num_experts) == (first, count)
        for name, tensor in full.named_buffers() if quantized != "float" else full.named_parameters():
            assert torch.equal(getattr(local.experts, name), tensor[first: first + count]), name
        out = local(hidden, weights, expert_ids)
        if rank < size - 1:
            assert out[0].abs().max() == 0
        here = ((expert_ids >= first) & (expert_ids < first + count)).sum().item()
        assert backend.pairs == [expert_ids.numel() if masked else here]
        total += out
    torch.testing.assert_close(total, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("quantized", ["int8", "int4-g32"])
def test_quantized_experts_features_sum_to_the_unsplit_experts(quantized):
    """Tensor parallelism on quantized experts: each rank's slice of every expert's features holds exactly the
    unsplit codes and scales of those features (gate and up rows; down's columns, int4 bytes and groups), and the
    ranks' outputs sum to the unsplit layer's."""
    full = _full_experts(4, 64, 128, QUANTIZED_EXPERTS[quantized])
    gate_up, down = full.dequantized(torch.float64)
    hidden, weights, expert_ids = _routing(7, 4)
    total = torch.zeros_like(hidden)
    for rank in range(2):
        local = expert_features(full, 64 * rank, 64)
        assert type(local) is QuantizedFusedExperts and local.intermediate_size == 64
        local_gate_up, local_down = local.dequantized(torch.float64)
        rows = torch.cat((torch.arange(64 * rank, 64 * rank + 64), torch.arange(128 + 64 * rank, 192 + 64 * rank)))
        assert torch.equal(local_gate_up, gate_up[:, rows])
        assert torch.equal(local_down, down[:, :, 64 * rank: 64 * rank + 64])
        total += local(hidden, weights, expert_ids)
    torch.testing.assert_close(total, full(hidden, weights, expert_ids), atol=1e-12, rtol=0)
    if quantized == "int4-g32":
        with pytest.raises(TridentError, match="int4 in groups of 32 experts cannot be cut at their down's input "
                                               "features 16..47, not whole quantization groups of 32"):
            expert_features(full, 16, 32)
    else:  # one scale per row: any features cut
        assert torch.equal(expert_features(full, 3, 5).dequantized(torch.float64)[1], down[:, :, 3:8])


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
