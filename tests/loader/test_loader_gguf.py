"""GGUF loading: tensors equal transformers' own GGUF loader on tiny files of every family and storage
type, and on the real default model; configs equal what the original Hugging Face config gives."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from tiny_gguf import K_QUANT, hf_gguf_tensors, tiny_config, tiny_model, write_gguf

from trident.config import ModelConfig, RopeConfig
from trident.errors import TridentError
from trident.loader import load_checkpoint

KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]


def _without_tied_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def _token_ids(config) -> list[tuple[str, int]]:
    return [
        (f"{k}_token_id", getattr(config, f"{k}_token_id"))
        for k in ("bos", "eos")
        if getattr(config, f"{k}_token_id", None) is not None
    ]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(tiny_config(kind), seed=i) for i, kind in enumerate(KINDS)}


def _assert_same_as_transformers(path: str, model: torch.nn.Module):
    ours = load_checkpoint(path)
    ref = hf_gguf_tensors(path, model)
    assert sorted(ours.tensors) == sorted(ref)
    for name, expected in ref.items():
        assert torch.equal(ours.tensors[name].float(), expected), name
    return ours


@pytest.mark.parametrize("kind", KINDS)
def test_float32_gguf_equals_transformers_and_the_original_weights(kind, models, tmp_path):
    model = models[kind]
    path = write_gguf(
        str(tmp_path / "m.gguf"),
        model,
        name="Mistral-tiny" if kind == "mistral" else "tiny",
        extra=_token_ids(model.config),
    )
    ours = _assert_same_as_transformers(path, model)
    original = _without_tied_head(model)
    assert sorted(ours.tensors) == sorted(original)
    for name, expected in original.items():
        # gemma norms went through (w + 1) - 1 in float32
        torch.testing.assert_close(ours.tensors[name], expected, rtol=0, atol=1e-6 if "norm" in name else 0)
    expected_config = ModelConfig.from_hf_dict(model.config.to_dict())
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("architecture", "source_dtype"):
            assert getattr(ours.config, f.name) == getattr(expected_config, f.name), f.name
    assert ours.format == "gguf" and ours.tokenizer is None
    assert set(ours.tensor_types.values()) == {"F32"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight_type", TYPES)
def test_stored_types_equal_transformers(kind, weight_type, models, tmp_path):
    model = models[kind]
    path = write_gguf(str(tmp_path / "m.gguf"), model, weight_type)
    ours = _assert_same_as_transformers(path, model)
    name = "model.layers.1.self_attn.k_proj.weight"
    assert ours.tensor_types[name] == weight_type
    expected_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(weight_type, torch.float32)
    assert ours.tensors[name].dtype == expected_dtype
    if weight_type in ("Q8_0", "Q5_0"):  # close to the original values
        torch.testing.assert_close(ours.tensors[name], model.state_dict()[name], atol=0.1, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("weight_type", ["Q4_K", "Q5_K", "Q6_K", "Q3_K"])
def test_k_quants_equal_transformers(kind, weight_type, tmp_path):
    extra = {"head_dim": 64, "query_pre_attn_scalar": 64} if kind == "gemma3" else {}
    model = tiny_model(tiny_config(kind, **K_QUANT, **extra))
    path = write_gguf(str(tmp_path / "k.gguf"), model, weight_type, norm_type="F16" if kind == "gemma3" else "F32")
    ours = _assert_same_as_transformers(path, model)
    assert ours.tensors["model.layers.0.mlp.up_proj.weight"].shape == (256, 256)
    assert ours.tensor_types["model.layers.0.mlp.up_proj.weight"] == weight_type


def test_rope_scaling_metadata(models, tmp_path):
    model = models["llama"]
    path = write_gguf(
        str(tmp_path / "m.gguf"),
        model,
        extra=[("rope_scaling_type", gguf.RopeScalingType.LINEAR), ("rope_scaling_factor", 4.0)],
    )
    rope = load_checkpoint(path).config.rope
    assert (rope.rope_type, rope.factor) == ("linear", 4.0)


def test_llama3_rope_factors_become_rope_scaling(models, tmp_path):
    """llama.cpp keeps Llama 3.1's rope scaling only as the rope_freqs tensor; it is read back into config."""
    from trident.loader.gguf_config import llama3_rope_factors

    model = models["llama"]
    factors = llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    path = write_gguf(str(tmp_path / "m.gguf"), model, extra_tensors={"rope_freqs.weight": factors})
    ours = load_checkpoint(path)
    assert ours.config.rope == RopeConfig(
        theta=10000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert "rope_freqs.weight" not in ours.tensors and len(ours.tensors) == len(_without_tied_head(model))
    odd = write_gguf(str(tmp_path / "odd.gguf"), model, extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(TridentError, match="rope"):
        load_checkpoint(odd)


@pytest.mark.slow
def test_default_model_equals_transformers(default_gguf_path):
    """The real SmolLM2 Q4_1 file: every tensor and its name equal transformers' GGUF loader."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = load_checkpoint(None)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.hf_config))
    ref = load_gguf_checkpoint(default_gguf_path, return_tensors=True, model_to_load=model)
    assert sorted(ours.tensors) == sorted(ref["tensors"])
    for name, expected in ref["tensors"].items():
        assert torch.equal(ours.tensors[name], expected), name
    hf_config = ref["config"]
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours.hf_config[key] == hf_config[key], key
    c = ours.config
    assert (
        c.model_type,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
    ) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert c.rope.theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert ours.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert ours.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert ours.file_bytes == 98362432 and ours.path == default_gguf_path
