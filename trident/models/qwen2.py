"""Qwen2: the Llama block with biases on the q, k and v projections (always on in Hugging Face's
Qwen2, so they are not a config option there), optional sliding window on the upper layers."""

from __future__ import annotations

import dataclasses

from trident.attention.base import AttentionBackend
from trident.config import ModelConfig
from trident.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(dataclasses.replace(config, attention_bias=True), backend)
