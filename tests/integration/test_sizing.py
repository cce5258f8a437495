"""The memory estimate made before loading (what the server's memory budget relies on) equals what the
engine then holds, measured from its tensors."""

from __future__ import annotations

import pytest

from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.request import SamplingParams
from trident.engine.sizing import estimate_memory, gguf_native
from trident.loader import load_checkpoint
from trident.native import qmatmul
from trident.quant.linear import QuantizedLinear


@pytest.mark.parametrize("kwargs", [
    {"dtype": "float32", "memory_budget_bytes": 1 << 20},
    {"dtype": "bfloat16", "memory_budget_bytes": 3 << 20, "block_size": 32},
    {"dtype": "float32", "num_blocks": 7, "kv_cache_dtype": "bfloat16"},
    {"dtype": "float32", "memory_budget_bytes": 1 << 20, "kv_cache_dtype": "int8"},  # codes + float32 scales
    {"dtype": "bfloat16", "num_blocks": 9, "kv_cache_dtype": "fp8"},
    {"dtype": "float32", "max_num_seqs": 2, "max_model_len": 64},  # capped by what 2 sequences can use
])
def test_estimate_equals_engine_memory(tiny_llama_dir, kwargs):
    config = engine_config(str(tiny_llama_dir), **kwargs)
    checkpoint = load_checkpoint(str(tiny_llama_dir))
    estimate = estimate_memory(checkpoint.config, config)
    engine = LLMEngine(config, checkpoint)
    used = engine.memory_usage()
    assert estimate.num_blocks == engine.num_blocks and estimate.max_model_len == engine.max_model_len
    assert estimate.kv_cache_bytes == used.kv_cache_bytes
    # parameters by hand: embeddings, per layer q/k/v/o + gate/up/down + 2 norms, final norm, untied head
    c = checkpoint.config
    per_layer = (c.hidden_size * c.num_heads * c.head_dim * 2 + c.hidden_size * c.num_kv_heads * c.head_dim * 2
                 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    params = 2 * c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size
    element = 4 if kwargs["dtype"] == "float32" else 2
    assert estimate.weights_bytes == params * element
    assert abs(used.weights_bytes - estimate.weights_bytes) <= 1024  # + the rotary table buffer


def test_estimate_of_the_default_model(default_llm):
    """The real SmolLM2 (tied embeddings: counted once) at the float32 the default_llm fixture uses: its Q4_1 / Q8_0
    codes where the engine keeps the GGUF weights native (as the server's budget estimates them), with the kernel
    layouts the layers build from them once they have run (the tied head's at the first logits), else float32."""
    engine = default_llm.engine
    default_llm.generate("Hello", SamplingParams(max_tokens=2))  # every product has run once
    checkpoint = load_checkpoint(None, gguf_native(engine.config, engine.device))
    estimate = estimate_memory(engine.model_config, engine.config, checkpoint.quantization)
    used = engine.memory_usage()
    assert estimate.kv_cache_bytes == used.kv_cache_bytes
    if checkpoint.quantization is None:
        assert used.weights_bytes - estimate.weights_bytes <= 1024  # + the rotary table buffer
        assert estimate.weights_bytes == 134_515_008 * 4  # SmolLM2-135M's parameter count, float32
        return
    derived = sum(t.untyped_storage().nbytes() for m in engine.model.modules() if isinstance(m, QuantizedLinear)
                  for t in m.derived_tensors())
    stored = sum(m.storage_bytes() for m in engine.model.modules() if isinstance(m, QuantizedLinear))
    assert stored < 0.25 * 134_515_008 * 4  # 4.5-9 bits per weight with float32 scales (and zero points)
    if qmatmul.available():  # every layer in the native kernel's layout: codes, fp16 scales and offsets again
        assert 0.5 * stored < derived < 1.2 * stored
    assert 0 <= used.weights_bytes - estimate.weights_bytes <= 1024  # + the rotary table buffer


@pytest.mark.parametrize("bits,group_size,symmetric,groups", [(4, 32, True, 8), (4, 64, False, 4), (8, None, False, 1),
                                                              (8, None, True, 0)])
def test_cuda_offsets_bytes_are_what_a_layer_derives(bits, group_size, symmetric, groups):
    """On CUDA a weight-only layer keeps float32 affine offsets [N, groups] beside its stored tensors (the Triton
    kernels read them); symmetric int8 has none. The estimate's count equals the tensor a real layer derives."""
    import torch

    from trident.quant.affine import affine_from_rtn
    from trident.quant.linear import cuda_offsets_bytes
    from trident.quant.rtn import QuantConfig, quantize

    config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    offsets = affine_from_rtn(quantize(torch.randn(48, 256), config), config).offsets
    assert cuda_offsets_bytes(48, 256, config) == 48 * groups * 4 == (0 if offsets is None else offsets.nbytes)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [["--bits", "4", "--group-size", "32"], ["--bits", "8", "--asymmetric"],
                                   ["--bits", "8"]], ids=["int4", "int8_asymmetric", "int8"])
def test_estimate_equals_engine_memory_on_cuda(tiny_llama_dir, tmp_path, flags):
    """A quantized folder on CUDA: weights (with the offsets the layers keep there) and KV cache as estimated."""
    from trident.cli import main

    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", *flags, "--out", str(tmp_path / "q")]) == 0
    config = engine_config(str(tmp_path / "q"), device="cuda", memory_budget_bytes=1 << 20)
    checkpoint = load_checkpoint(str(tmp_path / "q"))
    estimate = estimate_memory(checkpoint.config, config, checkpoint.quantization)
    used = LLMEngine(config, checkpoint).memory_usage()
    assert estimate.kv_cache_bytes == used.kv_cache_bytes
    assert 0 <= used.weights_bytes - estimate.weights_bytes <= 1024  # + the rotary table buffer
