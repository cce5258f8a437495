"""QuantizedEmbedding: a token embedding table held as quantized codes (a GGUF file's Q8_0 / Q4_0 / Q4_1
``token_embd`` kept as stored), the twin of :class:`trident.models.layers.Embedding`.

A lookup dequantizes only the rows it picks. As a tied LM head (:meth:`logits`) the table is a QuantizedLinear over
the same codes (``head``, sharing its buffers), so the head runs whatever weight-only kernel the device has: on the
CPU, torch's packed int4 kernel (Q8_0 through the two-halves form of :mod:`trident.quant.cpu_kernels`), which reads
one byte per weight where the bfloat16 table reads two: SmolLM2's head, 49152 x 576, is the largest single read of
its decode step.
"""

from __future__ import annotations

import torch
from torch import nn

from trident.quant.linear import QuantizedLinear
from trident.quant.rtn import QuantConfig, QuantizedWeight, dequantize


class QuantizedEmbedding(nn.Module):
    """Embeddings [num_embeddings, embedding_dim] as codes; rows come out in ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: QuantConfig, q: QuantizedWeight,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.head = QuantizedLinear(embedding_dim, num_embeddings, config, q)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        flat = ids.reshape(-1)
        rows = QuantizedWeight(head.qweight[flat], head.scales[flat],
                               None if head.zeros is None else head.zeros[flat])
        return dequantize(rows, head.config, self.dtype).view(*ids.shape, self.embedding_dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., embedding_dim] -> [..., num_embeddings]: the table as a tied output projection."""
        return self.head(hidden)

    def storage_bytes(self) -> int:
        return self.head.storage_bytes()

    def extra_repr(self) -> str:
        c = self.head.config
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={c.bits}, "
                f"group_size={c.group_size}, symmetric={c.symmetric}")
