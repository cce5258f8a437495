"""What loading a model file or folder yields: config, weights under Hugging Face names, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trident.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from trident.quant.format import QuantizedModules
    from trident.tokenizer import Tokenizer


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded model: everything needed to build and run it, independent of the file format."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    """Weights keyed by Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``).
    Quantized GGUF tensors are dequantized to float32; float tensors keep their stored dtype and may be
    copy-on-write views of the file."""
    tensor_types: dict[str, str]
    """The stored type of each tensor: ggml names for GGUF ("Q4_1", "Q6_K", "F32"), safetensors dtype
    names for folders ("BF16", "F32")."""
    tokenizer: Tokenizer | None
    format: str
    """"gguf" or "safetensors"."""
    path: str
    file_bytes: int
    """Bytes of the weight files on disk."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """The Hugging Face-style config dict the ModelConfig was built from (read or reconstructed)."""
    quantization: QuantizedModules | None = None
    """For a folder written by ``trident quantize``: which modules hold quantized weights, and how (their
    tensors are ``<module>.qweight`` / ``.scales`` / ``.zeros`` in :attr:`tensors`); None when unquantized."""

    def num_parameters(self) -> int:
        """Parameters actually stored (a tied lm_head counts once); a quantized layer counts the N x K weights
        its codes stand for, not its codes, scales and zero points."""
        total = sum(t.numel() for t in self.tensors.values())
        if self.quantization is not None:
            for name in self.quantization.modules:
                per_code = 2 if self.quantization.config_of(name).bits == 4 else 1  # int4: two codes per byte
                parts = [self.tensors.get(f"{name}.{kind}") for kind in ("qweight", "scales", "zeros")]
                total -= sum(t.numel() for t in parts if t is not None)
                total += parts[0].numel() * per_code
        return total

    def quantized_average_bits(self) -> float:
        """Stored bits of the quantized modules (codes, scales, zero points) per weight they stand for; 0.0 when
        unquantized."""
        if self.quantization is None:
            return 0.0
        bits = weights = 0
        for name in self.quantization.modules:
            parts = [self.tensors.get(f"{name}.{kind}") for kind in ("qweight", "scales", "zeros")]
            bits += 8 * sum(t.numel() * t.element_size() for t in parts if t is not None)
            weights += parts[0].numel() * (2 if self.quantization.config_of(name).bits == 4 else 1)
        return bits / weights
