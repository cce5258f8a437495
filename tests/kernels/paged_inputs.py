"""Random inputs for the paged-attention kernel tests: a block-major cache holding each sequence's
context through a shuffled block table (every other slot NaN, so a read outside a context shows), and
queries as strided views of a wider tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kernel_checks import random_block_tables

from trident.quant.kv import kv_cache_format, quantize_kv


@dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    window: int | None = None
    softcap: float | None = None

    @property
    def scale(self) -> float:
        return 2.0 * self.head_dim ** -0.5  # scores of a few units: peaked softmaxes, real soft-capping


@dataclass
class PagedContext:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


def paged_context(shape: Shape, lengths: list[int], device: torch.device, g: torch.Generator,
                  fill: float = float("nan")) -> PagedContext:
    """Caches [num_blocks, kv_heads, block_size, D] with random keys/values at each sequence's first
    ``lengths[i]`` positions and ``fill`` everywhere else."""
    bs = shape.block_size
    width = max(1, max(-(-n // bs) for n in lengths)) + 2  # wider than needed: padded entries exist
    num_blocks = sum(-(-n // bs) for n in lengths) + 3
    tables = random_block_tables(lengths, bs, num_blocks, width, g)
    cache_shape = (num_blocks, shape.num_kv_heads, bs, shape.head_dim)
    caches = []
    for _ in range(2):
        cache = torch.full(cache_shape, fill, dtype=shape.dtype)
        for table, n in zip(tables, lengths):
            positions = torch.arange(n)
            cache[table[positions // bs], :, positions % bs] = torch.randn(
                n, shape.num_kv_heads, shape.head_dim, generator=g).to(shape.dtype)
        caches.append(cache.to(device))
    return PagedContext(caches[0], caches[1], tables.to(device), torch.tensor(lengths, device=device))


def strided_queries(shape: Shape, num_rows: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """[num_rows, num_heads, D] as a view of a wider (fused-projection-like) tensor."""
    wide = torch.randn(num_rows, shape.num_heads + 2 * shape.num_kv_heads, shape.head_dim, generator=g)
    return wide.to(shape.dtype).to(device)[:, : shape.num_heads]


def quantized_context(ctx: PagedContext, name: str) -> tuple[PagedContext, torch.Tensor, torch.Tensor]:
    """The context's cache as ``name`` (int8 / fp8) codes and scales; slots outside every context get NaN scales."""
    fmt = kv_cache_format(name, torch.float32)
    out = []
    for cache in (ctx.k_cache, ctx.v_cache):
        unused = cache.isnan().any(dim=-1)
        codes, scale = quantize_kv(torch.nan_to_num(cache.float()), fmt)
        out.append((codes, scale.masked_fill(unused, float("nan"))))
    (k, ks), (v, vs) = out
    return PagedContext(k, v, ctx.block_tables, ctx.context_lens), ks, vs
