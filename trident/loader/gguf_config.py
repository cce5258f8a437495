"""A Hugging Face-style config dict rebuilt from GGUF metadata (llama, qwen2, qwen3, gemma2, gemma3).

A GGUF carries no config.json: its metadata holds the same facts under llama.cpp's key names
(``{arch}.embedding_length`` ...). Values llama.cpp hard-codes instead of storing (gemma3's local rope
base, gemma's attention scale) are filled in the way llama.cpp does. Every value the file states is
written, even when it equals a config class default, so no family default silently applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from trident.errors import TridentError

GGUF_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
"""GGUF ``general.architecture`` -> Hugging Face ``model_type``."""

GEMMA_ARCHS = ("gemma2", "gemma3")


def _f32(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _scalar(x: Any, key: str) -> int:
    """An int, or the common value of a per-layer list (llama.cpp may store per-layer head counts)."""
    if isinstance(x, list):
        if not x or len(set(x)) != 1:
            raise TridentError(f"GGUF key {key} varies per layer ({x[:8]}...), which trident does not support")
        x = x[0]
    return int(x)


def hf_config_from_gguf(
    metadata: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The Hugging Face config.json dict describing the model in a GGUF file.

    ``tensor_shapes`` maps GGUF tensor names to shapes (to detect tied embeddings, biases and the vocab);
    ``rope_freqs`` is the ``rope_freqs.weight`` tensor of Llama 3.1-style files, if any.
    """
    arch = metadata.get("general.architecture")
    if arch not in GGUF_MODEL_TYPES:
        raise TridentError(
            f"unsupported GGUF architecture {arch!r}; trident reads GGUF files of: {', '.join(GGUF_MODEL_TYPES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    def need(name: str) -> Any:
        value = key(name)
        if value is None:
            raise TridentError(f"GGUF metadata lacks {arch}.{name}; the file is incomplete or not a model")
        return value

    hidden = int(need("embedding_length"))
    num_heads = _scalar(need("attention.head_count"), f"{arch}.attention.head_count")
    num_kv = _scalar(key("attention.head_count_kv", num_heads), f"{arch}.attention.head_count_kv")
    num_layers = int(need("block_count"))
    head_dim = int(key("attention.key_length") or hidden // num_heads)
    embed = tensor_shapes.get("token_embd.weight")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (embed[0] if embed else None) or (len(tokens) if tokens else None)
    if not vocab:
        raise TridentError("GGUF file states no vocabulary size and has no token_embd.weight")
    cfg: dict[str, Any] = {
        "model_type": GGUF_MODEL_TYPES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _scalar(need("feed_forward_length"), f"{arch}.feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
    }
    if arch == "llama" and "blk.0.attn_q.bias" in tensor_shapes:  # qwen2 always has them
        cfg["attention_bias"] = True
    scaling = _rope_scaling(arch, key, rope_freqs, head_dim, cfg["rope_theta"])
    if scaling:
        cfg["rope_scaling"] = scaling
    if arch == "llama":
        _llama_extras(metadata, key, cfg)
    elif arch in GEMMA_ARCHS:
        _gemma_extras(arch, key, cfg)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    eos = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(int(e) for e in eos if e is not None))
    cfg["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    return cfg


def _llama_extras(metadata: Mapping[str, Any], key: Any, cfg: dict[str, Any]) -> None:
    """llama.cpp writes Mistral models as "llama"; their sliding window, if stated, makes them "mistral"."""
    window = key("attention.sliding_window")
    name = str(metadata.get("general.name", "")).lower()
    if window or "mistral" in name:
        cfg["model_type"] = "mistral"
        cfg["sliding_window"] = int(window) if window else None


def _gemma_extras(arch: str, key: Any, cfg: dict[str, Any]) -> None:
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    window = key("attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
    # llama.cpp: attention scale is 1/sqrt(head_dim), except the 27B models use 1/sqrt(hidden / heads)
    is_27b = (arch == "gemma2" and layers == 46) or (arch == "gemma3" and layers == 62)
    cfg["query_pre_attn_scalar"] = hidden // heads if is_27b else cfg["head_dim"]
    if arch == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = key(name)
            if value is not None:
                cfg[name] = _f32(value)
    else:
        cfg["rope_local_base_freq"] = _f32(key("rope.freq_base_swa", 10000.0))
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == layers:  # per layer: true = sliding
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            cfg["sliding_window_pattern"] = int(pattern) if pattern else 6
        cfg["attn_logit_softcapping"] = None
        cfg["final_logit_softcapping"] = None


def _rope_scaling(
    arch: str, key: Any, rope_freqs: np.ndarray | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = key("rope.scaling.type")
    if kind in (None, "none") and rope_freqs is None:
        return None
    if rope_freqs is not None:
        return _llama3_scaling_from_factors(rope_freqs, head_dim, theta)
    factor = key("rope.scaling.factor")
    scaling: dict[str, Any] = {"rope_type": str(kind)}
    if factor is not None:
        scaling["factor"] = _f32(factor)
    original = key("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as ``rope_freqs.weight`` for Llama 3.1-style rope."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def _llama3_scaling_from_factors(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Recover Llama 3.1's rope_scaling from the stored divisors (llama.cpp keeps no other trace of it)."""
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 2.0, 8192)):
        expected = llama3_rope_factors(head_dim, theta, factor, low, high, original)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": _f32(factor),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise TridentError(
        "this GGUF stores rope frequency factors (rope_freqs.weight) that match no Llama 3 rope scaling "
        "trident knows; use the Hugging Face folder of this model instead"
    )
