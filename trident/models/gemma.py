"""Gemma 2 and Gemma 3 (text).

Differences from Llama: embeddings scaled by sqrt(hidden_size); RMSNorm scales by (1 + weight);
four norms per layer (before and after attention and MLP); GeLU-tanh gated MLP; attention scale from
query_pre_attn_scalar; sliding-window and global layers interleaved; Gemma 2 soft-caps attention
scores and final logits with tanh; Gemma 3 norms each query/key head and gives its sliding layers
their own rotary base.

As in llama.py, the residual stream travels beside the sublayer output, so each residual add fuses with
the norm that reads the sum (input_layernorm, pre_feedforward_layernorm, the final norm); the post-norms
of the attention and MLP outputs stay plain norms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trident.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from trident.config import SLIDING_ATTENTION, ModelConfig
from trident.models.layers import Attention, Embedding, GatedMLP, RMSNorm, RotaryEmbedding
from trident.models.ops import RotaryInputs
from trident.models.weights import LayerLoaded, PackedModules, attention_mlp_packing, load_weights


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, backend: AttentionBackend) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.is_sliding = config.layer_types[layer_index] == SLIDING_ATTENTION
        self.input_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.self_attn = Attention(config, layer_index, backend, qk_norm=config.model_type == "gemma3_text",
                                   norm_unit_offset=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's normed MLP output, the residual stream before it is added)."""
        hidden, residual = self.input_layernorm.with_residual(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, rope, kv_cache, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i, backend) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self.rotary_local = RotaryEmbedding(config.rope_local, config.head_dim) if config.rope_local else None
        self.embed_scale = config.hidden_size ** 0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # The scale is rounded to the activation dtype first, as the reference implementation does.
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        rope = self.rotary(positions, hidden.dtype)
        rope_local = self.rotary_local(positions, hidden.dtype) if self.rotary_local else rope
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope_local if layer.is_sliding else rope, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class GemmaForCausalLM(nn.Module):
    """Gemma 2 / Gemma 3 text causal LM (embeddings always tied)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, backend)
        self.final_logit_softcapping = config.final_logit_softcapping

    @property
    def packed_modules(self) -> PackedModules:
        return attention_mlp_packing(self.config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.embed_tokens.logits(hidden).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                     device: torch.device, layer_loaded: LayerLoaded | None = None) -> None:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        load_weights(self, tensors, self.packed_modules, dtype=dtype, device=device, layer_loaded=layer_loaded)
