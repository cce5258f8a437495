"""The tiny Llama folder the command-line tests of tensor parallelism run (`generate`, `serve`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compress"))

from byte_tokenizer import save_with_byte_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A two-layer Llama (four heads, two kv heads) with a byte-level tokenizer, float32 weights."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    path = save_with_byte_tokenizer(config, tmp_path_factory.mktemp("tp-llama"), seed=5)
    # Only printable ASCII tokens keep their LM-head rows (the others' logits are 0, below the best of ~90 random
    # ones): the text then shows every token, where stray bytes would all print as the same replacement character.
    from safetensors.torch import load_file, save_file
    from tokenizers import pre_tokenizers

    tensors = load_file(path / "model.safetensors")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    printable = torch.tensor([33 <= ord(ch) <= 126 for ch in alphabet])
    tensors["lm_head.weight"][~printable] = 0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
