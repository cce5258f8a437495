"""The attention backend interface and the per-step metadata every layer reads.

The runner builds one :class:`AttentionMetadata` per step from the StepPlan and passes it down
explicitly; layers never look anything up in globals. The KV cache of a layer is one
:class:`LayerKVCache` (keys, values and, for a quantized cache, their scales) whose layout the backend
chooses (``cache_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # the kernels import Triton
    from trident.kernels.kv_cache_write import KVStore


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence computing more than one token this step (a prompt chunk)."""

    token_start: int
    """Index of its first token in the flat batch."""
    num_query_tokens: int
    context_len: int
    """Tokens in the cache after this step (start_pos + num_query_tokens)."""
    block_table: torch.Tensor
    """int64 [num_blocks_needed] physical blocks covering [0, context_len)."""
    query_positions: torch.Tensor
    """int64 [num_query_tokens]."""


@dataclass(frozen=True)
class DecodeBatch:
    """All sequences computing exactly one token this step, attended together (padded)."""

    token_indices: torch.Tensor
    """int64 [B]: where their tokens sit in the flat batch."""
    block_tables: torch.Tensor
    """int64 [B, max_blocks], padded with block 0."""
    context_lens: torch.Tensor
    """int64 [B]."""
    query_positions: torch.Tensor
    """int64 [B] (= context_lens - 1)."""
    token_indices_are_all: bool = False
    """True when the whole flat batch is this decode batch, in order (no scatter needed)."""


@dataclass(frozen=True)
class PrefillBatch:
    """All prefill chunks of a step as flat tensors, for kernels that attend to every chunk in one launch.
    Built only for backends that ask for it (``wants_prefill_batch``); chunk s is ``prefills[s]``."""

    query_starts: torch.Tensor
    """int32 [N]: row of each chunk's first token in the flat batch."""
    query_lens: torch.Tensor
    """int32 [N]."""
    context_lens: torch.Tensor
    """int32 [N]: tokens in the cache after this step; the chunk's tokens are the last query_lens of them."""
    block_tables: torch.Tensor
    """int32 [N, max_blocks], padded with block 0."""
    max_query_len: int


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's paged KV cache, in the layout its backend chose (``cache_shape``).

    A float cache holds the keys and values themselves (``key_scale``/``value_scale`` None). A quantized one
    (int8 or fp8 codes, ``trident.quant.kv``) also holds one float32 scale per (token slot, kv head) for the
    keys and for the values, shaped like the code tensors without their last (head_dim) axis: slot value =
    code * scale. A latent cache (multi-head latent attention, ``KVCacheSpec.has_value`` False) holds its latents
    in ``key`` and no value tensor (``value`` None)."""

    key: torch.Tensor
    value: torch.Tensor | None
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.key_scale is None) != (self.value_scale is None):
            raise ValueError("LayerKVCache: give both key_scale and value_scale, or neither")
        if self.value is None and self.key_scale is not None:
            raise ValueError("LayerKVCache: a latent cache (no value tensor) is not quantized")

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the cache (codes or values first, then scales if any)."""
        scales = (self.key_scale, self.value_scale) if self.key_scale is not None else ()
        values = (self.value,) if self.value is not None else ()
        return (self.key, *values, *scales)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, shared by all layers."""

    slot_mapping: torch.Tensor
    """int64 [num_tokens]: cache slot (block * block_size + offset) of every new token."""
    prefills: tuple[PrefillSeq, ...]
    decode: DecodeBatch | None
    num_tokens: int
    prefill_batch: PrefillBatch | None = None
    """The prefills as flat tensors; set when the backend wants_prefill_batch and there are prefills."""
    mask_cache: dict = field(default_factory=dict)
    """Masks built once per step per sliding window and reused by every layer."""


class AttentionBackend(Protocol):
    """Writes new keys/values into the paged cache and attends over it."""

    wants_prefill_batch: bool
    """Whether the runner should also build ``AttentionMetadata.prefill_batch`` each step."""
    supports_mla: bool
    """Whether the backend's cache layout serves multi-head latent attention (DeepSeek; trident/attention/
    mla_torch.py): only the torch reference does for now."""
    supports_cuda_graphs: bool
    """Whether a decode-only step can be captured and replayed as a CUDA graph: its launches depend only on
    tensor shapes, nothing syncs with the host, and a padding row (slot -1, context length 0) is harmless."""

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's key (and value) cache tensor; the scale tensors of a quantized cache drop its
        last (head_dim) axis."""
        ...

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 meta: AttentionMetadata) -> None:
        """key/value [num_tokens, kv_heads, head_dim] into their slots (``meta.slot_mapping``)."""
        ...

    def kv_store(self, cache: LayerKVCache, meta: AttentionMetadata) -> KVStore | None:
        """Where the rotary kernel may write the step's keys and values itself, in the launch that rotates them
        (trident.models.ops.rotate_qkv), instead of a write_kv launch after it; None where the cache's layout is
        not the kernels' (the caller then calls write_kv)."""
        ...

    def forward(self, query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, *, scale: float,
                sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim] -> output of the same shape."""
        ...
