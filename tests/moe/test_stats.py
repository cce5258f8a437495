"""Expert load statistics: the accumulators against counts and averages computed by hand (padding rows left out,
reset), and the engine's figures for a tiny Mixtral / Qwen2-MoE folder against the experts transformers' own
routers pick for the same tokens."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from trident.moe.config import RouterConfig
from trident.moe.router import route
from trident.moe.stats import MoeLoadStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


def test_counts_probabilities_imbalance_and_entropy_by_hand() -> None:
    config = RouterConfig(num_experts=4, top_k=2)
    stats = MoeLoadStats([1, 3], num_experts=4, top_k=2, sigmoid_scores=False, alpha=0.5)
    empty = stats.snapshot()
    assert empty.num_tokens == 0 and all(layer.imbalance == 0.0 for layer in empty.layers)
    gen = torch.Generator().manual_seed(0)
    steps = []
    for rows in (5, 3):
        slots = torch.arange(rows)
        slots[-1] = -1  # a padding row (CUDA-graph bucket): not counted
        stats.begin_step(slots)
        layer_routings = {layer: route(torch.randn(rows, 4, generator=gen) * 2, config) for layer in (1, 3)}
        for layer, routing in layer_routings.items():
            stats.record(layer, routing)
        steps.append(layer_routings)
    snap = stats.snapshot()
    assert snap.num_tokens == 4 + 2 and [layer.layer for layer in snap.layers] == [1, 3]
    for i, layer in enumerate((1, 3)):
        counts = [0] * 4
        prob_sums = [0.0] * 4
        for step in steps:
            routing = step[layer]
            for row in range(routing.expert_ids.shape[0] - 1):  # the last row is padding
                for e in routing.expert_ids[row].tolist():
                    counts[e] += 1
                for e in range(4):
                    prob_sums[e] += float(routing.scores[row, e])
        load = snap.layers[i]
        assert list(load.token_counts) == counts and sum(counts) == 2 * 6
        assert load.imbalance == pytest.approx(max(counts) / (sum(counts) / 4))
        mean = [s / 6 for s in prob_sums]
        assert load.mean_probs == pytest.approx(mean, rel=1e-6)
        assert load.entropy_term == pytest.approx(0.5 * sum(p * math.log(p) for p in mean), rel=1e-6)
        assert sum(load.token_share) == pytest.approx(1.0)
    stats.reset()
    after = stats.snapshot()
    assert after.num_tokens == 0 and all(sum(layer.token_counts) == 0 for layer in after.layers)


def test_sigmoid_scores_are_normalised_per_token() -> None:
    config = RouterConfig(num_experts=4, top_k=1, scoring="sigmoid")
    stats = MoeLoadStats([0], num_experts=4, top_k=1, sigmoid_scores=True)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [3.0, 0.0, 0.0, -2.0]])
    stats.begin_step(torch.arange(2))
    stats.record(0, route(logits, config))
    sig = torch.sigmoid(logits.double())
    expected = (sig / sig.sum(-1, keepdim=True)).mean(0)
    load = stats.snapshot().layers[0]
    assert load.mean_probs == pytest.approx(expected.tolist(), rel=1e-6)
    assert list(load.token_counts) == [1, 0, 0, 1]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_engine_moe_stats_match_transformers_routing(name: str, tmp_path) -> None:
    """A save_pretrained folder (per-expert checkpoint names) through the loader and the engine: greedy tokens equal
    transformers' greedy continuation, and each layer's token counts equal the experts transformers' routers
    choose for the same tokens."""
    from hf_tiny import make_hf_model, tiny_moe_configs

    from trident import LLM
    from trident.engine.request import SamplingParams

    hf_config = tiny_moe_configs()[name]
    hf = make_hf_model(hf_config, seed=4)
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4, max_num_batched_tokens=16)
    prompts = [[5, 17, 42, 8, 9, 61, 3], [33, 2, 71, 14, 50], [90, 11, 7, 29, 30, 31, 45, 46, 60]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    stats = llm.moe_stats()
    num_experts = stats.num_experts
    sparse = llm.engine.model_config.moe.sparse_layers
    expected = {layer: torch.zeros(num_experts, dtype=torch.long) for layer in sparse}
    num_tokens = 0
    for prompt, out in zip(prompts, outputs):
        fed = prompt + list(out.outputs[0].token_ids)[:-1]  # the last sampled token is never fed back
        num_tokens += len(fed)
        with torch.no_grad():
            hf_out = hf(torch.tensor([fed]), output_router_logits=True)
        # greedy continuation: each generated token is the argmax after the tokens before it
        assert hf_out.logits[0, len(prompt) - 1:].argmax(-1).tolist() == list(out.outputs[0].token_ids)
        for layer, logits in zip(sparse, hf_out.router_logits):
            ids = torch.topk(torch.softmax(logits.float(), -1), hf_config.num_experts_per_tok, dim=-1).indices
            expected[layer] += torch.bincount(ids.flatten(), minlength=num_experts)
    assert stats.num_tokens == num_tokens
    assert [load.layer for load in stats.layers] == list(sparse)
    for load in stats.layers:
        assert list(load.token_counts) == expected[load.layer].tolist(), f"layer {load.layer}"
        assert 1.0 <= load.imbalance <= num_experts / stats.top_k
        assert -math.log(num_experts) <= load.entropy_term < 0
    llm.engine.reset_moe_stats()
    assert llm.moe_stats().num_tokens == 0
