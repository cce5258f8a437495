"""Tiny random Hugging Face models of every supported architecture (the independent reference)."""

from __future__ import annotations

import torch
import transformers

from trident.config import ModelConfig

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_hf_configs() -> dict[str, transformers.PretrainedConfig]:
    """name -> HF config. Sliding windows are short so test sequences cross them."""
    return {
        "llama": transformers.LlamaConfig(**COMMON, rope_theta=10000.0),
        "llama3-scaled": transformers.LlamaConfig(
            **COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}, tie_word_embeddings=True),
        "mistral-window": transformers.MistralConfig(**COMMON, sliding_window=7),
        "qwen2": transformers.Qwen2Config(**COMMON),
        "qwen3": transformers.Qwen3Config(**COMMON, head_dim=32),
        "gemma2": transformers.Gemma2Config(**COMMON, head_dim=24, sliding_window=6, query_pre_attn_scalar=20,
                                            attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
        "gemma3": transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=24,
                                                sliding_window=5, query_pre_attn_scalar=20,
                                                layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention", "sliding_attention"]),
        **tiny_moe_configs(),
    }


MOE_EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_moe_configs() -> dict[str, transformers.PretrainedConfig]:
    """The mixture-of-experts families: Mixtral with a sliding window; Qwen2-MoE with a gated shared expert and a
    dense layer (mlp_only_layers); Qwen3-MoE with renormalised top-3 and MoE on every second layer
    (decoder_sparse_step)."""
    return {
        "mixtral": transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=7),
        "qwen2_moe": transformers.Qwen2MoeConfig(**COMMON, **MOE_EXPERTS, shared_expert_intermediate_size=48,
                                                 mlp_only_layers=[1]),
        "qwen3_moe": transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=32,
                                                 **{**MOE_EXPERTS, "num_experts_per_tok": 3}, norm_topk_prob=True,
                                                 decoder_sparse_step=2),
        **tiny_deepseek_configs(),
    }


MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4)
DEEPSEEK_EXPERTS = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=4, topk_group=2)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
"""Yarn with DeepSeek's two mscales: the rotated parts and the softmax scale both change."""


def tiny_deepseek_configs() -> dict[str, transformers.PretrainedConfig]:
    """Multi-head latent attention with DeepSeek's experts: V2 with queries straight from q_proj, group-limited
    softmax routing, two shared experts; V3 with the low-rank query path, sigmoid routing with the score-correction
    bias, one shared expert, yarn rope scaling. Both keep a dense first layer (first_k_dense_replace). MLA's heads
    are all kv heads."""
    return {
        "deepseek_v2": transformers.DeepseekV2Config(**{**COMMON, **MLA}, **DEEPSEEK_EXPERTS, q_lora_rank=None,
                                                     topk_method="group_limited_greedy", n_shared_experts=2,
                                                     routed_scaling_factor=1.5),
        "deepseek_v3": transformers.DeepseekV3Config(**{**COMMON, **MLA}, **DEEPSEEK_EXPERTS, q_lora_rank=24,
                                                     n_shared_experts=1, routed_scaling_factor=2.5,
                                                     norm_topk_prob=True, rope_parameters=YARN),
    }


def tiny_llama_config(vocab_size: int, max_position_embeddings: int) -> transformers.LlamaConfig:
    """The small Llama the engine-level tests save as a folder: 2 layers, hidden 64, 4 heads / 2 kv heads, EOS 0."""
    return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=max_position_embeddings, eos_token_id=0, bos_token_id=1)


def make_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():  # larger-than-init weights so differences would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.dim() >= 1:
                p.normal_(0, 0.15)
    return model


def trident_config(config: transformers.PretrainedConfig) -> ModelConfig:
    raw = config.to_dict()
    return ModelConfig.from_hf_dict(raw)
