"""Fixtures of the quantization tests: a tiny random Llama saved as a Hugging Face folder with a byte-level
tokenizer (256 tokens, one per byte), so that text commands (generate, eval ppl) run on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from hf_tiny import make_hf_model, tiny_llama_config

    config = tiny_llama_config(vocab_size=256, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama-quant")
    make_hf_model(config, seed=11).save_pretrained(path)
    _byte_tokenizer().save(str(path / "tokenizer.json"))
    return path
