"""The fused experts backend: trident/kernels/moe_experts.py's Triton kernels behind the ExpertsBackend interface.

Four launches per layer (routing alignment, gate|up with the activation, down with the routing weights, the sum
over k), none reading a value back on the host: a decode step with this backend is capturable in a CUDA graph.
It takes bfloat16 / float16 models on CUDA (trident/moe/registry.py picks it there, and the torch reference
elsewhere), with experts of the activations' dtype, int8 codes with per-row scales or int4 codes with per-group scales
(trident/moe/quant.py); the kernel tests also run it on the CPU under Triton's interpreter.

One token with int8 or int4 experts (batch-1 decode) goes to the CUDA kernels of trident/native/moe_gemv_cuda.cu
instead, where nvcc built them (two launches: gate|up with the activation, then down with the weights and the sum over
k); 2 to moe_batched_cuda.MAX_TOKENS tokens with int4 experts in groups of 128 (or per channel) to
trident/native/moe_batched_cuda.cu's (grouped by expert, integer mma on the tensor cores).
"""

from __future__ import annotations

import torch

from trident.kernels.moe_experts import fused_experts


class TritonExperts:
    """Routed experts through the fused Triton kernels (see the module docstring). The result equals
    :class:`~trident.moe.experts.TorchExperts`' within the activation dtype's rounding: each token's k weighted
    expert outputs are rounded to that dtype, then summed in float32 (the reference adds them up in the dtype)."""

    supports_cuda_graphs = True

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, activation: str, *,
                gate_up_scales: torch.Tensor | None = None, down_scales: torch.Tensor | None = None) -> torch.Tensor:
        from trident.native import moe_batched_cuda, moe_gemv_cuda

        if moe_gemv_cuda.takes(hidden, expert_ids, gate_up, down, gate_up_scales, down_scales, activation):
            return moe_gemv_cuda.experts(hidden, weights, expert_ids, gate_up, down, activation, gate_up_scales,
                                         down_scales)
        if moe_batched_cuda.takes(hidden, expert_ids, gate_up, down, gate_up_scales, down_scales, activation):
            return moe_batched_cuda.experts(hidden, weights, expert_ids, gate_up, down, activation, gate_up_scales,
                                            down_scales)
        return fused_experts(hidden, weights, expert_ids, gate_up, down, activation, gate_up_scales=gate_up_scales,
                             down_scales=down_scales)
