"""Errors a user can cause are one TridentError with a useful message, and the engine goes on."""

from __future__ import annotations

import pytest

from trident import LLM, SamplingParams, TridentError


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_values(kwargs, words) -> None:
    with pytest.raises(TridentError, match=words):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_then_engine_still_works(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), max_model_len=64, block_size=4)
    with pytest.raises(TridentError, match="context"):
        llm.generate([[3] * 64], SamplingParams(max_tokens=4))
    # nothing of the failed request was queued, and the engine still serves
    assert not llm.engine.has_unfinished()
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.num_blocks


def test_generation_stops_at_context_length(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), max_model_len=32, block_size=4)
    out = llm.generate([[3] * 20], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 32


def test_bad_token_ids_and_text_without_tokenizer(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir))
    with pytest.raises(TridentError, match="token ids"):
        llm.generate([[5, 10_000]])
    with pytest.raises(TridentError, match="tokenizer"):
        llm.generate("hello")
    with pytest.raises(TridentError, match="empty"):
        llm.generate([[]])


def test_unknown_engine_option_and_bad_paths(tmp_path) -> None:
    with pytest.raises(TridentError, match="unknown engine option"):
        LLM(None, block_sise=8)
    with pytest.raises(TridentError, match="device"):
        LLM(None, device="tpu")
    with pytest.raises(TridentError, match="dtype"):
        LLM(None, dtype="int3")
    with pytest.raises(TridentError):
        LLM(str(tmp_path / "missing.gguf"))
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00\xff" * 100)
    with pytest.raises(TridentError):
        LLM(str(tmp_path / "corrupt.gguf"))
