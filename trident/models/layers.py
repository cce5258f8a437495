"""Building blocks shared by the model families: norms, rotary embeddings, gated MLP, attention layer.

Weights follow Hugging Face names; fused projections (qkv_proj, gate_up_proj) are declared by each
model's ``packed_modules`` mapping and filled by :func:`trident.models.weights.load_weights`. The
elementwise math (norms, rotary, gated activation) is in :mod:`trident.models.ops`, which runs it through
Triton kernels on CUDA and through torch elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trident.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from trident.config import ModelConfig, RopeConfig
from trident.models import ops


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b). On CUDA (where Triton imports), 1 to GEMV_MAX_ROWS rows of a 16-bit x against a contiguous
    weight of its dtype (rows 16-byte aligned, see _takes_gemv) go through the Triton matrix-vector kernel
    of trident/kernels/gemv.py: decode at small batch is bound by reading the weights, which the kernel
    streams in one launch, where cuBLAS reached ~3.1 TB/s on Llama-3-8B's smaller projections on an H200 and
    added a split-K reduce kernel (python -m trident.kernels.bench_gemv compares the two). A single bfloat16
    row on the CPU goes through matrix-vector (measured 30% faster there than the GEMM path for the same
    bytes); everything else through F.linear. The choice depends on shapes, strides, dtypes, alignment and
    the device, never on values, so it holds across CUDA-graph capture and replay."""
    if _takes_gemv(x, weight, bias):
        from trident.kernels.gemv import GEMV_MAX_ROWS, gemv

        if 1 <= x.shape[0] <= GEMV_MAX_ROWS:
            return gemv(x, weight, bias)
    if x.shape[0] == 1 and x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        y = torch.mv(weight, x[0]).unsqueeze(0)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the gemv kernel takes this call at full speed (row count apart): Triton on CUDA, x and weight
    16-bit of one dtype, the weight contiguous, and rows of both starting on 16 bytes: K and x's row stride
    multiples of 16 elements, both data pointers of 16 bytes, which is what Triton specialises on to vectorise
    and pipeline the loads (the models' hidden and intermediate sizes are multiples of 16)."""
    return (ops.uses_kernels(x) and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.is_contiguous() and x.stride(1) == 1
            and x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
            and weight.data_ptr() % 16 == 0
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are created empty (never initialised): a checkpoint fills them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token embedding table (filled from the checkpoint)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., embedding_dim] -> [..., num_embeddings]: the table as a tied output projection."""
        return linear(hidden, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32.

    ``unit_offset`` selects Gemma's form, which scales by (1 + weight) before casting back; the
    Llama form casts back first and then scales by weight (the two differ in low precision).

    ``norm(x)`` gives the normalised x. ``norm(x, residual)`` first adds x to the residual stream and
    gives (normalised sum, sum): the decoder layers carry the residual stream separately so that the
    add fuses with the norm after it.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, self.unit_offset)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)

    def with_residual(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised, residual stream) at a layer's entry: the first layer starts the stream with x, the
        others add x to it first."""
        if residual is None:
            return self(x), x
        return self(x, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with the configured scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, inv_freq, head_dim)
    return inv_freq


def _yarn_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Yarn: frequencies turning more than beta_fast times over the original context are kept, those turning fewer
    than beta_slow times are divided by factor, with a linear ramp over the dimensions between."""
    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns this many times
        return head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by factor)
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split layout of Hugging Face checkpoints."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def reset_inv_freq(self, device: torch.device) -> None:
        """Recompute the frequencies (after the module was created on the meta device)."""
        self.inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> ops.RotaryInputs:
        """What the layers need to rotate queries and keys at ``positions`` (once per forward)."""
        return ops.rotary_inputs(positions, self.inv_freq, dtype)


def normed_projection(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                      activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the residual stream) for h, stream = norm.with_residual(x, residual) and y = layer(h), or with an
    activation (layer a fused gate|up projection) y = act_and_mul(layer(h)): one launch where the layer fuses the
    norm (and the activation) into its product (a quantized layer's ``fused_norm_forward`` at batch 1 on CUDA),
    else the norm, the layer, the activation."""
    fused = getattr(layer, "fused_norm_forward", None)
    if fused is not None:
        out = fused(x, residual, norm, activation)
        if out is not None:
            return out
    h, residual = norm.with_residual(x, residual)
    y = layer(h)
    return (y if activation is None else ops.act_and_mul(y, activation)), residual


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ops.check_activation(act)
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.act_and_mul(self.gate_up_proj(x), self.act))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(h), the residual stream) for h, stream = norm.with_residual(x, residual) (normed_projection)."""
        act, residual = normed_projection(self.gate_up_proj, x, residual, norm, self.act)
        return self.down_proj(act), residual


class Attention(nn.Module):
    """Self-attention over the paged KV cache: fused qkv projection, optional per-head q/k norms,
    rotary embedding, grouped-query attention through the backend, output projection."""

    def __init__(self, config: ModelConfig, layer_index: int, backend: AttentionBackend,
                 qk_norm: bool = False, norm_unit_offset: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
        self.qk_norm = qk_norm
        self.scale = config.attention_scale
        self.sliding_window = config.layer_window(layer_index)
        self.logit_softcap = config.attn_logit_softcapping
        self.layer_index = layer_index
        self.backend = backend

    def forward(self, hidden: torch.Tensor, rope: ops.RotaryInputs, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self._attend(self.qkv_proj(hidden), rope, kv_cache, meta)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, rope: ops.RotaryInputs,
                       kv_cache: LayerKVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(h), the residual stream) for h, stream = norm.with_residual(x, residual) (normed_projection)."""
        qkv, residual = normed_projection(self.qkv_proj, x, residual, norm)
        return self._attend(qkv, rope, kv_cache, meta), residual

    def _attend(self, qkv: torch.Tensor, rope: ops.RotaryInputs, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = qkv.shape[0]
        head_norms = None
        if self.qk_norm:
            head_norms = ops.HeadNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                       self.q_norm.unit_offset)
        store = self.backend.kv_store(kv_cache, meta) if ops.uses_kernels(qkv) else None
        q, k, v = ops.rotate_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope, head_norms, store)
        if store is None:
            self.backend.write_kv(k, v, kv_cache, meta)
        out = self.backend.forward(q, kv_cache, meta, scale=self.scale,
                                   sliding_window=self.sliding_window, logit_softcap=self.logit_softcap)
        return self.o_proj(out.reshape(num_tokens, self.q_size))
