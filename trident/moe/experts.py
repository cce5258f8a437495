"""Routed experts: fused weights, the backend interface that runs them, and the torch reference.

All experts of a layer live in two tensors, as transformers 5 holds them: ``gate_up_proj`` [E, 2I, H] (each
expert's gate rows, then its up rows) and ``down_proj`` [E, H, I]. Checkpoints that store one matrix per expert
(``experts.{e}.gate_proj.weight`` / ``w1`` ...) are stacked into them at load time by the packing of
trident/models/weights.py (:func:`expert_packing`).

A backend computes, for hidden [T, H] and a routing (weights, expert ids [T, k]),
``out[t] = sum_j weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with e = expert_ids[t, j].
:class:`TorchExperts` is the reference (CPU, and CUDA without the fused kernel): the (token, expert) pairs sorted
by expert, then per active expert one gathered matmul through gate|up, the gated activation, one matmul through
down, the weighting, and an index_add into the output. Only the active experts' weights are read. The fused
GPU path (Triton, trident/moe/experts_triton.py) implements the same :class:`ExpertsBackend` and is tested against
this one; trident/moe/registry.py names the backends and picks one for a device and dtype.

Experts may also be held as int8 codes with per-row float32 scales, or packed int4 codes with per-group ones
(:class:`trident.moe.quant.QuantizedFusedExperts`, the formats in trident/moe/quant.py): a backend then gets the codes
as ``gate_up`` / ``down`` and the scales as ``gate_up_scales`` / ``down_scales``. The reference dequantizes each
active expert to the activations' dtype before its matmuls; the fused kernels multiply the codes and scale their
float32 accumulators.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from trident.models import ops
from trident.moe.registry import EXPERTS_BACKENDS, create_experts_backend

__all__ = ["EXPERTS_BACKENDS", "ExpertsBackend", "FusedExperts", "TorchExperts", "create_experts_backend",
           "expert_packing"]


class ExpertsBackend(Protocol):
    """Runs a layer's routed experts over the tokens routed to them."""

    supports_cuda_graphs: bool
    """Whether a forward can be captured in a CUDA graph (no host sync, launches fixed by shapes)."""

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, activation: str, *,
                gate_up_scales: torch.Tensor | None = None, down_scales: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H]; weights float32 [T, k]; expert_ids int64 [T, k]; gate_up [E, 2I, H]; down [E, H, I]
        -> [T, H] in hidden's dtype. With ``gate_up_scales`` and ``down_scales`` (float32), gate_up and down are
        codes: int8 with scales [E, 2I] / [E, H] (weight = code * its row's scale), or packed int4 (uint8
        [E, 2I, H / 2] / [E, H, I / 2]) with scales [E, 2I, H / G] / [E, H, I / G] (trident/moe/quant.py)."""
        ...


class TorchExperts:
    """The reference backend: tokens sorted by expert, one matmul pair per active expert (see the module
    docstring). Each expert's output is weighted in float32 and added into the result in the activations'
    dtype, expert after expert in id order, as transformers does. It reads the per-expert counts on the host,
    so it cannot be captured in a CUDA graph. Quantized experts: each active expert is dequantized to the activations'
    dtype (codes times scales in float32, one rounding), then multiplied as a float one."""

    supports_cuda_graphs = False

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, activation: str, *,
                gate_up_scales: torch.Tensor | None = None, down_scales: torch.Tensor | None = None) -> torch.Tensor:
        if (gate_up_scales is None) != (down_scales is None):
            raise ValueError("quantized experts need both gate_up_scales and down_scales")
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert, in id order
        counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
        token_of = order // top_k
        pair_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(hidden)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            end = start + count
            tokens = token_of[start:end]
            gate_up_e, down_e = gate_up[expert], down[expert]
            if gate_up_scales is not None:
                from trident.moe.quant import dequantize_experts

                gate_up_e = dequantize_experts(gate_up_e, gate_up_scales[expert], hidden.dtype)
                down_e = dequantize_experts(down_e, down_scales[expert], hidden.dtype)
            h = ops.act_and_mul(hidden[tokens] @ gate_up_e.t(), activation) @ down_e.t()
            out.index_add_(0, tokens, (h * pair_weights[start:end, None]).to(out.dtype))
            start = end
        return out


class FusedExperts(nn.Module):
    """The routed experts of one layer as two fused tensors (named as transformers 5 names them), run through
    ``backend``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str,
                 backend: ExpertsBackend) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self.activation = ops.check_activation(activation)
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(hidden, weights, expert_ids, self.gate_up_proj, self.down_proj, self.activation)


def expert_packing(gate: str, up: str, down: str, intermediate_size: int, hidden_size: int
                   ) -> dict[str, tuple[tuple[str, int], ...]]:
    """How per-expert checkpoint matrices fill the fused tensors (for ``load_weights``' ``expert_modules``):
    ``experts.{e}.<gate>.weight`` and ``<up>`` into ``experts.gate_up_proj`` [e], ``<down>`` into
    ``experts.down_proj`` [e]. The names are gate_proj / up_proj / down_proj in Qwen and DeepSeek
    checkpoints, w1 / w3 / w2 in Mixtral's."""
    return {"gate_up_proj": ((gate, intermediate_size), (up, intermediate_size)),
            "down_proj": ((down, hidden_size),)}
