"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

The MoE decoder of mixtral.py with Qwen's settings: softmax top-k routing, renormalised only when
``norm_topk_prob``; layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` stride, keep a dense
MLP. Qwen2-MoE has q/k/v biases (``qkv_bias``) and a shared expert every token also goes through, scaled per token
by sigmoid(shared_expert_gate(x)); Qwen3-MoE has no biases and no shared expert, and RMS-normalises each query and
key head before the rotation. The experts' checkpoint matrices are ``experts.{e}.gate_proj`` / ``up_proj`` /
``down_proj`` (or transformers 5's fused ``experts.gate_up_proj`` / ``down_proj``).
"""

from __future__ import annotations

from trident.models.mixtral import MixtralForCausalLM


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    expert_part_names = ("gate_proj", "up_proj", "down_proj")
    renames = {}


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True
