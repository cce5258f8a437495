"""The engine's CPU decode steps on a quantized model run decode_layer.c's layers (trident/engine/cpu_decode.py)
and agree with the torch-call step on the same weights: the same greedy tokens and log-probabilities within what
the activations' quantization and bfloat16 rounding move them."""

from __future__ import annotations

import pytest
from agreement import assert_greedy_agree

from trident.engine.llm import LLM
from trident.engine.request import SamplingParams

PROMPT = [(11 * i + 5) % 256 for i in range(37)]


def _run(path, dtype: str) -> tuple[LLM, list]:
    llm = LLM(str(path), dtype=dtype, block_size=4, max_model_len=128)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True))[0]
    return llm, list(out.outputs[0].logprobs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_decode_agrees_with_the_torch_step(tiny_int4_llama_dir, monkeypatch, dtype) -> None:
    native, ours = _run(tiny_int4_llama_dir, dtype)
    assert native.engine.runner.cpu_decoder.native_layers is not None
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    torch_step, theirs = _run(tiny_int4_llama_dir, dtype)
    assert torch_step.engine.runner.cpu_decoder.native_layers is None
    # nats: measured up to 0.042 on this tiny random model (the two-stage int8 activations, and in bfloat16 the torch
    # step's rounding after every operation); a wrong position, rotation or block changes the tokens themselves
    assert len(ours) == 12
    assert_greedy_agree(ours, theirs, tolerance=0.1, min_compared=4)


def test_int8_kv_cache_runs_in_the_c_layers(tiny_int4_llama_dir) -> None:
    """With --kv-cache-dtype int8 the decode steps still run as C calls (decode_layer.c quantizes the new keys and
    values as trident/quant/kv.py does and reads the codes back with their scales), agreeing with the general forward
    on the same int8 cache (enforce_eager: the torch attention backend's quantized path)."""
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
    native = LLM(str(tiny_int4_llama_dir), dtype="float32", block_size=4, max_model_len=128, kv_cache_dtype="int8")
    assert native.engine.runner.cpu_decoder is not None and native.engine.runner.cpu_decoder.native_layers is not None
    ours = list(native.generate(PROMPT, params)[0].outputs[0].logprobs)
    general = LLM(str(tiny_int4_llama_dir), dtype="float32", block_size=4, max_model_len=128, kv_cache_dtype="int8",
                  enforce_eager=True)
    assert general.engine.runner.cpu_decoder is None
    theirs = list(general.generate(PROMPT, params)[0].outputs[0].logprobs)
    # the activations' two-stage rounding and a code rounded the other way at a tie: a few 1e-2 nats at most
    assert len(ours) == 12
    assert_greedy_agree(ours, theirs, tolerance=0.1)


def test_int8_runs_in_the_c_layers_on_its_stored_codes(tiny_int8_llama_dir, monkeypatch) -> None:
    """int8 (`trident quantize --bits 8`: per channel, symmetric or not, or in groups of 64) decodes through the C
    layers, multiplying the stored codes in place (qmatmul.c's natural order: every layer's native weight shares its
    module's codes, no copy), and agrees with the torch-call step (torch's int8 kernel, or for groups the
    dequantizing reference)."""
    import torch

    from trident.quant.linear import QuantizedLinear

    native, ours = _run(tiny_int8_llama_dir, "bfloat16")
    assert native.engine.runner.cpu_decoder.native_layers is not None
    layers = [m for m in native.engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all("_native_cpu" in m.__dict__ for m in layers)
    for m in layers:
        packed = m.__dict__["_native_cpu"]
        assert packed.natural and packed.codes.untyped_storage().data_ptr() == m.qweight.untyped_storage().data_ptr()
        assert packed.codes.dtype == torch.int8
    monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    torch_step, theirs = _run(tiny_int8_llama_dir, "bfloat16")
    assert torch_step.engine.runner.cpu_decoder.native_layers is None
    assert len(ours) == 12
    assert_greedy_agree(ours, theirs, tolerance=0.1, min_compared=4)
