"""Loading a GGUF file into a :class:`Checkpoint` with Hugging Face names and values.

llama.cpp's converter renames every tensor (``blk.0.attn_q.weight``) and changes some values; both are
undone here so the weights equal the original Hugging Face ones:

- ``llama``: the rows of q_proj and k_proj (weights and biases) are interleaved per head for
  llama.cpp's rotary layout; the inverse row order restores the half-split layout. Rows are
  independent in every ggml type, so this reorders stored bytes before dequantization.
- ``gemma2``/``gemma3``: every RMSNorm weight is stored as ``w + 1``; 1 is subtracted (in float32).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from trident.config import ModelConfig
from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint
from trident.loader.dequant import to_tensor
from trident.loader.gguf_config import GEMMA_ARCHS, hf_config_from_gguf
from trident.loader.gguf_native import NATIVE_CONFIGS, native_weight
from trident.loader.gguf_reader import GGUFFile, GGUFTensorInfo, read_gguf
from trident.quant.format import QuantizedModules
from trident.quant.rtn import QuantConfig, QuantizedWeight

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA_LAYER = {**_LAYER, "ffn_norm": "pre_feedforward_layernorm"}
_SKIPPED = {"rope_freqs.weight"}
"""Tensors folded into the config instead of the weights."""


def hf_tensor_name(arch: str, gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor: blk.3.ffn_up.weight -> model.layers.3.mlp.up_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    parts = stem.split(".")
    table = _GEMMA_LAYER if arch in GEMMA_ARCHS else _LAYER
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
    raise TridentError(
        f"GGUF tensor {gguf_name!r} has no counterpart in trident's {arch} models "
        "(a variant of the architecture trident does not support)"
    )


def rotary_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's per-head interleave of q/k rows: HF row (h, j, i) of the
    half-split layout [h, 2, d/2] is stored at row (h, i, j) of [h, d/2, 2]."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)


def _raw_rows(f: GGUFFile, info: GGUFTensorInfo, hf_name: str, config: ModelConfig) -> np.ndarray:
    """The tensor's stored bytes, rows in Hugging Face order (see the module docstring)."""
    raw = f.raw(info.name)
    if f.architecture == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        n_head = config.num_heads if ".q_proj." in hf_name else config.num_kv_heads
        rows = info.shape[0]
        raw = raw.reshape(rows, -1)[rotary_row_order(rows, n_head)]
    return raw


def is_native(hf_name: str, type_name: str) -> bool:
    """Whether a tensor stays quantized with ``native=True``: in a type of NATIVE_CONFIGS, a decoder layer's
    projection weight (``model.layers.N.self_attn.q_proj.weight``, ``...mlp.down_proj.weight``) or the token
    embeddings (``model.embed_tokens.weight``, a QuantizedEmbedding: also the LM head when tied)."""
    if type_name not in NATIVE_CONFIGS:
        return False
    return hf_name == "model.embed_tokens.weight" or (
        hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")
        and (".self_attn." in hf_name or ".mlp." in hf_name))


def _load_native(f: GGUFFile, info: GGUFTensorInfo, hf_name: str, config: ModelConfig) -> QuantizedWeight:
    return native_weight(_raw_rows(f, info, hf_name, config), info.type_name, info.shape)


def _load_tensor(f: GGUFFile, info: GGUFTensorInfo, hf_name: str, config: ModelConfig) -> torch.Tensor:
    raw = _raw_rows(f, info, hf_name, config)
    arch = f.architecture
    t = to_tensor(raw, info.type_name, info.shape, where=f"{f.path}: tensor {info.name}: ")
    if arch in GEMMA_ARCHS and hf_name.endswith("norm.weight"):
        t = t.to(torch.float32) - 1.0
    return t


def load_gguf(path: str, native: bool = False) -> Checkpoint:
    """Read a GGUF model file: config, weights under HF names, and its tokenizer. ``native``: the decoder
    layers' Q4_0 / Q4_1 / Q8_0 projection weights and token embeddings stay quantized
    (trident/loader/gguf_native.py, :func:`is_native`), everything else is dequantized to float32 as without it."""
    return checkpoint_from_gguf(read_gguf(path), native)


def checkpoint_from_gguf(f: GGUFFile, native: bool = False) -> Checkpoint:
    """Build a Checkpoint from a parsed GGUF file (``native``: see :func:`load_gguf`)."""
    from trident.tokenizer import Tokenizer

    hf_config, config = gguf_model_config(f)
    names = gguf_tensor_names(f)
    # numpy releases the GIL while unpacking blocks, so tensors dequantize in parallel with each other
    # and with the (mostly Python) tokenizer construction
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        has_vocab = "tokenizer.ggml.tokens" in f.metadata
        tokenizer_job = pool.submit(Tokenizer.from_gguf_metadata, f.metadata) if has_vocab else None
        native_names = {hf for hf, info in names.items() if native and is_native(hf, info.type_name)}
        jobs = {hf: pool.submit(_load_native if hf in native_names else _load_tensor, f, info, hf, config)
                for hf, info in names.items()}
        tensors: dict[str, torch.Tensor] = {}
        module_configs: dict[str, QuantConfig] = {}
        for hf, job in jobs.items():
            if hf in native_names:
                module = hf.removesuffix(".weight")
                q = job.result()
                tensors.update({f"{module}.{kind}": t for kind, t in zip(("qweight", "scales", "zeros"), q)
                                if t is not None})
                module_configs[module] = NATIVE_CONFIGS[names[hf].type_name]
            else:
                tensors[hf] = job.result()
        tokenizer = tokenizer_job.result() if tokenizer_job else None
    tensor_types = {hf: info.type_name for hf, info in names.items()}
    return Checkpoint(
        config=config,
        tensors=tensors,
        tensor_types=tensor_types,
        tokenizer=tokenizer,
        format="gguf",
        path=f.path,
        file_bytes=f.file_bytes,
        hf_config=hf_config,
        quantization=_native_quantization(module_configs),
    )


def gguf_model_config(f: GGUFFile) -> tuple[dict, ModelConfig]:
    """The Hugging Face config dict a parsed GGUF file's metadata stands for, and its ModelConfig (reads the small
    rope_freqs tensor where there is one, no weights)."""
    if int(f.metadata.get("split.count", 1)) > 1:
        raise TridentError(
            f"{f.path} is one part of a split GGUF; merge the parts first "
            "(llama-gguf-split --merge FIRST-PART OUT.gguf) and load the merged file"
        )
    shapes = {name: info.shape for name, info in f.tensors.items()}
    rope_freqs = None
    if "rope_freqs.weight" in f.tensors:
        info = f.tensors["rope_freqs.weight"]
        rope_freqs = to_tensor(f.raw(info.name), info.type_name, info.shape).float().numpy()
    hf_config = hf_config_from_gguf(f.metadata, shapes, rope_freqs)
    return hf_config, ModelConfig.from_hf_dict(hf_config)


def gguf_tensor_names(f: GGUFFile) -> dict[str, GGUFTensorInfo]:
    """Hugging Face name -> the GGUF tensor it is read from, for every weight (not the tensors folded into the
    config)."""
    return {hf_tensor_name(f.architecture, n): info for n, info in f.tensors.items() if n not in _SKIPPED}


def gguf_native_quantization(f: GGUFFile) -> QuantizedModules | None:
    """What loading ``f`` with ``native=True`` keeps quantized (None: nothing), without reading a weight."""
    return _native_quantization({hf.removesuffix(".weight"): NATIVE_CONFIGS[info.type_name]
                                 for hf, info in gguf_tensor_names(f).items() if is_native(hf, info.type_name)})


def _native_quantization(module_configs: dict[str, QuantConfig]) -> QuantizedModules | None:
    """The modules kept quantized, under their Hugging Face names (trident fuses q/k/v and gate/up when it
    installs them): the most common format as the default, the others per module."""
    if not module_configs:
        return None
    default = Counter(module_configs.values()).most_common(1)[0][0]
    return QuantizedModules(default, tuple(module_configs),
                            {m: c for m, c in module_configs.items() if c != default})
