"""A decode step for the CPU in a few torch calls per layer.

At batch 1 on a laptop-class CPU, a small model's decode step costs less in arithmetic than in the torch operations
it issues: each costs 2-6 us to dispatch, and the general forward (attention metadata, paged gathers, the float32
reference attention, module calls) issues about 80 per layer. For decode-only steps of at most
:data:`MAX_ROWS` sequences, :class:`CpuDecoder` runs the same model, from the same weights and the same paged
KV cache, in about 20 calls per layer:

- each projection is one call of the kernel its layer chooses anyway (``QuantizedLinear.cpu_matmul``: torch's
  packed int4 / int8 kernels; a matrix-vector product for one bfloat16 row of a float weight);
- the norms, the rotation and the gated activation are :mod:`trident.models.ops`'s torch code, as in the
  general forward;
- each new key and value is written into its slot in place, and each sequence attends in one
  ``scaled_dot_product_attention`` call over its cached keys: a view of the cache when its blocks are consecutive
  (usual for a lone sequence), one gather otherwise.

It runs the Llama-form decoder (Llama, Mistral, Qwen2, Qwen3: :func:`unsupported_reason` says what it does not
take, and then the runner keeps the general forward) with a float cache in TorchAttention's layout.
tests/engine/test_cpu_decode.py checks it against the general forward; ``enforce_eager`` turns it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident.attention.base import LayerKVCache
from trident.attention.torch_ref import TorchAttention
from trident.models import ops
from trident.models.layers import Linear, linear
from trident.models.llama import LlamaForCausalLM
from trident.native import qmatmul as native_qmatmul
from trident.native.decode_layer import ACTIVATIONS as NATIVE_ACTIVATIONS
from trident.native.decode_layer import LayerSpec, NativeLayer, NativeStep
from trident.quant import cpu_kernels
from trident.quant.linear import QuantizedLinear

MAX_ROWS = min(cpu_kernels.INT4_MAX_ROWS, cpu_kernels.INT8_MAX_ROWS)
"""Most sequences a step may decode here: the packed kernels' row limit (beyond it the general forward batches
better)."""

Product = Callable[[torch.Tensor], torch.Tensor]


def unsupported_reason(model: torch.nn.Module, backend: object, kv_caches: Sequence[LayerKVCache],
                       device: torch.device) -> str | None:
    """Why :class:`CpuDecoder` cannot run ``model``'s decode steps (None: it can)."""
    if device.type != "cpu":
        return "not on the CPU"
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-form decoder"
    if not isinstance(backend, TorchAttention):
        return "the attention backend is not the torch one"
    if model.config.attn_logit_softcapping is not None:
        return "attention logits are soft-capped"
    cache = kv_caches[0]
    dtype = model.model.norm.weight.dtype
    if cache.key_scale is not None:  # only the C layers read and write a quantized cache, and only int8
        if cache.key.dtype != torch.int8:
            return f"the KV cache holds {cache.key.dtype} codes (the C layers take int8)"
        if _native_layers(model, kv_caches, dtype) is None:
            return "the KV cache is quantized and the layers do not run as C calls"
        return None
    if cache.key.dtype != dtype:
        return f"the KV cache holds {cache.key.dtype}, the model computes in {dtype}"
    return None


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, each projection bound to its kernel."""

    input_norm: torch.Tensor
    qkv: Product
    head_norms: ops.HeadNorms | None
    o: Product
    post_norm: torch.Tensor
    gate_up: Product
    down: Product
    activation: str
    window: int | None
    key: torch.Tensor
    """The layer's key cache as [kv_heads, slots, head_dim] (a view)."""
    value: torch.Tensor


@dataclass(frozen=True)
class _Sequence:
    """Where one decoding sequence's new token goes and what it attends to."""

    slot: int
    context_len: int
    first_slot: int | None
    """Slot of position 0 when the sequence's blocks are consecutive (its keys are one slice), else None."""
    blocks: torch.Tensor | None
    """Its blocks as a tensor when they are not consecutive (gathered per layer), else None."""


def _product(layer: torch.nn.Module, dtype: torch.dtype) -> Product:
    if isinstance(layer, QuantizedLinear):
        fast = layer.cpu_matmul(dtype)
        if fast is not None:
            return fast
    elif isinstance(layer, Linear):
        return functools.partial(linear, weight=layer.weight, bias=layer.bias)
    return layer


def _native_layers(model: LlamaForCausalLM, kv_caches: Sequence[LayerKVCache],
                   dtype: torch.dtype) -> list[NativeLayer] | None:
    """Every layer as a decode_layer.c call when the native library is built and every projection takes the
    native integer kernel (weight-only int4 / int8 in groups of multiples of 32, as GGUF's Q4_0 / Q4_1 / Q8_0), on
    a float32, bfloat16 or int8 cache; else None (the torch-call step runs, on float caches only)."""
    if dtype not in (torch.float32, torch.bfloat16) or not native_qmatmul.available():
        return None
    config = model.config
    layers = []
    for index, (layer, cache) in enumerate(zip(model.model.layers, kv_caches)):
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(p, QuantizedLinear) for p in projections):
            return None
        packed = [p.native_weight(dtype, 1) for p in projections]
        if any(p is None for p in packed) or mlp.act not in NATIVE_ACTIVATIONS:
            return None
        q_norm = k_norm = None
        head_eps = config.rms_norm_eps
        if attn.qk_norm:
            if attn.q_norm.unit_offset:
                return None
            q_norm, k_norm, head_eps = attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps
        kv_heads, _, _, head_dim = cache.key.shape
        layers.append(NativeLayer(LayerSpec(
            *packed, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, q_norm, k_norm,
            config.rms_norm_eps, head_eps, model.model.rotary.inv_freq, config.num_heads, config.num_kv_heads,
            config.head_dim, config.attention_scale, mlp.act, config.layer_window(index),
            cache.key.view(kv_heads, -1, head_dim), cache.value.view(kv_heads, -1, head_dim),
            None if cache.key_scale is None else cache.key_scale.view(kv_heads, -1),
            None if cache.value_scale is None else cache.value_scale.view(kv_heads, -1))))
    return layers


class CpuDecoder:
    """Decode-only steps of a Llama-form model on the CPU (see the module doc). Build it only where
    :func:`unsupported_reason` gives None."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: Sequence[LayerKVCache], block_size: int) -> None:
        config = model.config
        inner = model.model
        self.dtype = inner.norm.weight.dtype
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm.weight
        self.inv_freq = inner.rotary.inv_freq
        self.eps = config.rms_norm_eps
        self.block_size = block_size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.attention_scale
        self.layers = []
        self.native_layers = _native_layers(model, kv_caches, self.dtype)
        """The layers as decode_layer.c's calls (every projection on the native integer kernel), else None."""
        self.native_step = NativeStep(config.hidden_size)
        for index, (layer, cache) in enumerate(zip(inner.layers, kv_caches)):
            attn, mlp = layer.self_attn, layer.mlp
            norms = None
            if attn.qk_norm:
                norms = ops.HeadNorms(attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, attn.q_norm.unit_offset)
            kv_heads, _, _, head_dim = cache.key.shape
            self.layers.append(_Layer(
                layer.input_layernorm.weight, _product(attn.qkv_proj, self.dtype), norms,
                _product(attn.o_proj, self.dtype), layer.post_attention_layernorm.weight,
                _product(mlp.gate_up_proj, self.dtype), _product(mlp.down_proj, self.dtype), mlp.act,
                config.layer_window(index), cache.key.view(kv_heads, -1, head_dim),
                cache.value.view(kv_heads, -1, head_dim)))

    def _sequence(self, position: int, block_table: Sequence[int]) -> _Sequence:
        bs = self.block_size
        context_len = position + 1
        blocks = block_table[: -(-context_len // bs)]
        slot = blocks[position // bs] * bs + position % bs
        if tuple(blocks) == tuple(range(blocks[0], blocks[0] + len(blocks))):
            return _Sequence(slot, context_len, blocks[0] * bs, None)
        return _Sequence(slot, context_len, None, torch.tensor(blocks, dtype=torch.long))

    def _keys(self, cache: torch.Tensor, seq: _Sequence, window: int | None) -> torch.Tensor:
        """The sequence's visible cached keys (or values) as [1, kv_heads, S, head_dim]."""
        start = 0 if window is None else max(0, seq.context_len - window)
        if seq.first_slot is not None:
            return cache[None, :, seq.first_slot + start: seq.first_slot + seq.context_len]
        bs = self.block_size
        picked = cache.view(cache.shape[0], -1, bs, cache.shape[2]).index_select(1, seq.blocks)
        return picked.view(1, cache.shape[0], -1, cache.shape[2])[:, :, start: seq.context_len]

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: Sequence[int],
                block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final hidden states [B, hidden] of one decode step: ``token_ids`` [B] at ``positions`` (the cache holds
        every earlier position of each sequence) with their block tables; writes the new keys and values."""
        if self.native_layers is not None:
            residual = self.embed(token_ids).float().contiguous()
            self.native_step.run(self.native_layers, residual, positions, block_tables, self.block_size)
            return F.rms_norm(residual, (residual.shape[-1],), self.final_norm.float(), self.eps).to(self.dtype)
        rows = len(positions)
        seqs = [self._sequence(p, t) for p, t in zip(positions, block_tables)]
        rope = ops.rotary_inputs(torch.tensor(positions, dtype=torch.long), self.inv_freq, self.dtype)
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        hidden = self.embed(token_ids)
        residual = None
        for layer in self.layers:
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, layer.input_norm, self.eps, False)
            else:
                x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, self.eps, False)
            q, k, v = ops.rotate_qkv(layer.qkv(x), heads, kv_heads, head_dim, rope, layer.head_norms)
            outs = []
            for row, seq in enumerate(seqs):
                layer.key[:, seq.slot] = k[row]
                layer.value[:, seq.slot] = v[row]
                outs.append(F.scaled_dot_product_attention(
                    q[row].view(1, heads, 1, head_dim), self._keys(layer.key, seq, layer.window),
                    self._keys(layer.value, seq, layer.window), scale=self.scale,
                    enable_gqa=heads != kv_heads).view(1, heads * head_dim))
            attended = outs[0] if rows == 1 else torch.cat(outs)
            x, residual = ops.add_rms_norm(layer.o(attended), residual, layer.post_norm, self.eps, False)
            hidden = layer.down(ops.act_and_mul(layer.gate_up(x), layer.activation))
        return ops.add_rms_norm(hidden, residual, self.final_norm, self.eps, False)[0]
