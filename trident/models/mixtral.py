"""Mixtral, and the decoder every Llama-form mixture-of-experts family here shares (qwen_moe.py).

The Llama block (pre-norm, grouped-query attention, rotary embeddings, the residual stream carried beside the
sublayer output as in llama.py) with the MLP of the layers listed in ``ModelConfig.moe.sparse_layers`` replaced
by a :class:`~trident.moe.block.SparseMoeBlock`; the other layers keep the dense gated MLP.

Mixtral: 8 experts, top-2, softmax renormalised over the two; no shared expert; optional sliding window on every
layer. Its checkpoints name the block ``block_sparse_moe`` and the experts' matrices w1 (gate), w3 (up), w2 (down);
transformers 5 names them ``mlp`` and ``experts.gate_up_proj`` / ``experts.down_proj``; both load.

These models are not ``LlamaForCausalLM`` subclasses on purpose: the lean CPU decode step
(trident/engine/cpu_decode.py) runs Llama-form dense MLPs only, and declines every other class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from trident.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from trident.config import ModelConfig
from trident.models.layers import Attention, Linear
from trident.models.llama import LlamaDecoderLayer, LlamaModel
from trident.models.weights import LayerLoaded, PackedModules, attention_mlp_packing, load_weights
from trident.moe.block import SparseMoeBlock
from trident.moe.experts import ExpertsBackend, TorchExperts, expert_packing
from trident.moe.stats import MoeLoadStats

AttentionFactory = Callable[[ModelConfig, int, AttentionBackend], nn.Module]
"""(config, layer index, backend) -> a layer's attention module, called as attn(hidden, rope, kv_cache, meta)."""


def moe_decoder_layer(config: ModelConfig, layer_index: int, backend: AttentionBackend,
                      experts_backend: ExpertsBackend, stats: MoeLoadStats,
                      attention: AttentionFactory) -> LlamaDecoderLayer:
    """The Llama block with the family's attention, its MLP a SparseMoeBlock on the sparse layers (the dense gated
    MLP on the others)."""
    moe = config.moe
    assert moe is not None
    mlp = None
    if moe.is_sparse(layer_index):
        mlp = SparseMoeBlock(config.hidden_size, config.hidden_act, moe, layer_index, experts_backend, stats)
    return LlamaDecoderLayer(config, layer_index, backend, False, mlp, attention(config, layer_index, backend))


class MoeModel(LlamaModel):
    """LlamaModel whose forward first tells the load statistics which rows of the step count."""

    def __init__(self, config: ModelConfig, layers: Iterable[nn.Module], stats: MoeLoadStats) -> None:
        super().__init__(config, layers)
        self.stats = stats

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        self.stats.begin_step(meta.slot_mapping)
        return super().forward(input_ids, positions, kv_caches, meta)


class MixtralForCausalLM(nn.Module):
    """A Llama-form MoE causal LM (see the module docstring); subclasses set the per-family class attributes."""

    qk_norm = False
    expert_part_names = ("w1", "w3", "w2")
    """The per-expert checkpoint matrices (gate, up, down)."""
    renames: Mapping[str, str] = {".block_sparse_moe.": ".mlp."}
    """Checkpoint name fragment -> the model's."""
    checkpoint_names: Mapping[str, str] = {}
    """Model name fragment -> transformers 5's, where they differ (DeepSeek's ``shared_experts``), for writing
    checkpoints of the model's weights (trident/bench/random_weights.py)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend,
                 experts_backend: ExpertsBackend | None = None) -> None:
        super().__init__()
        if config.moe is None:
            raise ValueError(f"{type(self).__name__} needs a config with experts (ModelConfig.moe)")
        self.config = config
        router = config.moe.router
        self.load_stats = MoeLoadStats(config.moe.sparse_layers, router.num_experts, router.top_k,
                                       sigmoid_scores=router.scoring == "sigmoid")
        """The expert load statistics (trident/moe/stats.py), kept on the device as the model runs."""
        self.experts_backend = experts_backend or TorchExperts()
        layers = (moe_decoder_layer(config, i, backend, self.experts_backend, self.load_stats, self.attention)
                  for i in range(config.num_layers))
        self.model = MoeModel(config, layers, self.load_stats)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def attention(self, config: ModelConfig, layer_index: int, backend: AttentionBackend) -> nn.Module:
        """One layer's attention module (grouped-query attention here; DeepSeek's latent attention overrides)."""
        return Attention(config, layer_index, backend, qk_norm=self.qk_norm)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether the experts backend can be captured (the attention backend answers for itself)."""
        return self.experts_backend.supports_cuda_graphs

    @property
    def packed_modules(self) -> PackedModules:
        moe = self.config.moe
        shared = {}
        if moe.shared_expert_intermediate_size:  # before the dense MLP's entry, whose rows differ
            rows = moe.shared_expert_intermediate_size
            shared = {"shared_expert.gate_up_proj": (("shared_expert.gate_proj", rows),
                                                     ("shared_expert.up_proj", rows))}
        return {**shared, **attention_mlp_packing(self.config)}

    @property
    def expert_modules(self) -> PackedModules:
        gate, up, down = self.expert_part_names
        return expert_packing(gate, up, down, self.config.moe.moe_intermediate_size, self.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerKVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.logits(hidden)
        return self.lm_head(hidden)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                     device: torch.device, layer_loaded: LayerLoaded | None = None) -> None:
        if self.config.tie_word_embeddings:
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        float32 = (".gate.weight", ".gate.e_score_correction_bias") if self.config.moe.router_float32 else ()
        load_weights(self, tensors, self.packed_modules, dtype=dtype, device=device,
                     expert_modules=self.expert_modules, renames=self.renames, float32_suffixes=float32,
                     layer_loaded=layer_loaded)
