"""The MoE block that replaces a decoder layer's MLP: router, routed experts, optional shared expert.

out = experts(x, route(gate(x))) [+ shared(x), scaled by sigmoid(x . w) when the shared expert is gated].
Module names follow the checkpoints: ``gate`` (the router), ``experts`` (fused), ``shared_expert`` (a gated MLP:
Qwen2-MoE's one shared expert, or DeepSeek's n_shared_experts as one wider MLP) and ``shared_expert_gate``.
Each forward also adds the routing to the model's load statistics, when it keeps them.
"""

from __future__ import annotations

import torch
from torch import nn

from trident.models.layers import GatedMLP, Linear
from trident.moe.config import MoeConfig
from trident.moe.experts import ExpertsBackend, FusedExperts
from trident.moe.router import Router
from trident.moe.stats import MoeLoadStats


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, activation: str, moe: MoeConfig, layer_index: int,
                 experts_backend: ExpertsBackend, stats: MoeLoadStats | None) -> None:
        super().__init__()
        self.gate = Router(hidden_size, moe.router, float32=moe.router_float32)
        self.experts = FusedExperts(moe.router.num_experts, hidden_size, moe.moe_intermediate_size, activation,
                                    experts_backend)
        self.shared_expert = (GatedMLP(hidden_size, moe.shared_expert_intermediate_size, activation)
                              if moe.shared_expert_intermediate_size else None)
        self.shared_expert_gate = Linear(hidden_size, 1) if moe.shared_expert_gate else None
        self.layer_index = layer_index
        self.stats = stats

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        routing = self.gate(hidden, self.stats, self.layer_index)
        out = self.experts(hidden, routing.weights, routing.expert_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out
