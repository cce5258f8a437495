"""Fixtures of the compression tests: a tiny random Llama saved as a Hugging Face folder (with its float64
transformers twin as the reference) and the real default model, in float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from hf_tiny import make_hf_model, tiny_llama_config

    config = tiny_llama_config(vocab_size=256, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama-ppl")
    make_hf_model(config, seed=5).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf64(tiny_llama_dir):
    """The same weights in transformers, computing in float64."""
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir):
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config

    return LLMEngine(engine_config(str(tiny_llama_dir), dtype="float32", num_blocks=64))


@pytest.fixture(scope="session")
def default_engine():
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config

    return LLMEngine(engine_config(None, dtype="float32"))  # the reference numerics; auto may pick bf16


@pytest.fixture(scope="session")
def tiny_text_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder with a byte-level tokenizer (eval report, quantize --report run on it)."""
    from hf_tiny import tiny_llama_config

    config = tiny_llama_config(vocab_size=256, max_position_embeddings=256)
    from byte_tokenizer import save_with_byte_tokenizer

    return save_with_byte_tokenizer(config, tmp_path_factory.mktemp("tiny-llama-text"), seed=7)
