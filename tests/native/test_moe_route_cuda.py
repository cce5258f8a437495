"""The CUDA one-token router (trident/native/moe_route_cuda.cu) against float64 logits and the torch router.

The kernel's logits must be the float64 dot products of the token and each gate row within float32 accumulation
(rounded to the model's dtype unless the router runs in float32); from its own logits, the torch router
(trident/moe/router.py: route, then MoeLoadStats.record) must choose the same experts with the same weights, scores
and load statistics. Softmax and sigmoid scoring, with and without the score-correction bias, renormalisation and
scaling, 8 to 256 experts, top-1 to top-8, hidden sizes beyond what a lane prefetches, padding rows that must not
count, back-to-back calls (the ticket returns to 0) and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from trident.moe.config import RouterConfig
from trident.moe.router import Router, route
from trident.moe.stats import MoeLoadStats
from trident.native import moe_route_cuda

pytestmark = pytest.mark.gpu

CONFIGS = [
    RouterConfig(num_experts=8, top_k=2),  # Mixtral
    RouterConfig(num_experts=60, top_k=4, renormalize=False),  # Qwen2-MoE
    RouterConfig(num_experts=128, top_k=8),  # Qwen3-MoE
    RouterConfig(num_experts=160, top_k=6, renormalize=False, routed_scaling_factor=16.0),  # DeepSeek-V2, ungrouped
    RouterConfig(num_experts=256, top_k=8, scoring="sigmoid", routed_scaling_factor=2.5,
                 score_correction_bias=True),  # DeepSeek-V3-like, ungrouped
    RouterConfig(num_experts=16, top_k=1, scoring="sigmoid", renormalize=False),
]
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _stats(config: RouterConfig, real: bool, device: str) -> MoeLoadStats:
    stats = MoeLoadStats([2], config.num_experts, config.top_k, sigmoid_scores=config.scoring == "sigmoid")
    stats.begin_step(torch.tensor([0 if real else -1], device=device))
    return stats


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scoring}-E{c.num_experts}-k{c.top_k}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden_size", [64, 2048, 7168])
def test_route_equals_the_torch_router_on_its_logits(config: RouterConfig, dtype: torch.dtype,
                                                     hidden_size: int) -> None:
    gen = torch.Generator().manual_seed(config.num_experts * 10 + hidden_size)
    hidden = torch.randn(1, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(config.num_experts, hidden_size, generator=gen) * 2 / hidden_size**0.5).to(dtype)
    bias = torch.randn(config.num_experts, generator=gen) * 0.1 if config.score_correction_bias else None
    cuda = dict(hidden=hidden.cuda(), weight=weight.cuda(), bias=None if bias is None else bias.cuda())
    exact = hidden.double() @ weight.double().T
    # float32 accumulation of up to H / 32 products per lane, then a tree over the lanes: far below 2^-14 of sum |x w|
    allowance = 2**-14 * (hidden.double().abs() @ weight.double().abs().T) + 1e-30
    ticket = moe_route_cuda.new_ticket(torch.device("cuda"))
    assert moe_route_cuda.takes(cuda["hidden"], cuda["weight"], config, cuda["bias"])
    for round_logits in (True, False):
        for real in (True, False):
            stats = _stats(config, real, "cuda")
            weights, ids, scores, logits = moe_route_cuda.route(cuda["hidden"], cuda["weight"], config,
                                                                cuda["bias"], round_logits, ticket,
                                                                *stats.accumulators(2))
            logits = logits.cpu().double()
            what = f"round={round_logits} real={real}"
            if round_logits:  # float32 sum then one rounding to the dtype: within an ulp of the exact value
                assert ((logits - exact).abs() <= ULP[dtype] * exact.abs() + allowance).all(), what
                assert torch.equal(logits.to(dtype).double(), logits), what
            else:
                assert ((logits - exact).abs() <= allowance).all(), what
            want = route(logits.float(), config, bias)
            reference = _stats(config, real, "cpu")
            reference.record(2, want)
            torch.testing.assert_close(scores.cpu(), want.scores, rtol=1e-5, atol=1e-7)
            got_ids, order = ids.cpu().sort(dim=1)
            want_ids, want_order = want.expert_ids.sort(dim=1)
            assert torch.equal(got_ids, want_ids), what
            torch.testing.assert_close(weights.cpu().gather(1, order), want.weights.gather(1, want_order),
                                       rtol=1e-5, atol=1e-7)
            got, ref = stats.snapshot(), reference.snapshot()
            assert got.num_tokens == ref.num_tokens == int(real)
            assert got.layers[0].token_counts == ref.layers[0].token_counts, what
            torch.testing.assert_close(torch.tensor(got.layers[0].mean_probs), torch.tensor(ref.layers[0].mean_probs),
                                       rtol=1e-5, atol=1e-7)
    assert ticket.item() == 0, "the ticket did not return to 0"


def test_router_module_dispatch_and_cuda_graph_replay(monkeypatch) -> None:
    """Router.forward sends one CUDA token to the kernel (more tokens to the Triton path, with equal choices for the
    same token); a captured call replays on a new token."""
    config = RouterConfig(num_experts=128, top_k=8)
    router = Router(2048, config).cuda().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    router.weight.copy_(torch.randn(128, 2048, generator=gen) / 20)
    calls = []
    real = moe_route_cuda.route
    monkeypatch.setattr(moe_route_cuda, "route", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 2048, generator=gen).to(torch.bfloat16).cuda()
    one = router(x)
    assert calls == [1]
    two = router(torch.cat([x, x]))
    assert calls == [1], "two tokens went to the one-token kernel"
    assert torch.equal(one.expert_ids.sort(dim=1).values, two.expert_ids[:1].sort(dim=1).values)
    torch.testing.assert_close(one.weights.sort(dim=1).values, two.weights[:1].sort(dim=1).values, rtol=2e-2,
                               atol=1e-3)

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = router(static_x)
    static_x.copy_(torch.randn(1, 2048, generator=gen).to(torch.bfloat16).cuda())
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    fresh = router(static_x)
    assert torch.equal(captured.expert_ids, fresh.expert_ids) and torch.equal(captured.weights, fresh.weights)
    assert not torch.equal(captured.expert_ids, one.expert_ids)
