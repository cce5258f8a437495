"""`trident info` numbers, checked against values computed here from the HF config and the file."""

from __future__ import annotations

import os

from rich.console import Console
from tiny_gguf import tiny_config, tiny_model, write_gguf

from trident.loader import load_checkpoint
from trident.loader.info import describe, human_bytes, info_rows, model_info


def test_info_of_a_quantized_gguf(tmp_path):
    config = tiny_config("qwen3", max_position_embeddings=4096)  # tied embeddings, head_dim 32
    model = tiny_model(config)
    path = write_gguf(str(tmp_path / "q.gguf"), model, "Q8_0")
    info = model_info(load_checkpoint(path))

    h, i, v, n_layers = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    q, kv = config.num_attention_heads * 32, config.num_key_value_heads * 32
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + 2 * 32  # + q_norm, k_norm
    params = n_layers * per_layer + v * h + h
    assert params == sum(p.numel() for n, p in model.state_dict().items() if n != "lm_head.weight")
    assert info.parameters == params
    matrices = n_layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + v * h
    vectors = params - matrices
    assert info.stored_types == {
        "Q8_0": (n_layers * 7 + 1, matrices // 32 * 34),
        "F32": (n_layers * 4 + 1, vectors * 4),
    }
    assert info.weights_float32_bytes == 4 * params and info.weights_bfloat16_bytes == 2 * params
    assert info.kv_bytes_per_token_float32 == 2 * n_layers * config.num_key_value_heads * 32 * 4
    assert info.kv_bytes_per_token_bfloat16 == 2 * n_layers * config.num_key_value_heads * 32 * 2
    assert info.kv_bytes_per_token_8bit == 2 * n_layers * config.num_key_value_heads * (32 + 4)
    assert info.kv_bytes_full_context_bfloat16 == info.kv_bytes_per_token_bfloat16 * 4096
    assert info.file_bytes == os.path.getsize(path)
    assert (
        info.num_layers,
        info.num_heads,
        info.num_kv_heads,
        info.head_dim,
        info.vocab_size,
        info.context_length,
    ) == (2, 4, 2, 32, 96, 4096)
    assert info.model_type == "qwen3" and info.format == "gguf"


def test_info_counts_sliding_layers_at_their_window(tmp_path):
    config = tiny_config("gemma2", max_position_embeddings=1000, sliding_window=100)  # layer 0 sliding, 1 full
    model = tiny_model(config)
    model.save_pretrained(tmp_path)
    info = model_info(load_checkpoint(str(tmp_path)))
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * 2
    assert info.kv_bytes_full_context_bfloat16 == per_layer_token * (100 + 1000)
    assert info.stored_types == {"F32": (len(model.state_dict()) - 1, 4 * info.parameters)}


def test_describe_renders(tmp_path):
    model = tiny_model(tiny_config("llama"))
    path = write_gguf(str(tmp_path / "m.gguf"), model, "Q4_0")
    checkpoint = load_checkpoint(path)
    console = Console(record=True, width=200)
    console.print(describe(checkpoint))
    text = console.export_text()
    for label, value in info_rows(model_info(checkpoint)):
        assert label in text and value.split(" ")[0] in text
    assert "Q4_0" in text and "KV cache" in text


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(98362432) == "93.8 MiB"


def test_info_of_a_mixture_of_experts_folder(tmp_path):
    """The experts row states the HF config's routed experts, top-k, scoring, sizes and sparse layers; a dense
    model has none."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from hf_tiny import make_hf_model, tiny_moe_configs

    hf_config = tiny_moe_configs()["qwen2_moe"]
    make_hf_model(hf_config).save_pretrained(tmp_path)
    info = model_info(load_checkpoint(str(tmp_path)))
    sparse = sum(1 for i in range(hf_config.num_hidden_layers) if i not in (hf_config.mlp_only_layers or [])
                 and (i + 1) % hf_config.decoder_sparse_step == 0)
    assert info.experts == (
        f"{hf_config.num_experts} routed, top-{hf_config.num_experts_per_tok} (softmax), expert intermediate "
        f"{hf_config.moe_intermediate_size}, shared expert {hf_config.shared_expert_intermediate_size}; on "
        f"{sparse} of {hf_config.num_hidden_layers} layers")
    assert ("experts", info.experts) in info_rows(info)
    dense = model_info(load_checkpoint(write_gguf(str(tmp_path / "d.gguf"), tiny_model(tiny_config("llama")), "F32")))
    assert dense.experts is None and all(label != "experts" for label, _ in info_rows(dense))
