"""Named shapes: the registry holds TARGETS.md's architectures, fails listing the known names, reads any
config.json; the weight list of a shape is exactly what transformers' model of that config holds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_shapes import TINY_SHAPES

from trident.bench.random_weights import weight_specs
from trident.bench.shapes import SHAPES, known_shapes, resolve_shape
from trident.config import ModelConfig
from trident.errors import TridentError


def test_named_shapes_have_the_targets_dimensions() -> None:
    qwen = ModelConfig.from_hf_dict(resolve_shape("qwen3-0.6b").hf_config)
    assert (qwen.hidden_size, qwen.num_layers, qwen.num_heads, qwen.num_kv_heads, qwen.head_dim,
            qwen.intermediate_size, qwen.vocab_size, qwen.tie_word_embeddings) == (
        1024, 28, 16, 8, 128, 3072, 151936, True)
    llama = ModelConfig.from_hf_dict(resolve_shape("llama3-8b").hf_config)
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.intermediate_size,
            llama.vocab_size, llama.tie_word_embeddings) == (4096, 32, 32, 8, 14336, 128256, False)
    assert (llama.rope.theta, llama.rope.rope_type, llama.rope.factor) == (500000.0, "llama3", 8.0)
    assert {"qwen3-0.6b", "llama3-8b", "smollm2-135m", "qwen2.5-7b", "qwen3-30b-a3b"} <= set(known_shapes())
    moe = ModelConfig.from_hf_dict(resolve_shape("qwen3-30b-a3b").hf_config)
    assert (moe.num_layers, moe.hidden_size, moe.num_heads, moe.num_kv_heads, moe.moe.router.num_experts,
            moe.moe.router.top_k, moe.moe.moe_intermediate_size) == (48, 2048, 32, 4, 128, 8, 768)
    assert len(moe.moe.sparse_layers) == 48 and 30.4e9 < moe.num_parameters() < 30.6e9  # "30B", 61 GB in bf16


def test_unknown_shape_lists_the_known_ones() -> None:
    with pytest.raises(TridentError) as e:
        resolve_shape("qwen9-1t")
    for name in known_shapes():
        assert name in str(e.value)


def test_shape_from_a_config_json_file_or_folder(tmp_path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_SHAPES["qwen3-tied"]))
    by_file, by_folder = resolve_shape(str(folder / "config.json")), resolve_shape(str(folder))
    assert by_file.name == by_folder.name == "my-model"
    assert by_file.hf_config == by_folder.hf_config == TINY_SHAPES["qwen3-tied"]
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(TridentError, match="unsupported architecture"):
        resolve_shape(str(folder))


def test_a_resolved_shape_is_a_private_copy() -> None:
    resolve_shape("qwen3-0.6b").hf_config["hidden_size"] = 1
    assert SHAPES["qwen3-0.6b"]["hidden_size"] == 1024


@pytest.mark.parametrize("name", [*SHAPES, *TINY_SHAPES])
def test_weight_list_is_what_transformers_holds(name: str) -> None:
    """Names and shapes against transformers' own model of the config, built on the meta device."""
    raw = dict(SHAPES.get(name) or TINY_SHAPES[name])
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as the embedding table
    ours = weight_specs(ModelConfig.from_hf_dict(SHAPES.get(name) or TINY_SHAPES[name]))
    assert {k: dims for k, (dims, _) in ours.items()} == expected
