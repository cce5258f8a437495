"""GGUF Q4_0 / Q4_1 / Q8_0 projection weights and token embeddings kept as codes (trident/loader/gguf_native.py):
the codes, scales and offsets stand for exactly the values the dequantizing loader gives (itself equal to
transformers' GGUF loader, test_loader_gguf.py), the fused q/k/v and gate/up layers are quantized when all their
parts are, a model runs with them, and the default model answers in bfloat16 through the int4 kernel."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import tiny_config, tiny_model, write_gguf

from trident.attention.registry import create_backend
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.engine.sizing import weights_bytes
from trident.loader import load_checkpoint
from trident.loader.checkpoint import Checkpoint
from trident.models.build import build_model
from trident.models.layers import Linear
from trident.quant.embedding import QuantizedEmbedding
from trident.quant.format import QuantizedModules
from trident.quant.kv import kv_cache_format
from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantizedWeight, dequantize

CPU = torch.device("cpu")


def _logits(checkpoint: Checkpoint) -> tuple[torch.Tensor, torch.nn.Module]:
    model = build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=CPU,
                        backend=create_backend("torch", CPU), quantization=checkpoint.quantization)
    runner = ModelRunner(model, backend=create_backend("torch", CPU), num_blocks=4, block_size=16,
                         kv_format=kv_cache_format("auto", torch.float32), device=CPU,
                         sampler=Sampler(device=CPU), max_num_seqs=1)
    tokens = tuple((5 * i + 1) % checkpoint.config.vocab_size for i in range(24))
    chunk = ScheduledChunk(seq_id=0, token_ids=tokens, start_pos=0, block_table=(0, 1), sample=True,
                           params=SamplingParams(temperature=0.0))
    input_ids, positions, meta, _, _ = runner.prepare(StepPlan(chunks=(chunk,)))
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, runner.kv_caches, meta)).float(), model


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_codes_stand_for_the_dequantized_values(kind, weight_type, tmp_path) -> None:
    path = write_gguf(str(tmp_path / "m.gguf"), tiny_model(tiny_config(kind)), weight_type)
    floats = load_checkpoint(path)
    native = load_checkpoint(path, gguf_native=True)
    assert floats.quantization is None and native.quantization is not None
    modules = native.quantization.modules
    # q, k, v, o, gate, up, down of every layer, and the token embeddings (in the file's type too)
    assert len(modules) == 7 * floats.config.num_layers + 1 and "model.embed_tokens" in modules
    for module in modules:
        q = QuantizedWeight(*(native.tensors.get(f"{module}.{kind}") for kind in ("qweight", "scales", "zeros")))
        values = dequantize(q, native.quantization.config_of(module), torch.float64)
        assert torch.equal(values.float(), floats.tensors[f"{module}.weight"]), module
    assert "model.embed_tokens.weight" not in native.tensors
    float_logits, _ = _logits(floats)
    native_logits, model = _logits(native)
    fused = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert isinstance(fused, QuantizedLinear) and fused.config == native.quantization.config
    assert isinstance(model.get_submodule("model.embed_tokens"), QuantizedEmbedding)
    torch.testing.assert_close(native_logits, float_logits, rtol=0, atol=1e-4 * float_logits.abs().max().item())


def test_a_fused_layer_with_parts_in_different_formats_stays_float(tmp_path) -> None:
    path = write_gguf(str(tmp_path / "m.gguf"), tiny_model(tiny_config("llama")), "Q4_0")
    floats = load_checkpoint(path)
    native = load_checkpoint(path, gguf_native=True)
    k_proj = "model.layers.0.self_attn.k_proj"
    tensors = {name: t for name, t in native.tensors.items() if not name.startswith(k_proj + ".")}
    tensors[f"{k_proj}.weight"] = floats.tensors[f"{k_proj}.weight"]  # k stored as floats, q and v as codes
    q = native.quantization
    mixed = Checkpoint(config=native.config, tensors=tensors, tensor_types=native.tensor_types, tokenizer=None,
                       format="gguf", path=path, file_bytes=native.file_bytes,
                       quantization=QuantizedModules(q.config, tuple(m for m in q.modules if m != k_proj)))
    logits, model = _logits(mixed)
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert type(qkv) is Linear
    expected = torch.cat([floats.tensors[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.weight, expected)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.qkv_proj"), QuantizedLinear)
    float_logits, _ = _logits(floats)
    torch.testing.assert_close(logits, float_logits, rtol=0, atol=1e-4 * float_logits.abs().max().item())


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_default_model_in_native_q4_1_answers_through_the_cpu_kernels(default_gguf_path, monkeypatch,
                                                                       kernels) -> None:
    """Q4_1 layers and the Q8_0 head as stored answer the reference question, on trident's native kernels (the
    decode steps as decode_layer.c's layers) or, with TRIDENT_NO_NATIVE=1, torch's int4 kernel."""
    from trident.engine.llm import LLM
    from trident.native.qmatmul import available, why_unavailable

    if kernels == "torch":
        monkeypatch.setenv("TRIDENT_NO_NATIVE", "1")
    else:
        assert available(), why_unavailable()
    calls = []
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
    llm = LLM(default_gguf_path, dtype="bfloat16", gguf_weights="native")
    model = llm.engine.model
    layer = model.get_submodule("model.layers.0.mlp.gate_up_proj")
    assert isinstance(layer, QuantizedLinear) and layer.config.float_zero_points and layer.config.group_size == 32
    embed = model.get_submodule("model.embed_tokens")  # Q8_0 in the file: also the tied LM head
    assert isinstance(embed, QuantizedEmbedding) and embed.head.config.bits == 8
    checkpoint = load_checkpoint(default_gguf_path, gguf_native=True)
    stored = sum(t.numel() * t.element_size() for t in checkpoint.tensors.values())
    assert stored < 0.55 * weights_bytes(checkpoint.config, torch.bfloat16)
    # on the CPU the layers also keep the codes in the layout of the kernel that runs them
    assert stored < weights_bytes(checkpoint.config, torch.bfloat16, checkpoint.quantization) < 2 * stored
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=12))
    assert out[0].text.startswith("The capital of France is Paris")
    if kernels == "torch":
        assert calls  # decode steps ran the int4 kernel
        assert "_int8_cpu" in vars(embed.head)  # the head ran it too, on the Q8_0 codes as two int4 halves
    else:
        assert not calls and llm.engine.runner.cpu_decoder.native_layers is not None
        assert "_native_cpu" in vars(embed.head)  # the head ran the native kernel on its Q8_0 codes
