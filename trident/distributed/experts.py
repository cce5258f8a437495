"""Routed experts split over the ranks. Expert parallelism: each rank holds whole routed experts of every MoE layer
and runs only its own experts' pairs; tensor parallelism alone: each rank holds a slice of every expert's features.

With expert parallelism on N ranks (ParallelConfig.expert_parallel), rank r holds experts [r E / N, (r + 1) E / N)
of each MoE layer (``even_share``, :func:`whole_experts`): ``gate_up_proj`` [E / N, 2I, H] and ``down_proj``
[E / N, H, I], whole experts (quantized experts: their codes and scales likewise), where tensor parallelism alone
gives every rank a slice of every expert's intermediate features (:func:`expert_features`). The router stays whole
and the residual stream is the same on every rank, so every rank routes every token alike;
:class:`ExpertParallelExperts` then adds up the outputs of the (token, slot) pairs routed to this rank's experts
only. Summed over the ranks (the block's one all-reduce, :class:`~trident.distributed.layers.ReducedMoeBlock`,
together with the shared expert's partial sum) that is every pair's output: the unsplit layer's.

Two ways of handing this rank's experts module (a FusedExperts or a QuantizedFusedExperts, which call their
backend, trident/moe/experts.py's interface) only this rank's pairs:

- compacted, for backends that cannot be captured in a CUDA graph anyway (the torch reference reads its per-expert
  counts on the host): the local pairs are selected (one host sync: how many there are), each becomes one row of a
  one-slot routing (its token's hidden state, its local expert, its weight), the backend runs those rows and their
  outputs are added into their tokens' rows. A rank computes its own pairs only, about T k / N of the T k.
- masked, for capturable backends (the Triton kernels): shapes fixed by T and k, no host sync. Pairs routed to other
  ranks are pointed at local expert 0 with weight 0. The kernels read only this rank's experts' weights (what a
  memory-bound decode step pays for) but run all T k pairs: local expert 0 takes the other ranks' pairs too, and
  their outputs, times 0, add nothing. Each rank thus does the unsplit layer's expert FLOPs (N times its share;
  prefill feels it) and local expert 0 may take more row blocks than the aligned layout of its own pairs would. An
  expert output that is not finite (inf times 0 is NaN) would also reach the other ranks' tokens; float32
  accumulation keeps bf16 / fp16 expert outputs finite in practice.
"""

from __future__ import annotations

import torch
from torch import nn

from trident.distributed.group import TensorParallel
from trident.distributed.layers import even_share, take
from trident.distributed.quantized import quantized_expert_features, quantized_whole_experts
from trident.moe.experts import FusedExperts
from trident.moe.quant import QuantizedFusedExperts

Experts = FusedExperts | QuantizedFusedExperts
"""A layer's routed experts, float or quantized."""


def _float_experts(full: FusedExperts, num_experts: int, intermediate_size: int, gate_up: torch.Tensor,
                   down: torch.Tensor) -> FusedExperts:
    with torch.device("meta"):  # nothing allocated: the parameters are set next
        layer = FusedExperts(num_experts, full.gate_up_proj.shape[2], intermediate_size, full.activation,
                             full.backend)
    layer.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    layer.down_proj = nn.Parameter(down, requires_grad=False)
    return layer


def whole_experts(full: Experts, first: int, count: int) -> Experts:
    """Experts ``first : first + count`` of ``full``, whole, of its kind (copies: the full tensors can be freed)."""
    if isinstance(full, QuantizedFusedExperts):
        return quantized_whole_experts(full, first, count)
    return _float_experts(full, count, full.intermediate_size, full.gate_up_proj[first: first + count].clone(),
                          full.down_proj[first: first + count].clone())


def expert_features(full: Experts, start: int, local: int) -> Experts:
    """Every expert's intermediate features ``start : start + local`` of ``full``, of its kind (tensor parallelism:
    its gate and up rows of them, down's columns; quantized experts: trident/distributed/quantized.py)."""
    if isinstance(full, QuantizedFusedExperts):
        return quantized_expert_features(full, start, local)
    features = full.intermediate_size
    return _float_experts(full, full.num_experts, local,
                          take(full.gate_up_proj, ((start, local), (features + start, local)), dim=1),
                          take(full.down_proj, ((start, local),), dim=2))


class ExpertParallelExperts(nn.Module):
    """This rank's whole experts of one MoE layer: ``experts`` (a FusedExperts or QuantizedFusedExperts) holds
    ``num_experts`` of them (local ids 0..), the model's experts ``first_expert`` onwards. Its forward takes the
    layer's full routing (the model's expert ids), hands ``experts`` this rank's pairs and returns the sum of their
    outputs, a partial sum over the ranks (see the module docstring for ``masked``)."""

    def __init__(self, experts: Experts, first_expert: int, masked: bool) -> None:
        super().__init__()
        self.experts = experts
        self.first_expert = first_expert
        """The model's id of local expert 0."""
        self.masked = masked
        """Whether the backend runs every pair, those of other ranks with weight 0 (else only this rank's)."""

    @property
    def num_experts(self) -> int:
        """The experts this rank holds."""
        return self.experts.num_experts

    @classmethod
    def shard(cls, full: Experts, parallel: TensorParallel, masked: bool | None = None) -> ExpertParallelExperts:
        """This rank's experts of ``full`` (copies: the full tensors can be freed). ``masked`` defaults to whether
        ``full``'s backend can be captured in a CUDA graph."""
        first, count = even_share(full.num_experts, parallel.size, parallel.rank)
        if masked is None:
            masked = full.backend.supports_cuda_graphs
        return cls(whole_experts(full, first, count), first, masked)

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], weights float32 [T, k], expert_ids [T, k] (the model's ids) -> [T, H]: the outputs of the
        pairs routed to this rank's experts, weighted and summed per token (zeros for a token with none here)."""
        local_ids = expert_ids - self.first_expert
        here = (local_ids >= 0) & (local_ids < self.num_experts)
        if self.masked:
            return self.experts(hidden, torch.where(here, weights, 0.0), torch.where(here, local_ids, 0))
        pairs = here.reshape(-1).nonzero().squeeze(1)  # pair p = t * k + slot; its count is read on the host
        tokens = pairs // expert_ids.shape[1]
        pair_out = self.experts(hidden[tokens], weights.reshape(-1)[pairs, None], local_ids.reshape(-1)[pairs, None])
        return torch.zeros_like(hidden).index_add_(0, tokens, pair_out)
