"""What ``trident info MODEL`` shows: shape, stored types, file size and memory needs of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from rich.table import Table

from trident.config import SLIDING_ATTENTION
from trident.loader.checkpoint import Checkpoint

_ELEMENT_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def stored_nbytes(type_name: str, numel: int) -> int:
    """Bytes ``numel`` values take when stored as ``type_name`` (a ggml or safetensors type name)."""
    if type_name in _ELEMENT_BYTES:
        return numel * _ELEMENT_BYTES[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return numel // block * block_bytes


@dataclass(frozen=True)
class ModelInfo:
    """The facts ``trident info`` reports about one checkpoint."""

    architecture: str
    model_type: str
    format: str
    path: str
    parameters: int
    """Stored parameters (a tied lm_head counted once)."""
    stored_types: dict[str, tuple[int, int]]
    """type name -> (tensor count, bytes), largest first."""
    context_length: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int | None
    file_bytes: int
    weights_float32_bytes: int
    weights_bfloat16_bytes: int
    kv_bytes_per_token_float32: int
    kv_bytes_per_token_bfloat16: int
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * element bytes; with multi-head
    latent attention the latent alone: layers * (kv_lora_rank + qk_rope_head_dim) * element bytes."""
    kv_bytes_per_token_8bit: int
    """The same in an int8 / fp8 cache (``--kv-cache-dtype``): one byte per element plus a float32 scale per
    kv head: 2 * layers * kv_heads * (head_dim + 4)."""
    kv_bytes_full_context_bfloat16: int
    """One sequence at the full context; sliding-window layers keep only their window."""
    has_tokenizer: bool
    has_chat_template: bool
    quantization: str | None = None
    """How the weights are quantized (a ``trident quantize`` folder), or None."""
    kv_bytes_per_token_mha_bfloat16: int | None = None
    """With multi-head latent attention: what a plain multi-head cache of the same heads would take per token in
    bfloat16 (``ModelConfig.mha_equivalent_kv_bytes_per_token``); None otherwise."""
    experts: str | None = None
    """For a mixture-of-experts model: routed experts, top-k, scoring, expert and shared-expert sizes and the sparse
    layers; None for a dense model."""
    shared_layers: str | None = None
    """For a ``trident share`` folder: which layers use which layer's weights, and which modules; None otherwise."""
    sparsity: str | None = None
    """For a ``trident prune --structure`` folder: the mask's pattern, share of zeros and score; None otherwise."""


def model_info(checkpoint: Checkpoint) -> ModelInfo:
    """Compute the info of a loaded checkpoint."""
    c = checkpoint.config
    types: dict[str, list[int]] = {}
    for name, t in checkpoint.tensors.items():
        type_name = checkpoint.tensor_types.get(name, "F32")
        entry = types.setdefault(type_name, [0, 0])
        entry[0] += 1
        entry[1] += stored_nbytes(type_name, t.numel())
    params = checkpoint.num_parameters()
    spec = c.kv_cache_spec
    per_token_elems = spec.elements_per_token(c.num_layers)
    ctx = c.max_position_embeddings
    full_tokens = sum(min(ctx, c.sliding_window or ctx) if kind == SLIDING_ATTENTION else ctx for kind in c.layer_types)
    tokenizer = checkpoint.tokenizer
    return ModelInfo(
        architecture=c.architecture,
        model_type=c.model_type,
        format=checkpoint.format,
        path=checkpoint.path,
        parameters=params,
        stored_types={k: (v[0], v[1]) for k, v in sorted(types.items(), key=lambda kv: -kv[1][1])},
        context_length=ctx,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        vocab_size=c.vocab_size,
        sliding_window=c.sliding_window,
        file_bytes=checkpoint.file_bytes,
        weights_float32_bytes=4 * params,
        weights_bfloat16_bytes=2 * params,
        kv_bytes_per_token_float32=4 * per_token_elems,
        kv_bytes_per_token_bfloat16=2 * per_token_elems,
        kv_bytes_per_token_8bit=spec.tensors_per_layer * c.num_layers * spec.num_kv_heads * (spec.key_dim + 4),
        kv_bytes_full_context_bfloat16=spec.tensors_per_layer * spec.num_kv_heads * spec.key_dim * 2 * full_tokens,
        has_tokenizer=tokenizer is not None,
        has_chat_template=bool(tokenizer is not None and tokenizer.chat_template),
        quantization=_describe(checkpoint),
        kv_bytes_per_token_mha_bfloat16=c.mha_equivalent_kv_bytes_per_token(2),
        experts=_describe_experts(c),
        shared_layers=_describe_sharing(c),
        sparsity=_describe_sparsity(checkpoint.hf_config),
    )


def _describe_sharing(config) -> str | None:
    sharing = config.shared_layers
    if sharing is None:
        return None
    pairs = ", ".join(f"{target} -> {source}" for target, source in sharing.sources)
    return f"{len(sharing.sources)} layers use another layer's weights ({pairs}); shared: {', '.join(sharing.modules)}"


def _describe_sparsity(hf_config) -> str | None:
    from trident.compress.sparsity import read_sparsity

    marked = read_sparsity(hf_config)
    if marked is None:
        return None
    text = f"{marked.pattern} masks ({marked.method}): {marked.sparsity:.0%} of the decoder projections' weights zero"
    return text + " (--sparse-kernel runs them sparse on CUDA)" if marked.pattern == "2:4" else text


def _describe_experts(config) -> str | None:
    moe = config.moe
    if moe is None:
        return None
    r = moe.router
    shared = f", shared expert {moe.shared_expert_intermediate_size}" if moe.shared_expert_intermediate_size else ""
    return (f"{r.num_experts} routed, top-{r.top_k} ({r.scoring}), expert intermediate {moe.moe_intermediate_size}"
            f"{shared}; on {len(moe.sparse_layers)} of {config.num_layers} layers")


def _describe(checkpoint: Checkpoint) -> str | None:
    quantization = checkpoint.quantization
    if quantization is None:
        return None
    if quantization.quant_method == "trident-w8a8":
        alpha = quantization.smooth_alpha
        how = "no migration" if alpha is None else f"SmoothQuant migration, alpha {alpha:g}"
        return (f"W8A8: int8 per-channel weights x int8 per-token activations ({how}), "
                f"{len(quantization.modules)} layers")
    if not quantization.module_configs:
        return (f"{_describe_config(quantization.config, quantization.method)}, {len(quantization.modules)} layers"
                f"{_describe_experts_format(quantization)}")
    counts: dict = {}
    for name in quantization.modules:
        config = quantization.config_of(name)
        counts[config] = counts.get(config, 0) + 1
    kinds = "; ".join(f"{count} layers {_describe_config(config, quantization.method)}"
                      for config, count in sorted(counts.items(), key=lambda kv: kv[0].bits))
    return (f"mixed bits: {kinds}; {checkpoint.quantized_average_bits():.3f} bits per weight"
            f"{_describe_experts_format(quantization)}")


def _describe_experts_format(quantization) -> str:
    """``; routed experts int4 in groups of 128 (2 layers)`` when the quantized experts' format differs from the
    layers' default config (bits or groups), else empty."""
    if not quantization.experts:
        return ""
    bits, group_size = quantization.experts_format()
    if (bits, group_size) == (quantization.config.bits, quantization.config.group_size):
        return ""
    groups = f"in groups of {group_size}" if group_size else "per channel"
    return f"; routed experts int{bits} {groups}, symmetric ({len(quantization.experts)} layers)"


def _describe_config(q, method: str = "rtn") -> str:
    groups = f"groups of {q.group_size}" if q.group_size else "per channel"
    kind = "symmetric" if q.symmetric else "asymmetric"
    return f"int{q.bits} {'GPTQ' if method == 'gptq' else 'round-to-nearest'}, {groups}, {kind}"


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def info_rows(info: ModelInfo) -> list[tuple[str, str]]:
    """(label, value) rows, in display order."""
    stored = ", ".join(f"{t} x{count} ({human_bytes(nbytes)})" for t, (count, nbytes) in info.stored_types.items())
    window = f" (sliding window {info.sliding_window})" if info.sliding_window else ""
    return [
        ("model", f"{info.architecture} ({info.model_type}), {info.format}"),
        ("path", info.path),
        ("parameters", f"{info.parameters:,} ({info.parameters / 1e6:.1f} M)"),
        *([("quantization", info.quantization)] if info.quantization else []),
        ("stored types", stored),
        ("context length", f"{info.context_length:,}{window}"),
        (
            "layers / hidden / intermediate",
            f"{info.num_layers} / {info.hidden_size} / {info.intermediate_size}",
        ),
        *([("experts", info.experts)] if info.experts else []),
        *([("shared layers", info.shared_layers)] if info.shared_layers else []),
        *([("sparsity", info.sparsity)] if info.sparsity else []),
        ("heads / kv heads / head dim", f"{info.num_heads} / {info.num_kv_heads} / {info.head_dim}"),
        ("vocabulary", f"{info.vocab_size:,}"),
        ("file size", human_bytes(info.file_bytes)),
        (
            "weights in float32 / bfloat16",
            f"{human_bytes(info.weights_float32_bytes)} / {human_bytes(info.weights_bfloat16_bytes)}",
        ),
        (
            "KV cache per token (float32 / bfloat16 / int8 or fp8)",
            f"{human_bytes(info.kv_bytes_per_token_float32)} / {human_bytes(info.kv_bytes_per_token_bfloat16)} / "
            f"{human_bytes(info.kv_bytes_per_token_8bit)}",
        ),
        *([("KV cache per token of plain multi-head attention (bfloat16)",
            f"{human_bytes(info.kv_bytes_per_token_mha_bfloat16)} (latent cache: "
            f"{info.kv_bytes_per_token_mha_bfloat16 / info.kv_bytes_per_token_bfloat16:.1f}x smaller)")]
          if info.kv_bytes_per_token_mha_bfloat16 else []),
        ("KV cache at full context (bfloat16)", human_bytes(info.kv_bytes_full_context_bfloat16)),
        (
            "tokenizer",
            ("yes, with chat template" if info.has_chat_template else "yes, no chat template")
            if info.has_tokenizer
            else "none",
        ),
    ]


def describe(checkpoint: Checkpoint) -> Table:
    """A rich Table describing a checkpoint, for ``trident info MODEL``."""
    info = model_info(checkpoint)
    table = Table(title=f"trident info: {info.architecture}", show_header=False)
    table.add_column("property", style="bold")
    table.add_column("value")
    for label, value in info_rows(info):
        table.add_row(label, value)
    return table
