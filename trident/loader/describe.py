"""What a model is, read without its weights: its ModelConfig and how its layers are stored quantized. Memory
estimates made before loading (``trident advise --fit``, the server's check that a model fits) start here."""

from __future__ import annotations

import os
from dataclasses import dataclass

from trident.config import ModelConfig
from trident.loader import resolve_model_path
from trident.quant.format import QuantizedModules


@dataclass(frozen=True)
class ModelDescription:
    path: str
    config: ModelConfig
    quantization: QuantizedModules | None
    """How the layers load quantized (a ``trident quantize`` folder, or a GGUF file's native Q4/Q8 layers), or
    None."""


def describe_model(path: str | None, gguf_native: bool = False) -> ModelDescription:
    """The config and quantization ``load_checkpoint(path, gguf_native)`` would give, from config.json or the GGUF
    header alone."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        from trident.loader.safetensors import read_hf_config

        config, quantization = read_hf_config(path)
        return ModelDescription(path, config, quantization)
    from trident.loader.gguf import gguf_model_config, gguf_native_quantization
    from trident.loader.gguf_reader import read_gguf

    f = read_gguf(path)
    _, config = gguf_model_config(f)
    return ModelDescription(path, config, gguf_native_quantization(f) if gguf_native else None)
