"""Named model shapes for random-weight benchmarks: Hugging Face config.json dicts of real architectures.

Speed does not depend on weight values, so `trident bench --shape NAME` builds a model of the named shape
with random weights (trident/bench/random_weights.py) instead of reading gigabytes from disk. ``--shape``
also takes the path of any config.json (or of a folder holding one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trident.errors import TridentError

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-0.6B config.json: the nano-vllm offline-throughput model (TARGETS.md workload 1).
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "num_attention_heads": 16,
        "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 151936,
    },
    # meta-llama/Llama-3.1-8B config.json (Llama 3's shape with llama3 rope scaling): the batch-1 latency
    # model (TARGETS.md workload 2).
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
    # HuggingFaceTB/SmolLM2-135M config.json: the shape of the embedded default model.
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
        "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "vocab_size": 49152,
    },
    # Qwen/Qwen2.5-7B config.json (q/k/v biases are implicit in Qwen2).
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
    },
    # Qwen/Qwen3-30B-A3B config.json: the MoE model (TARGETS.md workload 3): 48 layers, 128 experts, top-8.
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    # Not a published model: Qwen3-30B-A3B's form (qwen3_moe, 128 experts, top-8, renormalised) at a size a laptop
    # CPU runs in seconds (hidden 256, 4 layers, experts of 64), for `trident bench ... --moe-report` and tests.
    "qwen3-moe-tiny": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 256,
        "intermediate_size": 768, "max_position_embeddings": 4096, "mlp_only_layers": [], "decoder_sparse_step": 1,
        "moe_intermediate_size": 64, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 16384,
    },
    # deepseek-ai/DeepSeek-V2-Lite config.json: multi-head latent attention (kv_lora_rank 512, no query bottleneck)
    # over 27 layers, the first dense, the others 64 routed experts top-6 plus 2 shared; yarn rope (factor 40).
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
        "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
        "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128,
        "vocab_size": 102400,
    },
}
"""Shape name -> the Hugging Face config.json of that model (copied verbatim unless a comment says otherwise)."""


@dataclass(frozen=True)
class Shape:
    """A model architecture without weights."""

    name: str
    """The registry name, or the config file's folder name for a config.json path."""
    hf_config: dict[str, Any] = field(repr=False)
    """The Hugging Face config.json dict (a private copy)."""
    source: str
    """"registry" or the path of the config.json it was read from."""


def known_shapes() -> list[str]:
    return sorted(SHAPES)


def resolve_shape(spec: str) -> Shape:
    """A registered shape by name, or the config.json at ``spec`` (a file, or a folder holding one)."""
    import copy

    if spec in SHAPES:
        return Shape(spec, copy.deepcopy(SHAPES[spec]), "registry")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        from trident.config import ModelConfig
        from trident.loader.jsonfile import read_json

        raw = read_json(path)
        ModelConfig.from_hf_dict(raw)  # an unsupported or incomplete config fails here, naming the problem
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return Shape(folder or os.path.basename(path), raw, path)
    raise TridentError(f"unknown shape {spec!r}: neither a known shape ({', '.join(known_shapes())}) nor a "
                       "config.json file or a folder holding one")
