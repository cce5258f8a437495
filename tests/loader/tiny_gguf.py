"""Tiny random Hugging Face models and GGUF files written from them the way llama.cpp's converter does
(its tensor names, its q/k row interleave for llama, its +1 on gemma norms), with gguf.GGUFWriter."""

from __future__ import annotations

from collections.abc import Sequence

import gguf
import numpy as np
import torch
import transformers

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
K_QUANT = dict(COMMON, hidden_size=256, intermediate_size=256, vocab_size=64)
"""K-quant blocks hold 256 values, so rows must be multiples of 256."""


def tiny_config(kind: str, **overrides: object) -> transformers.PretrainedConfig:
    """A tiny config of one family: llama, mistral, qwen2, qwen3, gemma2, gemma3."""
    base = {**COMMON, **overrides}
    if kind == "llama":
        return transformers.LlamaConfig(**{"tie_word_embeddings": False, **base})
    if kind == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **base})
    if kind == "qwen2":
        return transformers.Qwen2Config(**{"tie_word_embeddings": True, **base})
    if kind == "qwen3":
        return transformers.Qwen3Config(**{"tie_word_embeddings": True, "head_dim": 32, **base})
    if kind == "gemma2":
        return transformers.Gemma2Config(
            **{
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 32,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                **base,
            }
        )
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            **{"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, **base}
        )
    raise ValueError(kind)


def tiny_model(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A model with every parameter random (norms too, so the gemma +1 and name mix-ups would show)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_K_FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def gguf_name(arch: str, hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    table = _GEMMA_LAYER if arch.startswith("gemma") else _LAYER
    return f"blk.{layer}.{table[rest]}.{suffix}"


def interleave_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows for its rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(type_name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random K-quant rows whose float16 scale fields are sane numbers (not NaN/inf)."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n = shape[0] * shape[1] // block
    b = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)
    for at in _K_FP16_FIELDS[type_name]:
        b[:, at : at + 2] = rng.normal(0, 0.02, (n, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(shape[0], -1)


def encode_tensor(
    x: np.ndarray, type_name: str, rng: np.random.Generator
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array to write, raw_dtype) for storing float32 ``x`` as ``type_name``."""
    if type_name == "F32":
        return x.astype(np.float32), None
    if type_name == "F16":
        return x.astype(np.float16), None
    if type_name == "I32":
        return x.astype(np.int32), None
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _K_FP16_FIELDS:
        return random_k_blocks(type_name, x.shape, rng), qtype
    return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def write_gguf(
    path: str,
    model: torch.nn.Module,
    weight_type: str = "F32",
    norm_type: str = "F32",
    name: str = "tiny",
    extra: Sequence[tuple[str, object]] = (),
    tokenizer: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> str:
    """Write ``model`` as a GGUF file: 2-D weights stored as ``weight_type``, 1-D ones as ``norm_type``."""
    cfg = model.config
    arch = _GGUF_ARCH[cfg.model_type]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(
        cfg.rope_parameters["rope_theta"]
        if "rope_theta" in cfg.rope_parameters
        else cfg.rope_parameters["full_attention"]["rope_theta"]
    )
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for key, value in extra:
        getattr(w, f"add_{key}")(*(value if isinstance(value, tuple) else (value,)))
    if tokenizer:
        add_vocabulary(w, **tokenizer)
    tied = cfg.tie_word_embeddings
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        x = t.detach().float().numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            x = interleave_rotary_rows(x, n)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            x = x + 1.0
        data, raw_dtype = encode_tensor(x, weight_type if x.ndim == 2 else norm_type, rng)
        w.add_tensor(gguf_name(arch, hf_name), data, raw_dtype=raw_dtype)
    for tensor_name, data in (extra_tensors or {}).items():
        w.add_tensor(tensor_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_vocabulary(
    w: gguf.GGUFWriter,
    model: str,
    tokens: list[str],
    types: list[int],
    scores: list[float] | None = None,
    merges: list[str] | None = None,
    pre: str | None = None,
    bos: int | None = None,
    eos: int | None = None,
    unk: int | None = None,
    add_bos: bool | None = None,
    chat_template: str | None = None,
) -> None:
    """The tokenizer.* metadata llama.cpp writes."""
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges:
        w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if unk is not None:
        w.add_unk_token_id(unk)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)


def hf_gguf_tensors(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What transformers' own GGUF loader makes of the file (names mapped through ``model``)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if model.config.model_type == "mistral":  # written as "llama"; transformers maps names through a Llama
        with torch.device("meta"):
            dims = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims))
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
