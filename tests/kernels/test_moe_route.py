"""The fused routing kernel (trident/kernels/moe_route.py) against the torch router (trident/moe/router.py: route,
then MoeLoadStats.record): the same experts per token, weights and scores within float32 rounding, and the same
load statistics, over softmax and sigmoid scoring, with and without the score-correction bias, renormalisation and
scaling, 8 to 160 experts, top-1 to top-8, padding rows that must not count."""

from __future__ import annotations

import pytest
import torch

from trident.kernels.moe_route import fused_route, supports
from trident.moe.config import RouterConfig
from trident.moe.router import route
from trident.moe.stats import MoeLoadStats

pytestmark = pytest.mark.gpu

CONFIGS = [
    RouterConfig(num_experts=8, top_k=2),  # Mixtral
    RouterConfig(num_experts=60, top_k=4, renormalize=False),  # Qwen2-MoE (60 experts: padded to 64 lanes)
    RouterConfig(num_experts=128, top_k=8),  # Qwen3-MoE
    RouterConfig(num_experts=160, top_k=6, renormalize=False, routed_scaling_factor=16.0),  # DeepSeek-V2, ungrouped
    RouterConfig(num_experts=64, top_k=8, scoring="sigmoid", routed_scaling_factor=2.5,
                 score_correction_bias=True),  # DeepSeek-V3-like, ungrouped
    RouterConfig(num_experts=16, top_k=1, scoring="sigmoid", renormalize=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scoring}-E{c.num_experts}-k{c.top_k}")
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_fused_route_equals_the_torch_router(kernel_device, config: RouterConfig, num_tokens: int) -> None:
    gen = torch.Generator().manual_seed(config.num_experts * 100 + num_tokens)
    # float32 logits: bfloat16 ones tie often among 128 experts, and torch.topk breaks ties its own way
    logits = torch.randn(num_tokens, config.num_experts, generator=gen) * 3
    bias = (torch.randn(config.num_experts, generator=gen) * 0.1 if config.score_correction_bias else None)
    padding = torch.rand(num_tokens, generator=gen) < 0.25
    padding[0] = False
    slots = torch.where(padding, -1, torch.arange(num_tokens))

    reference = MoeLoadStats([3], config.num_experts, config.top_k, sigmoid_scores=config.scoring == "sigmoid")
    reference.begin_step(slots)
    want = route(logits, config, bias)
    reference.record(3, want)

    fused = MoeLoadStats([3], config.num_experts, config.top_k, sigmoid_scores=config.scoring == "sigmoid")
    fused.begin_step(slots.to(kernel_device))
    weights, ids, scores = fused_route(logits.to(kernel_device), config,
                                       None if bias is None else bias.to(kernel_device), *fused.accumulators(3))

    assert ids.dtype == torch.int64 and weights.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(scores.cpu(), want.scores, rtol=1e-5, atol=1e-7)
    # the same experts per token (the order of the k is unspecified): compare each token's ids sorted
    got_ids, order = ids.cpu().sort(dim=1)
    want_ids, want_order = want.expert_ids.sort(dim=1)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(weights.cpu().gather(1, order), want.weights.gather(1, want_order), rtol=1e-5,
                               atol=1e-7)
    got, ref = fused.snapshot(), reference.snapshot()
    assert got.num_tokens == ref.num_tokens == int((~padding).sum())
    assert got.layers[0].token_counts == ref.layers[0].token_counts
    torch.testing.assert_close(torch.tensor(got.layers[0].mean_probs), torch.tensor(ref.layers[0].mean_probs),
                               rtol=1e-5, atol=1e-7)


def test_group_limited_routing_is_left_to_the_torch_path() -> None:
    assert not supports(RouterConfig(num_experts=64, top_k=6, num_groups=8, topk_groups=3))
    assert supports(RouterConfig(num_experts=64, top_k=6))
