"""Architecture registry: Hugging Face model_type -> the module that implements it (imported lazily).

Each family also declares the defaults of its Hugging Face config class, because a config.json
written by ``save_pretrained`` leaves out every value equal to its class default.
An unknown architecture is a clear error listing what is supported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from trident.errors import TridentError

_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
}


@dataclass(frozen=True)
class Family:
    """One model family: where its code lives and its config defaults."""

    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    module: str
    class_name: str
    hf_defaults: dict[str, Any] = field(default_factory=dict)

    def load_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)


FAMILIES: tuple[Family, ...] = (
    Family(("llama",), ("LlamaForCausalLM",), "trident.models.llama", "LlamaForCausalLM", _LLAMA_DEFAULTS),
    Family(("mistral",), ("MistralForCausalLM",), "trident.models.llama", "LlamaForCausalLM",
           {**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
            "max_position_embeddings": 4096 * 32, "sliding_window": 4096}),
    Family(("qwen2",), ("Qwen2ForCausalLM",), "trident.models.qwen2", "Qwen2ForCausalLM",
           {**_LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016,
            "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}),
    Family(("qwen3",), ("Qwen3ForCausalLM",), "trident.models.qwen3", "Qwen3ForCausalLM",
           {**_LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "head_dim": 128,
            "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}),
    Family(("gemma2",), ("Gemma2ForCausalLM",), "trident.models.gemma", "GemmaForCausalLM",
           {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
            "rope_theta": 10000.0, "attention_bias": False, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    Family(("gemma3_text", "gemma3"), ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           "trident.models.gemma", "GemmaForCausalLM",
           {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "final_logit_softcapping": None, "attn_logit_softcapping": None}),
)

_QWEN_MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "use_sliding_window": False, "decoder_sparse_step": 1, "norm_topk_prob": False, "mlp_only_layers": [],
    "bos_token_id": None, "eos_token_id": None,
}
MOE_FAMILIES: tuple[Family, ...] = (
    Family(("mixtral",), ("MixtralForCausalLM",), "trident.models.mixtral", "MixtralForCausalLM",
           {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
            "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "rope_theta": 1e6, "sliding_window": None, "num_experts_per_tok": 2,
            "num_local_experts": 8}),
    Family(("qwen2_moe",), ("Qwen2MoeForCausalLM",), "trident.models.qwen_moe", "Qwen2MoeForCausalLM",
           {**_QWEN_MOE_DEFAULTS, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
            "sliding_window": 4096, "max_window_layers": 28, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60, "qkv_bias": True}),
    Family(("qwen3_moe",), ("Qwen3MoeForCausalLM",), "trident.models.qwen_moe", "Qwen3MoeForCausalLM",
           {**_QWEN_MOE_DEFAULTS, "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
            "attention_bias": False, "sliding_window": 4096, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
            "num_experts": 128}),
)
_DEEPSEEK_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "attention_bias": False, "mlp_bias": False, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": None, "topk_group": None,
}
MOE_FAMILIES += (
    Family(("deepseek_v2",), ("DeepseekV2ForCausalLM",), "trident.models.deepseek", "DeepseekV2ForCausalLM",
           {**_DEEPSEEK_DEFAULTS, "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048, "bos_token_id": 1,
            "eos_token_id": 2, "first_k_dense_replace": 0, "n_routed_experts": 64, "n_shared_experts": 2,
            "routed_scaling_factor": 1.0, "topk_method": "greedy", "norm_topk_prob": False,
            "num_experts_per_tok": None, "moe_intermediate_size": 1407}),
    Family(("deepseek_v3",), ("DeepseekV3ForCausalLM",), "trident.models.deepseek", "DeepseekV3ForCausalLM",
           {**_DEEPSEEK_DEFAULTS, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
            "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
            "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
            "norm_topk_prob": True, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
            "rope_interleave": True}),
)
"""Mixture-of-experts families (trident/moe/); DeepSeek-V2/V3 with multi-head latent attention."""
FAMILIES += MOE_FAMILIES


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str, architectures: list[str] | None = None) -> Family:
    """The family implementing ``model_type``; a TridentError naming the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    for family in FAMILIES:
        if architectures and any(a in family.architectures for a in architectures):
            return family
    raise TridentError(
        f"unsupported architecture {model_type!r} ({', '.join(architectures or []) or 'no architectures'}); "
        f"trident supports: {', '.join(supported_model_types())}"
    )


def model_class(model_type: str) -> type:
    return family_for(model_type).load_class()
