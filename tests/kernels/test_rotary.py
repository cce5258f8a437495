"""The rotary kernel (queries and keys in place, in one launch, optionally after the per-head RMSNorm of
Qwen3 / Gemma 3) equals its torch reference element by element and float64 math over the whole output:
head dims 64 / 128 / 256 (and 24, 80 for non-power-of-two halves), grouped-query head counts, three
dtypes, queries and keys as strided views of one fused qkv projection (as the model passes them),
positions up to 400,000 with plain and llama3-scaled frequencies; and it agrees with the models' CPU path
(trident.models.ops on CPU tensors). Values are untouched. Given a KV store, the same launch writes the rotated keys
and the values into the paged cache (bfloat16, int8, fp8) exactly as the write kernel does after a plain rotation, and
as the torch reference writes them."""

from __future__ import annotations

import pytest
import torch
from elementwise_checks import (
    DTYPES,
    assert_matches_math,
    assert_matches_reference,
    dtype_id,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_codes_close

from trident.config import RopeConfig
from trident.kernels.kv_cache_write import KVStore, write_kv, write_kv_reference
from trident.kernels.rotary import rotary, rotary_reference
from trident.models import ops
from trident.models.layers import rope_inv_freq

pytestmark = pytest.mark.gpu

EPS = 1e-6
ROPES = {
    "default": RopeConfig(theta=10000.0),
    "llama3": RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192),
    "qwen3": RopeConfig(theta=1000000.0),
}
# (num_heads, num_kv_heads, head_dim): Llama-3-8B, Qwen3-0.6B, Gemma, MQA, MHA, odd group sizes, tiny dims
HEAD_SHAPES = [(32, 8, 128), (16, 8, 128), (8, 4, 256), (8, 1, 64), (4, 4, 64), (28, 4, 128), (12, 4, 64),
               (40, 8, 128), (4, 2, 24), (6, 2, 80)]


class _Case:
    """A fused qkv projection and its q / k views, positions, frequencies and optional head-norm weights."""

    def __init__(self, device, num_tokens, num_heads, num_kv_heads, head_dim, dtype, rope, qk_norm, unit_offset,
                 max_position, seed) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        width = (num_heads + 2 * num_kv_heads) * head_dim
        self.qkv = (torch.randn(num_tokens, width, generator=g) * 2).to(dtype).to(device)
        self.positions = torch.randint(0, max_position + 1, (num_tokens,), generator=g)
        self.positions[: min(2, num_tokens)] = torch.tensor([0, max_position])[: min(2, num_tokens)]
        self.positions = self.positions.to(device)
        self.inv_freq = rope_inv_freq(ROPES[rope], head_dim).to(device)
        self.norms = None
        if qk_norm:
            base = 0.0 if unit_offset else 1.0
            q_w, k_w = (torch.randn(head_dim, generator=g) * 0.2 + base for _ in range(2))
            self.norms = ops.HeadNorms(q_w.to(dtype).to(device), k_w.to(dtype).to(device), EPS, unit_offset)

    def views(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        t = qkv.shape[0]
        return (qkv[:, :q_size].view(t, self.num_heads, self.head_dim),
                qkv[:, q_size: q_size + kv_size].view(t, self.num_kv_heads, self.head_dim),
                qkv[:, q_size + kv_size:].view(t, self.num_kv_heads, self.head_dim))

    def norm_args(self) -> tuple:
        n = self.norms
        return () if n is None else (n.q_weight, n.k_weight, n.eps, n.unit_offset)

    def math(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """float64 rotation of the float32 angle (as Hugging Face computes it), after an exact head norm."""
        x = x.double()
        if weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
            x = x * (1.0 + weight.double() if self.norms.unit_offset else weight.double())
        angle = (self.positions.float()[:, None] * self.inv_freq[None, :]).double()[:, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)


def _check(device, num_tokens, num_heads, num_kv_heads, head_dim, dtype, rope="default", qk_norm=False,
           unit_offset=False, max_position=4096, seed=0) -> None:
    case = _Case(device, num_tokens, num_heads, num_kv_heads, head_dim, dtype, rope, qk_norm, unit_offset,
                 max_position, seed)
    what = (f"rotary T={num_tokens} heads={num_heads}/{num_kv_heads} D={head_dim} {dtype_id(dtype)} {rope} "
            f"qk_norm={qk_norm} unit_offset={unit_offset} max_position={max_position}")
    before = case.qkv.clone()
    q0, k0, v0 = case.views(before)
    q_ref, k_ref = rotary_reference(q0, k0, case.positions, case.inv_freq, *case.norm_args())
    q, k, v = case.views(case.qkv)
    rotary(q, k, case.positions, case.inv_freq, *case.norm_args())
    assert torch.equal(v, v0), f"{what}: values changed"
    assert_matches_reference(q, q_ref, f"{what} queries")
    assert_matches_reference(k, k_ref, f"{what} keys")
    n = case.norms
    assert_matches_math(q, case.math(q0, n and n.q_weight), f"{what} queries")
    assert_matches_math(k, case.math(k0, n and n.k_weight), f"{what} keys")
    # the models' CPU path on the same inputs
    cpu = ops.rotary_inputs(case.positions.cpu(), case.inv_freq.cpu(), dtype)
    q_cpu, k_cpu, _ = ops.rotate_qkv(before.cpu(), num_heads, num_kv_heads, head_dim, cpu,
                                     None if n is None else ops.HeadNorms(n.q_weight.cpu(), n.k_weight.cpu(),
                                                                          n.eps, n.unit_offset))
    assert_matches_math(q.cpu(), q_cpu.double(), f"{what} queries (against the CPU path)")
    assert_matches_math(k.cpu(), k_cpu.double(), f"{what} keys (against the CPU path)")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", HEAD_SHAPES, ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_rotary(kernel_device, heads: tuple[int, int, int], dtype: torch.dtype) -> None:
    _check(kernel_device, 9, *heads, dtype, seed=sum(heads))


@pytest.mark.parametrize("unit_offset", [False, True], ids=["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", [(16, 8, 128), (8, 4, 256), (8, 1, 64), (4, 2, 24)],
                         ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_rotary_with_head_norms(kernel_device, heads, dtype: torch.dtype, unit_offset: bool) -> None:
    _check(kernel_device, 9, *heads, dtype, rope="qwen3", qk_norm=True, unit_offset=unit_offset, seed=heads[2])


@pytest.mark.parametrize("max_position", [40_000, 131_072, 400_000])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_far_positions(kernel_device, rope: str, max_position: int) -> None:
    """Angles of hundreds of thousands of radians (cos and sin must be full-range, not fast approximations)."""
    _check(kernel_device, 33, 8, 2, 128, torch.float32, rope=rope, max_position=max_position, seed=max_position)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_tokens=st.integers(1, 40), num_kv_heads=st.integers(1, 8), group=st.sampled_from([1, 2, 3, 4, 8]),
       head_dim=st.sampled_from([64, 128, 256, 96]), dtype=st.sampled_from(DTYPES), qk_norm=st.booleans(),
       unit_offset=st.booleans(), rope=st.sampled_from(list(ROPES)), seed=st.integers(0, 2**16))
def test_random_shapes(kernel_device, num_tokens, num_kv_heads, group, head_dim, dtype, qk_norm, unit_offset,
                       rope, seed) -> None:
    _check(kernel_device, num_tokens, num_kv_heads * group, num_kv_heads, head_dim, dtype, rope=rope,
           qk_norm=qk_norm, unit_offset=unit_offset, seed=seed)


def test_position_zero_is_identity(kernel_device) -> None:
    """Position 0 leaves queries and keys as they were (up to the rounding of cos 0 and sin 0)."""
    q = torch.randn(3, 4, 64, device=kernel_device)
    k = torch.randn(3, 2, 64, device=kernel_device)
    q0, k0 = q.clone(), k.clone()
    rotary(q, k, torch.zeros(3, dtype=torch.long, device=kernel_device),
           rope_inv_freq(ROPES["default"], 64).to(kernel_device))
    torch.testing.assert_close(q, q0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, k0, rtol=1e-6, atol=1e-6)


CACHE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


@pytest.mark.parametrize("cache", list(CACHE_DTYPES))
@pytest.mark.parametrize("heads,qk_norm", [((32, 8, 128), False), ((16, 8, 128), True), ((16, 16, 64), False),
                                           ((4, 2, 24), True), ((6, 3, 80), False)],
                         ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else f"norm{x}")
def test_rotary_writes_the_cache(kernel_device, heads: tuple[int, int, int], qk_norm: bool, cache: str) -> None:
    """rotary(..., value, store) == rotary(...) then write_kv(...), bit for bit (queries, keys in place, codes,
    scales), padding slots skipped; and the cache holds what the torch reference writes for those keys and values."""
    num_heads, num_kv_heads, head_dim = heads
    num_tokens, block_size, num_blocks = 11, 4, 8
    case = _Case(kernel_device, num_tokens, num_heads, num_kv_heads, head_dim, torch.bfloat16, "qwen3", qk_norm,
                 False, 4096, head_dim + num_heads)
    g = torch.Generator().manual_seed(num_heads)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[2, 7]] = -1
    slots = slots.to(kernel_device)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    codes = CACHE_DTYPES[cache]
    quantized = codes != torch.bfloat16

    def empty_store() -> KVStore:
        caches = [torch.zeros(shape, device=kernel_device).to(codes) for _ in range(2)]
        scales = [torch.full(shape[:-1], -1.0, device=kernel_device) for _ in range(2)] if quantized else [None] * 2
        return KVStore(*caches, slots, *scales)

    def tensors(store: KVStore) -> list[torch.Tensor]:
        return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in
                (store.k_cache, store.v_cache, store.k_scale, store.v_scale) if t is not None]

    before = case.qkv.clone()
    fused, store = case.qkv, empty_store()
    q, k, v = case.views(fused)
    rotary(q, k, case.positions, case.inv_freq, *case.norm_args(), value=v, store=store)
    plain, unfused = before.clone(), empty_store()
    q2, k2, v2 = case.views(plain)
    rotary(q2, k2, case.positions, case.inv_freq, *case.norm_args())
    write_kv(k2, v2, unfused.k_cache, unfused.v_cache, slots, unfused.k_scale, unfused.v_scale)
    assert torch.equal(fused, plain), "queries / keys in place differ from the plain rotation"
    for got, want in zip(tensors(store), tensors(unfused)):
        assert torch.equal(got, want), "the cache differs from rotary + write_kv"
    if quantized:
        assert int((store.k_scale >= 0).sum()) == int((slots >= 0).sum()) * num_kv_heads  # nothing else touched
    # the torch write of the keys as rotated (their rotation is checked against float64 above) and the values
    _, _, v0 = case.views(before)
    reference = empty_store()
    write_kv_reference(k, v0, reference.k_cache, reference.v_cache, slots, reference.k_scale, reference.v_scale)
    for got, want in zip((store.k_cache, store.v_cache, store.k_scale, store.v_scale),
                         (reference.k_cache, reference.v_cache, reference.k_scale, reference.v_scale)):
        if got is None:
            continue
        if quantized:
            assert_codes_close(got, want)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)
