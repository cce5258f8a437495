"""Qwen3: the Llama block with an RMSNorm over each query and key head before the rotary embedding,
and no q/k/v biases."""

from __future__ import annotations

from trident.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
