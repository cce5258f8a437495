"""Llama family: Llama 2/3, SmolLM2, Mistral (and the base of Qwen2/Qwen3).

Pre-norm decoder: x += attn(norm(x)); x += mlp(norm(x)). Grouped-query attention, rotary
embeddings (default, linear or llama3 scaling), SiLU-gated MLP, optional sliding window (Mistral).

The residual stream x travels beside the sublayer output (vLLM's form): a layer takes (hidden, residual)
and each norm adds hidden into the residual and normalises the sum in one step, so on CUDA the add and
the norm are one kernel. The first layer has no residual yet (None): the embeddings are the stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from trident.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from trident.config import ModelConfig
from trident.models.layers import Attention, Embedding, GatedMLP, Linear, RMSNorm, RotaryEmbedding
from trident.models.ops import RotaryInputs
from trident.models.weights import LayerLoaded, PackedModules, attention_mlp_packing, load_weights


class LlamaDecoderLayer(nn.Module):
    """``mlp``: the feed-forward sublayer (default the dense gated MLP; the MoE families pass their expert block);
    ``attention``: the attention sublayer, called as attention(hidden, rope, kv_cache, meta) (default grouped-query
    :class:`Attention`, with per-head q/k norms if ``qk_norm``; DeepSeek passes its latent attention)."""

    def __init__(self, config: ModelConfig, layer_index: int, backend: AttentionBackend, qk_norm: bool,
                 mlp: nn.Module | None = None, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention if attention is not None else Attention(config, layer_index, backend,
                                                                            qk_norm=qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else GatedMLP(config.hidden_size, config.intermediate_size,
                                                        config.hidden_act, config.mlp_bias)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's MLP output, the residual stream before it is added). The dense attention and MLP take
        their norm with them (Attention / GatedMLP.forward_normed: one launch with the first product where a
        quantized layer's batch-1 CUDA kernel fuses it)."""
        if isinstance(self.self_attn, Attention):
            hidden, residual = self.self_attn.forward_normed(hidden, residual, self.input_layernorm, rope, kv_cache,
                                                             meta)
        else:
            hidden, residual = self.input_layernorm.with_residual(hidden, residual)
            hidden = self.self_attn(hidden, rope, kv_cache, meta)
        if isinstance(self.mlp, GatedMLP):
            return self.mlp.forward_normed(hidden, residual, self.post_attention_layernorm)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embeddings, the decoder ``layers`` (LlamaDecoderLayer: dense here, with expert blocks or latent attention in
    the MoE families), the final norm."""

    def __init__(self, config: ModelConfig, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The causal LM: ``forward`` gives final hidden states, ``compute_logits`` the chosen rows' logits."""

    qk_norm = False

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, (LlamaDecoderLayer(config, i, backend, self.qk_norm)
                                         for i in range(config.num_layers)))
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def packed_modules(self) -> PackedModules:
        return attention_mlp_packing(self.config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: the greedy argmax needs nothing wider (the sampler widens to float32
        where it computes probabilities), and a [batch, vocab] float32 copy per step is not free."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.logits(hidden)
        return self.lm_head(hidden)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                     device: torch.device, layer_loaded: LayerLoaded | None = None) -> None:
        if self.config.tie_word_embeddings:
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        load_weights(self, tensors, self.packed_modules, dtype=dtype, device=device, layer_loaded=layer_loaded)
