"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and DeepSeek's mixture of experts.

The decoder is mixtral.py's MoE decoder (pre-norm, residual stream beside the sublayer output) with:

- attention :class:`MlaAttention` (trident/models/mla_config.py describes the projections): queries from ``q_proj``
  or the ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` bottleneck; ``kv_a_proj_with_mqa`` gives the latent c
  (normalised by ``kv_a_layernorm``) and one rope key shared by the heads. Rotary position applies to the rope parts
  only; DeepSeek's checkpoints pair the rope dimensions interleaved (x0, x1), (x2, x3), ... (V2 always, V3 with
  ``rope_interleave``), which is the half-split rotation after moving the even dimensions before the odd ones; a
  permutation applied to the queries and keys alike leaves their dot products, hence attention, unchanged. Each
  token caches c and the rotated rope key only (``ModelConfig.kv_cache_spec``: one vector per token and layer);
  attention up-projects them with ``kv_b_proj``, or for decode steps folds it into the queries and values (the
  absorbed form; trident/attention/mla_torch.py).
- the first ``first_k_dense_replace`` layers keep a dense gated MLP; the others hold a SparseMoeBlock with
  ``n_shared_experts`` shared experts (checkpoint ``shared_experts``, one MLP of n * moe_intermediate_size rows) and
  the router of trident/moe/config.py: V2 softmax, greedy or group-limited (groups ranked by their best expert),
  times routed_scaling_factor; V3 sigmoid scores plus the e_score_correction_bias for the choice, groups ranked by
  their two best, renormalised, times routed_scaling_factor.

Only the torch attention backend runs MLA (the Triton kernels do not take it yet); the engine picks it for these
models. No CUDA-graph capture. DeepSeek-V3's multi-token-prediction layers (checkpoint layers past
num_hidden_layers) are not used and are skipped at load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from trident.attention.base import AttentionBackend, AttentionMetadata, LayerKVCache
from trident.attention.mla_torch import MlaShape, mla_attention, write_latent
from trident.config import ModelConfig
from trident.errors import TridentError
from trident.models import ops
from trident.models.layers import Linear, RMSNorm
from trident.models.mixtral import MixtralForCausalLM
from trident.models.weights import LayerLoaded, PackedModules

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class MlaAttention(nn.Module):
    """Multi-head latent attention over the paged latent cache."""

    def __init__(self, config: ModelConfig, layer_index: int, backend: AttentionBackend) -> None:
        super().__init__()
        mla = config.mla
        if mla is None:
            raise ValueError("MlaAttention needs a config with multi-head latent attention (ModelConfig.mla)")
        if not getattr(backend, "supports_mla", False):
            raise TridentError(f"the {type(backend).__name__} attention backend does not run multi-head latent "
                               "attention (DeepSeek) yet; use --attention-backend torch (or auto)")
        hidden, heads = config.hidden_size, config.num_heads
        bias = config.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * mla.qk_head_dim)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(mla.q_lora_rank, heads * mla.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.o_proj = Linear(heads * mla.v_head_dim, hidden, bias=bias)
        self.mla = mla
        self.shape = MlaShape(num_heads=heads, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
                              qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim)
        self.scale = config.attention_scale
        self.rope_factor = config.rope.attention_factor
        """Yarn's scale of the rotated parts (1 without yarn)."""
        self.layer_index = layer_index

    def forward(self, hidden: torch.Tensor, rope: ops.RotaryInputs, kv_cache: LayerKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        mla, num_tokens, heads = self.mla, hidden.shape[0], self.shape.num_heads
        if mla.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_rope = q.view(num_tokens, heads, mla.qk_head_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(hidden).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        q_rope = ops.apply_rotary(self._half_split(q_rope), rope)
        k_rope = ops.apply_rotary(self._half_split(k_rope.unsqueeze(1)), rope)
        if self.rope_factor != 1.0:
            q_rope, k_rope = q_rope * self.rope_factor, k_rope * self.rope_factor
        write_latent(torch.cat((c, k_rope[:, 0]), dim=-1), kv_cache, meta)
        # decode steps in latent space when kv_b_proj is a plain weight (a quantized one is up-projected instead)
        absorb = self.kv_b_proj.weight if isinstance(self.kv_b_proj, Linear) else None
        out = mla_attention(q_nope, q_rope, kv_cache, meta, self.kv_b_proj, self.shape, self.scale, absorb)
        return self.o_proj(out.reshape(num_tokens, heads * mla.v_head_dim))

    def _half_split(self, x: torch.Tensor) -> torch.Tensor:
        """Rope parts [tokens, heads, qk_rope] in the half-split layout (contiguous): interleaved pairs moved to
        (evens, odds)."""
        if self.mla.rope_interleaved:
            return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return x.contiguous()


class DeepseekV2ForCausalLM(MixtralForCausalLM):
    """DeepSeek-V2 (and V3, the same modules with another router: see trident/moe/config.py)."""

    expert_part_names = ("gate_proj", "up_proj", "down_proj")
    renames = {".shared_experts.": ".shared_expert."}
    checkpoint_names = {".shared_expert.": ".shared_experts."}

    def attention(self, config: ModelConfig, layer_index: int, backend: AttentionBackend) -> nn.Module:
        return MlaAttention(config, layer_index, backend)

    @property
    def supports_cuda_graphs(self) -> bool:
        return False  # the latent attention runs the torch reference, which cannot be captured

    @property
    def packed_modules(self) -> PackedModules:
        moe, dense = self.config.moe, self.config.intermediate_size
        shared = moe.shared_expert_intermediate_size
        packing = {"gate_up_proj": (("gate_proj", dense), ("up_proj", dense))}
        if shared:  # before the dense MLP's entry, whose rows differ
            packing = {"shared_expert.gate_up_proj": (("shared_expert.gate_proj", shared),
                                                      ("shared_expert.up_proj", shared)), **packing}
        return packing

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                     device: torch.device, layer_loaded: LayerLoaded | None = None) -> None:
        layers = self.config.num_layers
        kept = {k: v for k, v in tensors.items()
                if (m := _LAYER_INDEX.match(k)) is None or int(m.group(1)) < layers}  # V3's MTP layers
        super().load_weights(kept, dtype=dtype, device=device, layer_loaded=layer_loaded)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3: V2's modules; its sigmoid router with the score-correction bias comes from the config."""
