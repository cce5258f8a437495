"""Tiny shapes of the supported families (Hugging Face config.json dicts) for random-weight tests. The
vocabulary is above 10,000 so the nano workload's token ids fit."""

from __future__ import annotations

_COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 10240, "max_position_embeddings": 4096, "eos_token_id": 5}

TINY_SHAPES: dict[str, dict] = {
    "qwen3-tied": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_COMMON, "head_dim": 16,
                   "tie_word_embeddings": True},
    "llama3-scaled": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_COMMON,
                      "tie_word_embeddings": False, "rope_theta": 500000.0,
                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_COMMON,
                   "tie_word_embeddings": False},
    "gemma2-offset-norms": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **_COMMON,
                            "head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 16,
                            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "mixtral-window": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_COMMON,
                       "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                       "tie_word_embeddings": False},
    "qwen2-moe-shared": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **_COMMON,
                         "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 48, "mlp_only_layers": [0], "tie_word_embeddings": False},
}
