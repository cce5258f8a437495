"""The router against transformers' gate modules (same hidden states and weights) and against a float64
computation written token by token from the definitions, in every mode: softmax / sigmoid scoring, with and
without renormalisation, routed scaling, score-correction bias, group-limited routing (max and top2_sum)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from trident.errors import TridentError
from trident.moe.config import moe_config_from_hf
from trident.moe.router import Router, RouterConfig, route

HIDDEN = 64
TOKENS = 200

# name -> (transformers gate class, config): every router setting the five families use
HF_GATES = {
    "mixtral": (MixtralTopKRouter, transformers.MixtralConfig(
        hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeTopKRouter, transformers.Qwen2MoeConfig(
        hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    "qwen3_moe": (Qwen3MoeTopKRouter, transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
    "deepseek_v2-greedy": (DeepseekV2TopkRouter, transformers.DeepseekV2Config(
        hidden_size=HIDDEN, n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy",
        routed_scaling_factor=1.5)),
    "deepseek_v2-grouped": (DeepseekV2TopkRouter, transformers.DeepseekV2Config(
        hidden_size=HIDDEN, n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    "deepseek_v3": (DeepseekV3TopkRouter, transformers.DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)),
    "deepseek_v3-plain": (DeepseekV3TopkRouter, transformers.DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False)),
}


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (weights, ids) ordered by expert id (the order of a token's k experts is free)."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


@pytest.mark.parametrize("name", list(HF_GATES))
def test_router_equals_transformers_gate(name: str) -> None:
    gate_class, hf_config = HF_GATES[name]
    model_type = name.split("-")[0]
    router_config = moe_config_from_hf(model_type, hf_config.to_dict(), 1).router  # as trident reads the config
    torch.manual_seed(0)
    hf_gate = gate_class(hf_config)
    with torch.no_grad():
        hf_gate.weight.normal_(0, 0.3)
        if hasattr(hf_gate, "e_score_correction_bias"):
            hf_gate.e_score_correction_bias.normal_(0, 0.2)
    hidden = torch.randn(TOKENS, HIDDEN)
    ours = Router(HIDDEN, router_config, float32=model_type.startswith("deepseek"))
    ours.weight = torch.nn.Parameter(hf_gate.weight.detach().clone(), requires_grad=False)
    if router_config.score_correction_bias:
        ours.e_score_correction_bias = torch.nn.Parameter(hf_gate.e_score_correction_bias.clone(),
                                                          requires_grad=False)
    with torch.no_grad():
        _, hf_weights, hf_ids = hf_gate(hidden)
        routing = ours(hidden)
    assert routing.weights.dtype == torch.float32 and routing.expert_ids.shape == (TOKENS, router_config.top_k)
    w, ids = _by_expert(routing.weights, routing.expert_ids)
    hf_w, hf_ids = _by_expert(hf_weights.float(), hf_ids)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=1e-6, atol=1e-7)


def _hand_route(logits: torch.Tensor, c: RouterConfig, bias: torch.Tensor | None):
    """Token by token in float64, from the definitions (trident/moe/router.py's docstring)."""
    out_w, out_ids = [], []
    size = c.num_experts // c.num_groups
    for row in logits.double().tolist():
        if c.scoring == "softmax":
            m = max(row)
            e = [math.exp(x - m) for x in row]
            scores = [x / sum(e) for x in e]
        else:
            scores = [1 / (1 + math.exp(-x)) for x in row]
        choice = [s + (float(bias[i]) if bias is not None else 0.0) for i, s in enumerate(scores)]
        allowed = range(c.num_experts)
        if c.num_groups > 1:
            groups = [sorted(choice[g * size:(g + 1) * size], reverse=True) for g in range(c.num_groups)]
            rank = [g[0] if c.group_score == "max" else g[0] + g[1] for g in groups]
            best = sorted(range(c.num_groups), key=lambda g: -rank[g])[: c.topk_groups]
            allowed = [i for i in range(c.num_experts) if i // size in best]
        chosen = sorted(sorted(allowed, key=lambda i: -choice[i])[: c.top_k])
        w = [scores[i] for i in chosen]
        if c.renormalize:
            w = [x / sum(w) for x in w]
        out_w.append([x * c.routed_scaling_factor for x in w])
        out_ids.append(chosen)
    return torch.tensor(out_w, dtype=torch.float64), torch.tensor(out_ids)


HAND_MODES = {
    "softmax-renorm": RouterConfig(num_experts=8, top_k=2),
    "softmax-raw-scaled": RouterConfig(num_experts=6, top_k=3, renormalize=False, routed_scaling_factor=0.7),
    "softmax-groups-max": RouterConfig(num_experts=12, top_k=4, num_groups=4, topk_groups=2),
    "sigmoid-renorm": RouterConfig(num_experts=8, top_k=3, scoring="sigmoid"),
    "sigmoid-bias-groups-top2": RouterConfig(num_experts=16, top_k=4, scoring="sigmoid", num_groups=4,
                                             topk_groups=2, group_score="top2_sum", routed_scaling_factor=2.5,
                                             score_correction_bias=True),
    "top_k-all": RouterConfig(num_experts=4, top_k=4, renormalize=False),
}


@pytest.mark.parametrize("mode", list(HAND_MODES))
def test_route_equals_float64_hand_computation(mode: str) -> None:
    c = HAND_MODES[mode]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, c.num_experts, generator=gen) * 2
    bias = torch.randn(c.num_experts, generator=gen) * 0.3 if c.score_correction_bias else None
    routing = route(logits, c, bias)
    w, ids = _by_expert(routing.weights, routing.expert_ids)
    ref_w, ref_ids = _hand_route(logits, c, bias)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    if c.renormalize and c.routed_scaling_factor == 1.0:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(64))


def test_route_of_bfloat16_logits_widens_first() -> None:
    logits = torch.randn(16, 8).to(torch.bfloat16)
    routing = route(logits, RouterConfig(num_experts=8, top_k=2))
    ref = route(logits.float(), RouterConfig(num_experts=8, top_k=2))
    assert routing.weights.dtype == torch.float32
    assert torch.equal(routing.weights, ref.weights) and torch.equal(routing.expert_ids, ref.expert_ids)


@pytest.mark.parametrize("kwargs", [dict(num_experts=4, top_k=5), dict(num_experts=4, top_k=1, scoring="relu"),
                                    dict(num_experts=6, top_k=2, num_groups=4),
                                    dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2),
                                    dict(num_experts=8, top_k=1, num_groups=2, topk_groups=3)])
def test_invalid_router_configs_are_user_errors(kwargs) -> None:
    with pytest.raises(TridentError):
        RouterConfig(**kwargs)
