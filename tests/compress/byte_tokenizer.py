"""Tiny HF model folders with a byte-level tokenizer, for the compression commands' tests."""

from __future__ import annotations

from pathlib import Path


def save_with_byte_tokenizer(config, path: Path, seed: int) -> Path:
    """A tiny random HF model of ``config`` saved in ``path`` with a byte-level tokenizer (256 tokens, one per
    byte), so that commands that tokenize a text run on it."""
    from hf_tiny import make_hf_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    make_hf_model(config, seed=seed).save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    return path
