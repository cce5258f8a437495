"""The router: from a layer's router logits to each token's experts and their weights.

:func:`route` computes, in float32, for logits [tokens, num_experts]:

1. scores: softmax over the experts, or a sigmoid of each logit (``RouterConfig.scoring``);
2. choice scores: the scores plus the score-correction bias when the router has one (DeepSeek-V3);
3. group-limited routing (``num_groups`` > 1): each group of consecutive experts is ranked by its best
   choice score (``max``) or the sum of its two best (``top2_sum``); experts outside the token's best
   ``topk_groups`` groups cannot be chosen;
4. the top_k experts by choice score; their weights are their scores (without the bias), divided by their
   sum when ``renormalize`` (plus 1e-20 with sigmoid scores, as DeepSeek-V3 does), times
   ``routed_scaling_factor``.

That is the arithmetic of transformers 5.24's gates for mixtral, qwen2_moe, qwen3_moe, deepseek_v2 and
deepseek_v3 (trident/moe/config.py says which settings each family uses). The order of the k experts of a
token is unspecified (the sum over them does not depend on it). :class:`Router` is the module holding the
gate weights, under the checkpoints' names (``gate.weight``, ``gate.e_score_correction_bias``); on CUDA it runs
the arithmetic after the logits, and the load statistics' accumulation, as one Triton launch
(trident/kernels/moe_route.py; group-limited routing stays on this torch path); one token on CUDA takes the logits
too in the same launch (trident/native/moe_route_cuda.cu), where nvcc built it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trident.models import ops
from trident.moe.config import RENORMALIZE_EPS_SIGMOID, RouterConfig

if TYPE_CHECKING:  # stats.py takes Routing from here
    from trident.moe.stats import MoeLoadStats

__all__ = ["Router", "RouterConfig", "Routing", "route"]


@dataclass(frozen=True)
class Routing:
    """Where each token goes. ``scores`` also feed the load statistics (trident/moe/stats.py)."""

    weights: torch.Tensor
    """float32 [tokens, top_k]: how much each chosen expert's output counts."""
    expert_ids: torch.Tensor
    """int64 [tokens, top_k]: the chosen experts."""
    scores: torch.Tensor
    """float32 [tokens, num_experts]: softmax probabilities or sigmoid scores (no bias, no scaling)."""


def route(logits: torch.Tensor, config: RouterConfig, correction_bias: torch.Tensor | None = None) -> Routing:
    """Route tokens by their router logits [tokens, num_experts] (any float dtype; widened to float32)."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if config.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if config.grouped:
        choice = _mask_to_best_groups(choice, config)
    if correction_bias is None and not config.grouped:
        weights, expert_ids = torch.topk(scores, config.top_k, dim=-1)
    else:
        expert_ids = torch.topk(choice, config.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
    if config.renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        if config.scoring == "sigmoid":
            total = total + RENORMALIZE_EPS_SIGMOID
        weights = weights / total
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return Routing(weights=weights, expert_ids=expert_ids, scores=scores)


def _mask_to_best_groups(choice: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """``choice`` with the experts outside each token's best ``topk_groups`` groups set to -inf."""
    tokens = choice.shape[0]
    grouped = choice.view(tokens, config.num_groups, config.num_experts // config.num_groups)
    if config.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, config.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, config.num_experts)


class Router(nn.Module):
    """A layer's gate: logits = hidden W^T [tokens, num_experts], then :func:`route`. With ``float32`` the
    logits come from float32 copies of the hidden states and weights (DeepSeek), else from the model's dtype."""

    def __init__(self, hidden_size: int, config: RouterConfig, float32: bool = False) -> None:
        super().__init__()
        self.config = config
        self.float32 = float32
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.empty(config.num_experts), requires_grad=False)
                                        if config.score_correction_bias else None)
        self._ticket: torch.Tensor | None = None
        """The CUDA one-token kernel's counter (trident/native/moe_route_cuda.py), made (zeroed) on its first call
        outside a CUDA-graph capture (the engine's warm-up step before each capture is one)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.float32:
            return F.linear(hidden.float(), self.weight.float())
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor, stats: MoeLoadStats | None = None, layer: int = -1) -> Routing:
        """The routing of hidden [tokens, hidden]; with ``stats``, added to layer ``layer``'s load statistics."""
        if hidden.is_cuda and hidden.shape[0] == 1:
            routing = self._one_token_cuda(hidden, stats, layer)
            if routing is not None:
                return routing
        logits = self.logits(hidden)
        if ops.uses_kernels(logits):
            from trident.kernels import moe_route

            if moe_route.supports(self.config):
                accumulators = stats.accumulators(layer) if stats is not None else (None, None, None)
                weights, expert_ids, scores = moe_route.fused_route(logits, self.config, self.e_score_correction_bias,
                                                                    *accumulators)
                return Routing(weights=weights, expert_ids=expert_ids, scores=scores)
        routing = route(logits, self.config, self.e_score_correction_bias)
        if stats is not None:
            stats.record(layer, routing)
        return routing

    def _one_token_cuda(self, hidden: torch.Tensor, stats: MoeLoadStats | None, layer: int) -> Routing | None:
        """One token's routing by the CUDA kernel (logits and routing in one launch), or None where it does not
        apply (trident/native/moe_route_cuda.py's ``takes``)."""
        from trident.native import moe_route_cuda

        if not moe_route_cuda.takes(hidden, self.weight, self.config, self.e_score_correction_bias):
            return None
        if self._ticket is None or self._ticket.device != hidden.device:
            if torch.cuda.is_current_stream_capturing():  # a capture would not run the zeroing: not here
                return None
            self._ticket = moe_route_cuda.new_ticket(hidden.device)
        accumulators = stats.accumulators(layer) if stats is not None else (None, None, None)
        weights, expert_ids, scores, _ = moe_route_cuda.route(hidden, self.weight, self.config,
                                                              self.e_score_correction_bias, not self.float32,
                                                              self._ticket, *accumulators)
        return Routing(weights=weights, expert_ids=expert_ids, scores=scores)
