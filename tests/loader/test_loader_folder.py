"""Hugging Face folders: save_pretrained output (single file, sharded, multimodal gemma3) loads with tensors
equal to the model's state_dict, and the config equals the one read from the model's own config."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers
from tiny_gguf import tiny_config, tiny_model

from trident.config import ModelConfig
from trident.loader import load_checkpoint
from trident.loader.safetensors import text_model_name


def _expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_folder_equals_state_dict(kind, tmp_path):
    model = tiny_model(tiny_config(kind), seed=1)
    model.save_pretrained(tmp_path)
    ours = load_checkpoint(str(tmp_path))
    expected = _expected_tensors(model)
    assert sorted(ours.tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ours.tensors[name], t), name
    assert ours.config == ModelConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    assert ours.format == "safetensors" and ours.tokenizer is None
    assert set(ours.tensor_types.values()) == {"F32"}
    assert ours.file_bytes == (tmp_path / "model.safetensors").stat().st_size


def test_sharded_bfloat16_folder(tmp_path):
    model = tiny_model(tiny_config("llama"), seed=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = load_checkpoint(str(tmp_path))
    expected = _expected_tensors(model)
    assert sorted(ours.tensors) == sorted(expected)
    for name, t in expected.items():
        assert ours.tensors[name].dtype == torch.bfloat16 and torch.equal(ours.tensors[name], t), name
    assert set(ours.tensor_types.values()) == {"BF16"}


def test_gemma3_multimodal_folder_loads_its_text_model(tmp_path):
    text = tiny_config("gemma3")
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        mm_tokens_per_image=4,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    ours = load_checkpoint(str(tmp_path))
    assert ours.config.model_type == "gemma3_text" and ours.config.num_layers == text.num_hidden_layers
    expected = {}
    for name, t in model.state_dict().items():  # in memory: model.language_model.*, model.vision_tower.*
        renamed = text_model_name(name)
        if renamed is not None and renamed != "lm_head.weight":  # tied
            expected[renamed] = t
    assert sorted(ours.tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ours.tensors[name], t), name


def test_text_model_names():
    assert text_model_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert text_model_name("language_model.model.norm.weight") == "model.norm.weight"
    assert text_model_name("language_model.lm_head.weight") == "lm_head.weight"
    assert text_model_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight") is None
    assert text_model_name("multi_modal_projector.mm_input_projection_weight") is None


def test_folder_tokenizer_and_generation_config_eos(tmp_path, default_gguf_path):
    """A folder with tokenizer.json gets a Tokenizer; generation_config.json eos ids join the stop set."""
    from trident.loader.gguf_reader import read_gguf
    from trident.tokenizer import Tokenizer

    model = tiny_model(
        tiny_config("llama", vocab_size=49152, hidden_size=32, intermediate_size=32, num_hidden_layers=1),
        seed=0,
    )
    model.generation_config.eos_token_id = [2, 7]
    model.save_pretrained(tmp_path)
    gguf_tok = Tokenizer.from_gguf_metadata(read_gguf(default_gguf_path).metadata)
    gguf_tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
                "chat_template": gguf_tok.chat_template,
            }
        )
    )
    ours = load_checkpoint(str(tmp_path))
    assert ours.tokenizer is not None
    assert ours.tokenizer.eos_token_ids[:2] == (2, 7)
    assert 0 in ours.tokenizer.eos_token_ids  # <|endoftext|>
    text = "Hello, world!"
    assert ours.tokenizer.encode(text) == gguf_tok.encode(text)


def test_safetensors_dtype_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama", num_hidden_layers=1).to_dict()))
    model = tiny_model(tiny_config("llama", num_hidden_layers=1))
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_checkpoint(str(tmp_path))
    assert set(ours.tensor_types.values()) == {"F16"}
    assert all(t.dtype == torch.float16 for t in ours.tensors.values())
