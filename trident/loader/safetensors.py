"""Loading a Hugging Face model folder: config.json, safetensors weights (one file or shards), tokenizer.

Gemma 3 multimodal checkpoints (``model_type: gemma3`` with a ``text_config``) load as their text model:
the language-model weights are renamed to the plain ``model.`` / ``lm_head.`` prefix (transformers 5
writes ``model.language_model.*``, older checkpoints ``language_model.model.*``) and the vision
weights are left out.
"""

from __future__ import annotations

import os
from typing import Any

import safetensors
import torch
from safetensors import safe_open

from trident.config import ModelConfig
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.loader.jsonfile import read_json
from trident.quant.format import QuantizedModules, read_quantization_config

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


def load_hf_folder(path: str) -> Checkpoint:
    """Read a Hugging Face model folder; the tokenizer is None when the folder has no tokenizer.json."""
    from trident.tokenizer import Tokenizer

    hf_config = _read_config_json(path)
    config = ModelConfig.from_hf_dict(hf_config)
    quantization = read_quantization_config(hf_config)
    multimodal = "text_config" in hf_config
    tensors: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, str] = {}
    files = weight_files(path)
    for file in files:
        for name, (tensor, dtype) in read_safetensors(file).items():
            hf_name = text_model_name(name) if multimodal else name
            if hf_name is not None:
                tensors[hf_name] = tensor
                tensor_types[hf_name] = dtype
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_hf_folder(path, extra_eos_token_ids=_eos_ids(path, hf_config))
    return Checkpoint(
        config=config,
        tensors=tensors,
        tensor_types=tensor_types,
        tokenizer=tokenizer,
        format="safetensors",
        path=path,
        file_bytes=sum(os.path.getsize(f) for f in files),
        hf_config=hf_config,
        quantization=quantization,
    )


def read_hf_config(path: str) -> tuple[ModelConfig, QuantizedModules | None]:
    """A model folder's ModelConfig and quantization, from its config.json alone."""
    hf_config = _read_config_json(path)
    return ModelConfig.from_hf_dict(hf_config), read_quantization_config(hf_config)


def _read_config_json(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise TridentError(
            f"{path} has no config.json; a model folder needs config.json and model.safetensors "
            "(as written by save_pretrained), or pass a .gguf file"
        )
    return read_json(config_file)


def text_model_name(name: str) -> str | None:
    """The text-model name of a multimodal checkpoint's weight, or None for vision weights."""
    for prefix, replacement in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return None


def weight_files(path: str) -> list[str]:
    """The safetensors files of a folder: model.safetensors, or the shards its index lists."""
    single = os.path.join(path, _SINGLE)
    if os.path.isfile(single):
        return [single]
    index_file = os.path.join(path, _INDEX)
    if os.path.isfile(index_file):
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TridentError(f"{index_file} has no weight_map; the shard index is corrupt")
        shards = [os.path.join(path, s) for s in dict.fromkeys(weight_map.values())]
        missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
        if missing:
            raise TridentError(f"{path} lacks the weight shards {', '.join(missing[:3])} listed in {_INDEX}")
        return shards
    found = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".safetensors"))]
    hint = (
        f" (found {', '.join(sorted(found)[:3])}: convert them to safetensors with save_pretrained"
        "(..., safe_serialization=True))"
        if found
        else ""
    )
    raise TridentError(f"{path} has no {_SINGLE} or {_INDEX}{hint}")


def read_safetensors(file: str) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (tensor, stored dtype name) for every tensor of one safetensors file."""
    try:
        out = {}
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = (f.get_tensor(name), str(f.get_slice(name).get_dtype()))
        return out
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TridentError(f"{file} is corrupt or truncated ({e}); download or save it again") from None


def _eos_ids(path: str, hf_config: dict[str, Any]) -> list[int]:
    """End-of-sequence ids the model config and generation_config.json name."""
    ids: list[int] = []
    sources = [hf_config, hf_config.get("text_config") or {}]
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        sources.append(read_json(gen_file))
    for source in sources:
        eos = source.get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return ids
