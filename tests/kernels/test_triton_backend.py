"""TritonPagedAttention equals the reference backend (TorchAttention) on whole engine steps, with the
metadata ModelRunner.prepare builds: prefill chunks after prefix-cached context, fresh prompts and
decodes mixed in one step (scattered rows), and decode-only steps; each backend writes the keys/values
into its own cache layout."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from kernel_checks import assert_close, assert_codes_close

from trident.attention.base import AttentionMetadata, LayerKVCache
from trident.attention.cache_spec import KVCacheSpec
from trident.attention.torch_ref import TorchAttention
from trident.attention.triton_paged import TritonPagedAttention
from trident.engine.plan import ScheduledChunk, StepPlan
from trident.engine.request import SamplingParams
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.quant.kv import kv_cache_format, quantize_kv

pytestmark = pytest.mark.gpu
bf16, fp32 = torch.bfloat16, torch.float32

# (dtype, num_heads, num_kv_heads, head_dim, block_size, window, softcap)
CASES = [
    (fp32, 8, 2, 64, 16, None, None),
    (bf16, 32, 4, 128, 16, None, None),
    (fp32, 16, 2, 128, 32, 48, None),
    (fp32, 8, 8, 64, 16, None, 30.0),
    (bf16, 8, 1, 64, 32, 40, 50.0),
    (fp32, 4, 2, 16, 4, 6, 5.0),  # the tiny test models' shape
]


def _runner(backend, num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int, dtype, device,
            kv: str = "auto"):
    model = SimpleNamespace(config=SimpleNamespace(
        num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=1,
        kv_cache_spec=KVCacheSpec(num_kv_heads=num_kv_heads, key_dim=head_dim)))
    return ModelRunner(model, backend=backend, num_blocks=num_blocks, block_size=block_size,
                       kv_format=kv_cache_format(kv, dtype), device=device,
                       sampler=Sampler(device=device), max_num_seqs=8)


def _plan(chunks: list[tuple[int, int]], block_size: int, rng: random.Random) -> tuple[StepPlan, int]:
    """chunks: (cached tokens, new tokens) per sequence, in step order."""
    needed = [-(-(cached + n) // block_size) for cached, n in chunks]
    physical = list(range(sum(needed) + 2))
    rng.shuffle(physical)
    plan = []
    for i, ((cached, n), k) in enumerate(zip(chunks, needed)):
        table, physical = tuple(physical[:k]), physical[k:]
        plan.append(ScheduledChunk(seq_id=i, token_ids=tuple(range(n)), start_pos=cached, block_table=table,
                                   sample=True, params=SamplingParams(temperature=0.0)))
    return StepPlan(chunks=tuple(plan)), sum(needed) + 2


def _check_step(case, chunks: list[tuple[int, int]], device: torch.device, seed: int,
                kv_cache_dtype: str = "auto") -> None:
    dtype, num_heads, num_kv_heads, head_dim, block_size, window, softcap = case
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    plan, num_blocks = _plan(chunks, block_size, rng)
    # every sequence's whole context (cached part first), then the step's query rows
    contexts = [torch.randn(2, cached + n, num_kv_heads, head_dim, generator=g).to(dtype) for cached, n in chunks]
    num_tokens = plan.num_tokens
    query = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype).to(device)
    outputs, caches = [], []
    for backend in (TorchAttention(), TritonPagedAttention()):
        runner = _runner(backend, num_kv_heads, head_dim, block_size, num_blocks, dtype, device, kv_cache_dtype)
        cache = runner.kv_caches[0]
        for chunk, kv in zip(plan.chunks, contexts):  # what earlier steps (or the prefix cache) left
            if chunk.start_pos:
                slots = [chunk.block_table[p // block_size] * block_size + p % block_size
                         for p in range(chunk.start_pos)]
                meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), prefills=(), decode=None,
                                         num_tokens=len(slots))
                backend.write_kv(kv[0, : chunk.start_pos].to(device), kv[1, : chunk.start_pos].to(device),
                                 cache, meta)
        _, _, meta, _, _ = runner.prepare(plan)
        assert (meta.prefill_batch is not None) == (backend.wants_prefill_batch and bool(meta.prefills))
        new_k = torch.cat([kv[0, c.start_pos:] for c, kv in zip(plan.chunks, contexts)]).to(device)
        new_v = torch.cat([kv[1, c.start_pos:] for c, kv in zip(plan.chunks, contexts)]).to(device)
        backend.write_kv(new_k, new_v, cache, meta)
        outputs.append(backend.forward(query, cache, meta, scale=2 * head_dim ** -0.5,
                                       sliding_window=window, logit_softcap=softcap))
        caches.append(cache)
    torch_cache, triton_cache = caches
    if kv_cache_dtype == "auto":
        for a, b in zip(torch_cache.tensors(), triton_cache.tensors()):
            assert torch.equal(a, b.transpose(0, 1))
    else:
        for a, b in zip(torch_cache.tensors(), triton_cache.tensors()):
            assert_codes_close(b.transpose(0, 1), a)
    assert_close(outputs[1].float(), outputs[0].float(), dtype, f"{case} {kv_cache_dtype} {chunks}")


def _long(device: torch.device) -> int:
    return 700 if device.type == "cuda" else 60


@pytest.mark.parametrize("index", range(len(CASES)))
def test_mixed_step_matches_torch_attention(kernel_device, index: int) -> None:
    bs, long = CASES[index][4], _long(kernel_device)
    # decodes between prefills: a prefix-cache hit, a fresh prompt, a chunk crossing blocks, a 2-token chunk
    chunks = [(bs + 4, 1), (2 * bs, long // 2), (long, 1), (0, long // 3), (3, 1), (bs - 1, bs + 2), (5, 2),
              (long // 4, 1)]
    _check_step(CASES[index], chunks, kernel_device, seed=index)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_decode_step_matches_torch_attention(kernel_device, index: int) -> None:
    bs, long = CASES[index][4], _long(kernel_device)
    chunks = [(n - 1, 1) for n in (1, 2, bs, bs + 1, long, long // 2 + 3, 2 * bs - 1)]
    _check_step(CASES[index], chunks, kernel_device, seed=10 + index)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("index", [1, 4, 5])
def test_quantized_cache_step_matches_torch_attention(kernel_device, kv: str, index: int) -> None:
    """int8 / fp8 caches: each backend quantizes the keys/values it writes and attends over its codes (the
    reference dequantizing gathered blocks, the kernels in registers); a mixed step, then a decode step."""
    bs, long = CASES[index][4], _long(kernel_device)
    _check_step(CASES[index], [(bs + 4, 1), (2 * bs, long // 2), (0, long // 3), (bs - 1, bs + 2), (long, 1)],
                kernel_device, seed=20 + index, kv_cache_dtype=kv)
    _check_step(CASES[index], [(n - 1, 1) for n in (1, bs, bs + 1, long)], kernel_device, seed=30 + index,
                kv_cache_dtype=kv)


@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
def test_decode_replays_in_a_cuda_graph(kv: str) -> None:
    """The decode path captures into a CUDA graph (no host syncs, shapes only) and a replay follows new
    block tables and context lengths written into the captured tensors. CUDA only: Triton's interpreter
    has no graphs, so this test does not take the ``kernel_device`` fixture."""
    from trident.attention.base import DecodeBatch

    backend = TritonPagedAttention()
    g = torch.Generator().manual_seed(3)
    batch, width, block_size, num_blocks = 4, 64, 16, 300
    k_cache = torch.randn(num_blocks, 2, block_size, 64, generator=g).to(bf16).cuda()
    v_cache = torch.randn(num_blocks, 2, block_size, 64, generator=g).to(bf16).cuda()
    scales = {}
    if kv != "auto":  # the same values as codes and scales
        fmt = kv_cache_format(kv, bf16)
        (k_cache, k_scale), (v_cache, v_scale) = quantize_kv(k_cache, fmt), quantize_kv(v_cache, fmt)
        scales = dict(key_scale=k_scale, value_scale=v_scale)
    query = torch.randn(batch, 8, 64, generator=g).to(bf16).cuda()
    tables = torch.zeros(batch, width, dtype=torch.long, device="cuda")
    lens = torch.zeros(batch, dtype=torch.long, device="cuda")
    decode = DecodeBatch(token_indices=torch.arange(batch, device="cuda"), block_tables=tables, context_lens=lens,
                         query_positions=lens - 1, token_indices_are_all=True)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device="cuda"), prefills=(),
                             decode=decode, num_tokens=batch)
    options = dict(scale=0.125, sliding_window=None, logit_softcap=None)
    cache = LayerKVCache(k_cache, v_cache, **scales)
    backend.forward(query, cache, meta, **options)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(query, cache, meta, **options)
    for step in range(2):
        tables.copy_(torch.randint(0, num_blocks, (batch, width), generator=g))
        lens.copy_(torch.tensor([1, 700 + step, 0, 1000]))  # a padding row (0) among them
        graph.replay()
        assert_close(out.float(), backend.forward(query, cache, meta, **options).float(), bf16,
                     f"graph replay {step}")
        assert torch.equal(out[2], torch.zeros_like(out[2]))
