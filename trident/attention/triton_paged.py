"""Paged attention on the GPU through Triton kernels (trident/kernels/): the step's new keys/values go into the
cache in the launch that rotates them (``kv_store``; or one write_kv launch), one launch attends every prefill chunk
(prefix-cached context included), one every decoding sequence (a split context combined by its last program); over
an 8-bit (int8 / fp8) cache the decode runs the CUDA kernel of trident/native/paged_decode_cuda.cu where it is built
(codes converted in registers straight into the tensor cores' operands, where Triton's path takes them through
shared memory; its splits go through the reduce kernel).

Cache layout (this backend's choice): ``[num_blocks, num_kv_heads, block_size, head_dim]``, block-major.
Each (block, kv head) is one contiguous ``block_size * head_dim`` run, so a kernel's K/V tile is read as
whole contiguous rows whatever its tile length, and one physical block of a layer is one contiguous slice
(copying or swapping a block touches one range). The write kernel stores each (token, kv head) as one
contiguous ``head_dim`` row. A quantized cache (int8 / fp8 codes) keeps its float32 scales as ``[num_blocks,
num_kv_heads, block_size]``: written (quantized) by the write kernel, read by the attention kernels beside the
codes and applied in registers (no dequantized copy of the cache is ever made).

The decode path is CUDA-graph friendly: its launches depend on tensor shapes only (the batch, the block
table width) and on the multiprocessor count read once, never on tensor values, and nothing syncs with
the host.
"""

from __future__ import annotations

import torch

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.kernels.kv_cache_write import KVStore, write_kv
from trident.kernels.paged_decode import choose_num_splits, paged_decode, split_tickets
from trident.kernels.paged_prefill import paged_prefill
from trident.native import paged_decode_cuda

DEFAULT_NUM_SMS = 132
"""Multiprocessors assumed off CUDA (Triton's interpreter in tests): an H100/H200's count."""


class TritonPagedAttention:
    """The CUDA backend. Grouped-query attention reads each K/V tile once for its whole query-head group."""

    wants_prefill_batch = True
    supports_cuda_graphs = True
    supports_mla = False  # DeepSeek's latent attention runs on the torch backend only

    def __init__(self, num_sms: int | None = None) -> None:
        self._num_sms = num_sms
        """Multiprocessors of the device, read on first use unless given (decides decode splitting)."""
        self._tickets: torch.Tensor | None = None

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 meta: AttentionMetadata) -> None:
        """key/value [num_tokens, kv_heads, head_dim] into their slots."""
        write_kv(key, value, cache.key, cache.value, meta.slot_mapping, cache.key_scale, cache.value_scale)

    @staticmethod
    def kv_store(cache: LayerKVCache, meta: AttentionMetadata) -> KVStore:
        """This cache and the step's slots: the rotary kernel writes the keys and values (no write_kv launch)."""
        return KVStore(cache.key, cache.value, meta.slot_mapping, cache.key_scale, cache.value_scale)

    def forward(self, query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, *, scale: float,
                sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim] -> output of the same shape."""
        k_cache, v_cache = cache.key, cache.value
        out = torch.empty_like(query)  # every row is a prefill token or a decode token: all get written
        options = dict(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
        if meta.prefills:
            batch = meta.prefill_batch
            if batch is None:
                raise ValueError("TritonPagedAttention needs AttentionMetadata.prefill_batch for prefill chunks")
            paged_prefill(query, k_cache, v_cache, batch.query_starts, batch.query_lens, batch.context_lens,
                          batch.block_tables, batch.max_query_len, out, k_scale=cache.key_scale,
                          v_scale=cache.value_scale, **options)
        decode = meta.decode
        if decode is not None:
            batch_size, width = decode.block_tables.shape
            num_splits = choose_num_splits(batch_size, k_cache.shape[1], width * k_cache.shape[2],
                                           self.num_sms(query.device))
            rows = (decode.block_tables, decode.context_lens, decode.token_indices)
            scales = (cache.key_scale, cache.value_scale)
            if paged_decode_cuda.takes(query, k_cache, v_cache, *scales, *rows):
                paged_decode_cuda.paged_decode_cuda(query, k_cache, v_cache, *rows, out, num_splits=num_splits,
                                                    k_scale=scales[0], v_scale=scales[1], **options)
            else:
                paged_decode(query, k_cache, v_cache, *rows, out, num_splits=num_splits, k_scale=scales[0],
                             v_scale=scales[1], tickets=self.tickets(query.device), **options)
        return out

    def tickets(self, device: torch.device) -> torch.Tensor:
        """The split decodes' counters on ``device`` (paged_decode's ``tickets``), made on first use: the warm-up
        before a CUDA-graph capture makes them, and every decode leaves them zero for the next."""
        if self._tickets is None or self._tickets.device != device:
            self._tickets = split_tickets(self.num_sms(device), device)
        return self._tickets

    def num_sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else DEFAULT_NUM_SMS)
        return self._num_sms
