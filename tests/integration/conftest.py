"""A tiny random Llama saved as a Hugging Face folder, loaded through the real loader."""

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

    config = tiny_llama_config(vocab_size=211, max_position_embeddings=512)
    model = make_hf_model(config, seed=3)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_llm():
    from trident import LLM

    return LLM(dtype="float32")  # the reference numerics; auto may pick bf16 on this CPU
