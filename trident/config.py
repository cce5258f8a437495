"""Frozen, typed configuration. Each config is validated once, at construction.

ModelConfig describes a decoder-only transformer in the terms of its Hugging Face config.json;
``ModelConfig.from_hf_dict`` reads such a dict (old ``rope_theta``/``rope_scaling`` keys and new
``rope_parameters`` alike), filling what the file leaves out with the family's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trident.attention.cache_spec import KVCacheSpec
from trident.errors import TridentError
from trident.models.mla_config import MlaConfig, mla_config_from_hf, yarn_mscale
from trident.models.shared_layers import SharedLayers
from trident.moe.config import MoeConfig, moe_config_from_hf

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8")
"""CacheConfig.kv_cache_dtype choices (``trident.quant.kv`` says how each is stored)."""
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and optional scaling (default, linear, llama3, yarn)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    """yarn: rotations per original context above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """yarn: rotations per original context below which a frequency is divided by factor (interpolated)."""
    mscale: float | None = None
    mscale_all_dim: float | None = None
    """yarn: with mscale, the rotated parts are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    (``attention_factor``); DeepSeek also scales its softmax by mscale(factor, mscale_all_dim) ** 2."""
    truncate: bool = True
    """yarn: round the correction range outwards to whole dimensions."""

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            raise TridentError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: default, linear, llama3, yarn"
            )

    @property
    def attention_factor(self) -> float:
        """What yarn multiplies the rotated query and key parts by (1 for the other types)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor, 1.0)

    @classmethod
    def from_hf(cls, theta: float, scaling: dict[str, Any] | None) -> RopeConfig:
        scaling = dict(scaling or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
        return cls(
            theta=float(scaling.get("rope_theta", theta)),
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0) or 1.0),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
            mscale=_opt_float(scaling.get("mscale")),
            mscale_all_dim=_opt_float(scaling.get("mscale_all_dim")),
            truncate=bool(scaling.get("truncate", True)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (the union of what our families need)."""

    model_type: str
    """Hugging Face model_type: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe,
    deepseek_v2, deepseek_v3."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None
    """Rotary settings of sliding-window layers when they differ (gemma3)."""
    layer_types: tuple[str, ...] = ()
    """Per layer: full_attention or sliding_attention."""
    sliding_window: int | None = None
    """A token attends to itself and the sliding_window - 1 tokens before it on sliding layers."""
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    """Attention scale is query_pre_attn_scalar ** -0.5 when set, else head_dim ** -0.5."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source_dtype: str = "float32"
    architecture: str = ""
    moe: MoeConfig | None = None
    """Routed experts (mixture-of-experts families), else None; ``intermediate_size`` is then the size of the dense
    MLP of the layers without experts."""
    mla: MlaConfig | None = None
    """Multi-head latent attention (DeepSeek-V2 / V3), else None; ``head_dim`` is then the rope part of a head
    (qk_rope_head_dim, as transformers sets it) and the cache holds one latent per token (``kv_cache_spec``)."""
    shared_layers: SharedLayers | None = None
    """Layers that use another layer's weights (a ``trident share`` folder: trident/models/shared_layers.py), else
    None."""

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_layers)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise TridentError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise TridentError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if len(self.layer_types) != self.num_layers:
            raise TridentError(
                f"model config: {len(self.layer_types)} layer_types for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if bad:
            raise TridentError(f"model config: unsupported layer types {sorted(bad)}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise TridentError("model config: sliding_attention layers need a sliding_window")
        if self.rope.rope_type == "yarn" and self.mla is None:
            raise TridentError(f"yarn rope scaling is supported for DeepSeek-V2/V3 only so far, not {self.model_type}")

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """What each layer caches per token: a key and a value per kv head, or one latent (MLA)."""
        if self.mla is not None:
            return KVCacheSpec(num_kv_heads=1, key_dim=self.mla.latent_dim, has_value=False)
        return KVCacheSpec(num_kv_heads=self.num_kv_heads, key_dim=self.head_dim)

    def mha_equivalent_kv_bytes_per_token(self, element_size: int) -> int | None:
        """With multi-head latent attention: the bytes per token a plain multi-head cache of the same heads would
        take (per layer and head a key of qk_nope + qk_rope and a value of v_head_dim elements), to report beside
        the latent cache's; None for other models."""
        if self.mla is None:
            return None
        per_head = self.mla.qk_head_dim + self.mla.v_head_dim
        return self.num_layers * self.num_heads * per_head * element_size

    @property
    def attention_scale(self) -> float:
        if self.mla is not None:
            return self.mla.softmax_scale
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def layer_window(self, layer_index: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        if self.layer_types[layer_index] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    def num_parameters(self) -> int:
        """Parameter count implied by the shape (what the weights should hold)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.mla is not None:
            attn = self._mla_parameters()
        per_layer = attn + 2 * h  # two norms at least
        total = self.num_layers * per_layer + v * h + h
        moe = self.moe
        for layer in range(self.num_layers):
            if moe is None or not moe.is_sparse(layer):
                total += 3 * h * i
                continue
            router = moe.router
            total += router.num_experts * (h + 3 * h * moe.moe_intermediate_size)  # router rows + experts
            total += 3 * h * moe.shared_expert_intermediate_size + (h if moe.shared_expert_gate else 0)
            total += router.num_experts if router.score_correction_bias else 0
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def _mla_parameters(self) -> int:
        """Parameters of one multi-head latent attention layer (projections and their norms)."""
        m, h, heads = self.mla, self.hidden_size, self.num_heads
        assert m is not None
        q_out = heads * m.qk_head_dim
        q = h * q_out if m.q_lora_rank is None else h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * q_out
        kv = h * m.latent_dim + m.kv_lora_rank + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        bias = (m.latent_dim + (m.q_lora_rank or 0) + h) if self.attention_bias else 0
        return q + kv + heads * m.v_head_dim * h + bias

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict, with the family's defaults for absent keys."""
        from trident.models.registry import family_for

        if "text_config" in raw and raw.get("model_type") in ("gemma3",):
            text = dict(raw["text_config"])
            text.setdefault("model_type", "gemma3_text")
            raw = text
        model_type = raw.get("model_type")
        if not model_type:
            raise TridentError("model config has no model_type; is this a Hugging Face config.json?")
        family = family_for(model_type, raw.get("architectures"))
        d = {**family.hf_defaults, **raw}
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            num_layers = int(d["num_hidden_layers"])
            mla = mla_config_from_hf(model_type, d, d.get("rope_parameters") or d.get("rope_scaling"))
            head_dim = mla.qk_rope_head_dim if mla else int(d.get("head_dim") or hidden // num_heads)
            rope, rope_local = _read_rope(d)
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            layer_types = _read_layer_types(d, model_type, num_layers)
            window = d.get("sliding_window") if SLIDING_ATTENTION in layer_types else None
            return cls(
                model_type=model_type,
                architecture=(raw.get("architectures") or [family.architectures[0]])[0],
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
                rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
                hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", d.get("qkv_bias", False))),
                mlp_bias=bool(d.get("mlp_bias", False)),
                rope=rope,
                rope_local=rope_local,
                layer_types=layer_types,
                sliding_window=int(window) if window else None,
                attn_logit_softcapping=_opt_float(d.get("attn_logit_softcapping")),
                final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")),
                query_pre_attn_scalar=_opt_float(d.get("query_pre_attn_scalar")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                source_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
                moe=moe_config_from_hf(model_type, d, num_layers),
                mla=mla,
                shared_layers=SharedLayers.from_hf(raw, model_type, num_layers),
            )
        except KeyError as e:
            raise TridentError(f"model config for {model_type!r} lacks the key {e.args[0]!r}") from None


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _read_rope(d: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and FULL_ATTENTION in params:  # per layer type (gemma3, transformers 5)
        full = params[FULL_ATTENTION]
        local = params.get(SLIDING_ATTENTION)
        rope = RopeConfig.from_hf(full.get("rope_theta", 1_000_000.0), full)
        rope_local = RopeConfig.from_hf(local.get("rope_theta", 10_000.0), local) if local else None
        return rope, rope_local
    if isinstance(params, dict):
        return RopeConfig.from_hf(params.get("rope_theta", d.get("rope_theta", 10000.0)), params), None
    rope = RopeConfig.from_hf(d.get("rope_theta") or 10000.0, d.get("rope_scaling"))
    local_theta = d.get("rope_local_base_freq")
    return rope, (RopeConfig(theta=float(local_theta)) if local_theta else None)


def _read_layer_types(d: dict[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    if model_type == "gemma2":
        return tuple(SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION for i in range(num_layers))
    if model_type == "gemma3_text":
        pattern = int(d.get("sliding_window_pattern", 6))
        return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers))
    if model_type in ("mistral", "mixtral") and d.get("sliding_window"):
        return (SLIDING_ATTENTION,) * num_layers
    if model_type == "qwen3_moe" and d.get("use_sliding_window") and d.get("sliding_window"):
        return (SLIDING_ATTENTION,) * num_layers
    if model_type == "qwen2_moe" and d.get("use_sliding_window") and d.get("sliding_window"):
        max_window_layers = int(d.get("max_window_layers", num_layers))
        return tuple(SLIDING_ATTENTION if (i + 1) % 2 and i < max_window_layers else FULL_ATTENTION
                     for i in range(num_layers))
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window") and d.get("sliding_window"):
        max_window_layers = int(d.get("max_window_layers", num_layers))
        return tuple(SLIDING_ATTENTION if i >= max_window_layers else FULL_ATTENTION for i in range(num_layers))
    return (FULL_ATTENTION,) * num_layers


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks to allocate; None sizes the cache from memory_budget_bytes."""
    memory_budget_bytes: int | None = None
    """Bytes for the KV cache when num_blocks is None. None: 1 GiB on the CPU; on CUDA what is left of
    ``gpu_memory_utilization`` of the device's memory after the weights and an activation reserve."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory this engine may fill (weights, KV cache, activations), when
    memory_budget_bytes is None."""
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    """How keys and values are stored: auto (the compute dtype), float32, bfloat16, float16, or quantized: int8
    / fp8 (e4m3) codes with one float32 scale per token and kv head, about half a 16-bit cache's bytes
    (``trident.quant.kv``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise TridentError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise TridentError(f"num_blocks must be positive, got {self.num_blocks!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise TridentError(f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}; use one of "
                               f"{', '.join(KV_CACHE_DTYPES)} (int8 / fp8: a quantized cache, half the bytes)")
        if self.memory_budget_bytes is not None and (isinstance(self.memory_budget_bytes, bool) or not isinstance(
                self.memory_budget_bytes, int) or self.memory_budget_bytes <= 0):
            raise TridentError(f"memory_budget_bytes must be a positive integer or None, got "
                               f"{self.memory_budget_bytes!r}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise TridentError(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: how much work one engine step may take."""

    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (decode tokens plus prefill chunk tokens); None: the device's default
    (:func:`trident.engine.sizing.default_batched_tokens`: 512 on the CPU, 8192 on CUDA)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so running decodes are not stalled."""

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or (self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0):
            raise TridentError("max_num_seqs and max_num_batched_tokens must be positive")


GGUF_WEIGHTS = ("auto", "native", "dequantize")
"""Values of EngineConfig.gguf_weights."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs besides the model files."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    """auto = bfloat16 on CUDA and on CPUs with native bf16 matmuls (AMX / AVX512-BF16), else float32."""
    max_model_len: int | None = None
    """Context length; None = the model's max_position_embeddings (capped at 8192 on the CPU)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None
    """torch CPU threads; None = all cores."""
    seed: int = 0
    """Seed of the generator for sampled requests that give no seed of their own."""
    attention_backend: str = "auto"
    """auto (triton on CUDA when it imports, else torch), torch (the reference) or triton (CUDA only)."""
    experts_backend: str = "auto"
    """How an MoE model runs its routed experts: auto (triton for a bfloat16 / float16 model on CUDA when Triton
    imports, else torch), torch (the reference; reads expert counts on the host, so no CUDA graphs) or triton (the
    fused kernels; CUDA, 16-bit dtypes). Dense models ignore it."""
    enforce_eager: bool = False
    """Run every step through the general eager forward: never capture CUDA graphs (they replay decode-only steps on
    CUDA with a backend that supports them), and never take the CPU's lean decode step
    (trident/engine/cpu_decode.py)."""
    cuda_graph_max_batch_size: int | None = None
    """Largest decode batch replayed from a CUDA graph; None: max_num_seqs, at most 512."""
    gguf_weights: str = "auto"
    """How a GGUF file's Q4_0 / Q4_1 / Q8_0 projection weights are held: native (as their int4 / int8 codes, run by
    the quantized kernels, at the file's size in memory), dequantize (converted to the compute dtype like any float
    model), or auto: native on the CPU when the compute dtype is 16-bit (the kernels take bfloat16 / float16
    activations), else dequantize (on CUDA the int4 kernel is still slower than bfloat16 weights)."""
    async_scheduling: bool | None = None
    """Plan and launch step k+1 while the device still runs step k (its sampled tokens feed step k+1 on the
    device). None: on for CUDA, off on the CPU (where the host and the model share the cores). Steps of
    requests with repetition/frequency/presence penalties always run synchronously (they need the history)."""
    sparse_kernel: bool = False
    """For a folder marked 2:4 (``trident prune --structure 2:4``) on CUDA in bfloat16 / float16: run its decoder
    projections as semi-structured sparse matmuls (trident/quant/sparse24.py; layers torch refuses stay dense, with a
    log line). Off: the masked weights run as dense matmuls, as everywhere on the CPU."""

    def __post_init__(self) -> None:
        from trident.attention.registry import check_backend_name
        from trident.moe.registry import check_experts_backend_name

        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise TridentError(f"unsupported device {self.device!r}; use cpu, cuda or cuda:N")
        check_backend_name(self.attention_backend, self.device.split(":")[0])
        check_experts_backend_name(self.experts_backend, self.device.split(":")[0])
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TridentError(f"unsupported dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        if self.gguf_weights not in GGUF_WEIGHTS:
            raise TridentError(f"unsupported gguf_weights {self.gguf_weights!r}; use {', '.join(GGUF_WEIGHTS)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise TridentError(f"max_model_len must be positive, got {self.max_model_len!r}")
        if self.cuda_graph_max_batch_size is not None and self.cuda_graph_max_batch_size <= 0:
            raise TridentError(f"cuda_graph_max_batch_size must be positive, got {self.cuda_graph_max_batch_size!r}")
