"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): greedy output identical to Hugging Face
transformers loading the same file, and the capital of France is Paris."""

from __future__ import annotations

import os

import pytest
import torch

from trident import LLM, SamplingParams
from trident.loader import default_model_path

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


@pytest.fixture(scope="module")
def llm(default_llm) -> LLM:
    return default_llm


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def test_greedy_48_tokens_equal_hf(llm: LLM, hf) -> None:
    tokenizer, model = hf
    params = SamplingParams(temperature=0.0, max_tokens=48)
    outs = llm.chat(CHATS, params)
    for chat, out in zip(CHATS, outs):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        assert list(out.prompt_token_ids) == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:].tolist()
        ours = list(out.token_ids)
        # HF stops at EOS and keeps it; so does trident (EOS is in token_ids, not in the text).
        assert ours == ref, f"{chat[-1]['content']!r}: {tokenizer.decode(ours)!r} != {tokenizer.decode(ref)!r}"
        assert out.text == tokenizer.decode(ref, skip_special_tokens=True)


def test_capital_of_france_is_paris(llm: LLM) -> None:
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in out.text
