"""Quantized (int8 / fp8) KV caches in the Triton kernels: the write kernel quantizes like the torch reference
(``trident.quant.kv``), and the decode and prefill kernels, which convert codes in registers and apply the
scales to scores and probabilities, equal their fp32 references over the dequantized cache. Unused slots carry
NaN scales, so a kernel reading outside a context shows."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, assert_codes_close
from paged_inputs import Shape, paged_context, quantized_context, strided_queries

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.attention.torch_ref import TorchAttention
from trident.kernels.kv_cache_write import write_kv, write_kv_reference
from trident.kernels.paged_decode import paged_decode, paged_decode_reference
from trident.kernels.paged_prefill import paged_prefill, paged_prefill_reference
from trident.quant.kv import dequantize_kv

pytestmark = pytest.mark.gpu
bf16, fp32 = torch.bfloat16, torch.float32
CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("in_dtype,block_size,num_kv_heads,head_dim", [(bf16, 16, 3, 64), (fp32, 4, 2, 24)])
def test_quantized_write_matches_reference(kernel_device, name, in_dtype, block_size, num_kv_heads,
                                           head_dim) -> None:
    g = torch.Generator().manual_seed(head_dim)
    num_tokens, num_blocks = 29, 10
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=g)
    fused[3] *= 1e4  # large rows saturate, never overflow
    fused[5] = 0.0  # an all-zero row: scale 0, codes 0
    fused = fused.to(in_dtype).to(kernel_device)
    key, value = fused[:, num_kv_heads: 2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    padding = torch.rand(num_tokens, generator=g) < 0.2
    padding[[3, 5]] = False  # the large and the zero row are written
    slots[padding] = -1
    slots = slots.to(kernel_device)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    caches = [torch.zeros(shape, dtype=CODES[name], device=kernel_device) for _ in range(2)]
    scales = [torch.full(shape[:-1], -1.0, device=kernel_device) for _ in range(2)]
    refs = [t.clone() for t in caches], [t.clone() for t in scales]
    write_kv(key, value, *caches, slots, *scales)
    write_kv_reference(key, value, *refs[0], slots, *refs[1])
    for codes, ref_codes, scale, ref_scale in zip(caches, refs[0], scales, refs[1]):
        assert_codes_close(scale, ref_scale)
        assert_codes_close(codes, ref_codes)
        assert not dequantize_kv(codes, scale, fp32).isnan().any() and not codes.float().isinf().any()
    written = scales[0] >= 0
    assert written.sum() == (slots >= 0).sum() * num_kv_heads  # nothing else touched
    # the reference backend's head-major layout holds the same codes and scales
    keep = slots >= 0
    head_major = LayerKVCache(*(torch.zeros(shape, dtype=CODES[name], device=kernel_device).transpose(0, 1)
                                .contiguous() for _ in range(2)),
                              *(torch.full(shape[:-1], -1.0, device=kernel_device).transpose(0, 1).contiguous()
                                for _ in range(2)))
    meta = AttentionMetadata(slot_mapping=slots[keep], prefills=(), decode=None, num_tokens=int(keep.sum()))
    TorchAttention().write_kv(key[keep], value[keep], head_major, meta)
    for got, want in zip(head_major.tensors(), (*refs[0], *refs[1])):
        assert torch.equal(got.transpose(0, 1).view(torch.uint8 if got.dtype != fp32 else fp32),
                           want.view(torch.uint8 if want.dtype != fp32 else fp32))


CASES = [
    ("int8", Shape(bf16, 16, 4, 64, 16), 1),
    ("fp8", Shape(bf16, 8, 2, 64, 16, window=20, softcap=5.0), 3),
    ("int8", Shape(fp32, 6, 2, 24, 4, window=6, softcap=5.0), 2),  # gemma2-like tiny test model
    ("fp8", Shape(fp32, 8, 8, 32, 32), 1),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_quantized_decode_matches_reference(kernel_device, index: int) -> None:
    name, shape, splits = CASES[index]
    g = torch.Generator().manual_seed(200 + index)
    bs = shape.block_size
    lengths = [1, bs - 1, bs + 1, 2 * bs + 3, 70]
    ctx, k_scale, v_scale = quantized_context(paged_context(shape, lengths, kernel_device, g), name)
    batch = ctx.block_tables.shape[0]
    query = strided_queries(shape, batch + 2, kernel_device, g)
    rows = torch.randperm(batch + 2, generator=g)[:batch].to(kernel_device)
    out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=kernel_device)
    ref = out.clone()
    options = dict(scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap)
    paged_decode(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, rows, out,
                 num_splits=splits, k_scale=k_scale, v_scale=v_scale, **options)
    paged_decode_reference(query, ctx.k_cache, ctx.v_cache, ctx.block_tables, ctx.context_lens, rows, ref,
                           k_scale=k_scale, v_scale=v_scale, **options)
    assert_close(out[rows].float(), ref[rows].float(), shape.dtype, f"decode {name} {shape} x{splits}")


@pytest.mark.parametrize("index", range(len(CASES)))
def test_quantized_prefill_matches_reference(kernel_device, index: int) -> None:
    name, shape, _ = CASES[index]
    g = torch.Generator().manual_seed(300 + index)
    bs = shape.block_size
    chunks = [(0, bs + 1), (bs - 1, bs + 2), (37, 20), (2 * bs, 1)]  # prefix hits, chunks crossing blocks
    ctx, k_scale, v_scale = quantized_context(paged_context(shape, [p + n for p, n in chunks], kernel_device, g), name)
    starts, row = [], 0
    for _, n in chunks:
        starts.append(row)
        row += n
    query = strided_queries(shape, row, kernel_device, g)
    out = torch.full(query.shape, float("nan"), dtype=shape.dtype, device=kernel_device)
    ref = out.clone()
    args = (torch.tensor(starts, dtype=torch.int32, device=kernel_device),
            torch.tensor([n for _, n in chunks], dtype=torch.int32, device=kernel_device),
            ctx.context_lens.to(torch.int32), ctx.block_tables.to(torch.int32), max(n for _, n in chunks))
    options = dict(scale=shape.scale, sliding_window=shape.window, logit_softcap=shape.softcap, k_scale=k_scale,
                   v_scale=v_scale)
    paged_prefill(query, ctx.k_cache, ctx.v_cache, *args, out, **options)
    paged_prefill_reference(query, ctx.k_cache, ctx.v_cache, *args, ref, **options)
    assert_close(out.float(), ref.float(), shape.dtype, f"prefill {name} {shape}")
