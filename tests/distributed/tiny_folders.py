"""Tiny model folders with a byte-level tokenizer for the command-line tests of tensor parallelism (`generate`,
`serve`): random weights whose greedy text shows every token."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compress"))

from byte_tokenizer import save_with_byte_tokenizer  # noqa: E402


def llama_folder(path: Path) -> Path:
    """A two-layer Llama (four heads, two kv heads), float32 weights of seed 5, printable tokens only."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    return printable_only(save_with_byte_tokenizer(config, path, seed=5))


def mixtral_folder(path: Path) -> Path:
    """A tiny Mixtral of four experts with 33 intermediate features each: they split over two ranks whole, but not
    by features (so a rank that got no --expert-parallel would refuse it)."""
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=33, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
    return printable_only(save_with_byte_tokenizer(config, path, seed=6))


def printable_only(path: Path) -> Path:
    """Only printable ASCII tokens keep their LM-head rows (the others' logits are 0, below the best of ~90 random
    ones): the text then shows every token, where stray bytes would all print as the same replacement character."""
    from safetensors.torch import load_file, save_file
    from tokenizers import pre_tokenizers

    tensors = load_file(path / "model.safetensors")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    printable = torch.tensor([33 <= ord(ch) <= 126 for ch in alphabet])
    tensors["lm_head.weight"][~printable] = 0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
