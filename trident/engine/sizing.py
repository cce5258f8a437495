"""How big an engine will be, decided before anything is allocated: compute dtype, context length, KV-cache
blocks and weight bytes. ``LLMEngine`` sizes itself with these functions, so an estimate made from a
model's config (``estimate_memory``: the server's memory budget, ``trident advise --fit``) is what the
engine then allocates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trident.config import EngineConfig, ModelConfig
from trident.errors import TridentError
from trident.hardware import cpu_has_native_bf16
from trident.quant.kv import KVCacheFormat, kv_cache_format

if TYPE_CHECKING:
    from trident.quant.format import QuantizedModules

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_MAX_MODEL_LEN = 8192
"""Context cap on the CPU when none is asked for: longer prompts take minutes to prefill there."""
DEFAULT_CPU_KV_BYTES = 1 << 30
"""KV cache on the CPU when no budget is given (allocated lazily: untouched pages cost nothing)."""
CPU_BATCHED_TOKENS = 512
"""Default token budget of a CPU step: prefill chunks short enough that running decodes are not stalled for
long on a few cores."""
CUDA_BATCHED_TOKENS = 8192
"""Default token budget of a CUDA step: prefill in big chunks, since each chunk reads every weight (an MoE
model's experts included) once; measured on an H200 (session 7), TARGETS.md's 64-sequence Qwen3-30B-A3B workload
took 4.78 s with 8192 against 5.73 s with 512 (its prefill phase 0.60 s against 1.86 s)."""
ACTIVATION_RESERVE_BYTES = 2 << 30
"""GPU memory kept free for activations, CUDA graphs and the allocator's slack, beside the logits."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs with native bf16 matmuls (as vLLM's CPU backend does), else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


def gguf_native(config: EngineConfig, device: torch.device) -> bool:
    """Whether a GGUF model's Q4_0 / Q4_1 / Q8_0 weights stay quantized (EngineConfig.gguf_weights, auto
    resolved: native on the CPU with a 16-bit compute dtype (torch's packed kernels) or where trident's native
    integer kernel is built (it takes float32 activations too: CPUs without bfloat16 arithmetic); on CUDA
    dequantized for now: the default model decoded at 643 tok/s native against 1,270 in bfloat16 on an H200, the
    int4 kernel being bound by unpacking codes)."""
    if config.gguf_weights != "auto":
        return config.gguf_weights == "native"
    if device.type != "cpu":
        return False
    from trident.native import qmatmul

    return resolve_dtype(config.dtype, device) in (torch.bfloat16, torch.float16) or qmatmul.available()


def resolve_max_model_len(model_config: ModelConfig, config: EngineConfig, device: torch.device) -> int:
    """The context length the engine serves: the one asked for (at most the model's), else the model's
    (capped at ``CPU_DEFAULT_MAX_MODEL_LEN`` on the CPU)."""
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise TridentError(f"max_model_len {config.max_model_len} exceeds the model's context length {limit}")
        return config.max_model_len
    return min(limit, CPU_DEFAULT_MAX_MODEL_LEN) if device.type == "cpu" else limit


def kv_format_of(config: EngineConfig, dtype: torch.dtype) -> KVCacheFormat:
    """How the KV cache is stored for compute dtype ``dtype`` (config.cache.kv_cache_dtype, auto resolved)."""
    return kv_cache_format(config.cache.kv_cache_dtype, dtype)


def check_kv_format(kv_format: KVCacheFormat, device: torch.device) -> None:
    """Raise a TridentError when ``device`` cannot hold a cache of ``kv_format``: fp8 codes on CUDA need
    compute capability 8.9 or newer (Ada, Hopper) for the kernels' conversions."""
    if kv_format.name == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise TridentError(f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or newer, this one is "
                           f"{major}.{minor}; use --kv-cache-dtype int8")


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, kv_format: KVCacheFormat) -> int:
    """Keys and values of ``block_size`` tokens in every layer (with their scales when quantized), or their latents
    alone for multi-head latent attention: what the model's ``kv_cache_spec`` declares."""
    spec = model_config.kv_cache_spec
    per_token_head = kv_format.bytes_per_token_head(spec.key_dim)
    return spec.tensors_per_layer * model_config.num_layers * block_size * spec.num_kv_heads * per_token_head


def kv_budget_bytes(model_config: ModelConfig, config: EngineConfig, device: torch.device,
                    pending_bytes: int = 0) -> int:
    """Bytes the KV cache may take: ``memory_budget_bytes`` when given; else 1 GiB on the CPU, and on CUDA
    ``gpu_memory_utilization`` of the device's memory minus what is already in use on it (other
    processes, this engine's weights once loaded), minus ``pending_bytes`` (weights not loaded yet) and an
    activation reserve."""
    cache = config.cache
    if cache.memory_budget_bytes is not None:
        return cache.memory_budget_bytes
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, total, usable = cuda_usable_bytes(device, cache.gpu_memory_utilization)
    reserve = activation_reserve_bytes(model_config, config.scheduler.max_num_seqs)
    budget = usable - pending_bytes - reserve
    if budget <= 0:
        raise TridentError(f"no GPU memory is left for the KV cache: {free / 2**30:.1f} of {total / 2**30:.1f} "
                           f"GiB free, weights to load {pending_bytes / 2**30:.1f} GiB, reserve "
                           f"{reserve / 2**30:.1f} GiB; raise gpu_memory_utilization or use a smaller model")
    return budget


def cuda_usable_bytes(device: torch.device, gpu_memory_utilization: float) -> tuple[int, int, int]:
    """(free, total, usable) bytes of a CUDA device: usable is ``gpu_memory_utilization`` of the total less what is
    in use now (other processes, this one's context and tensors); negative when more is in use."""
    free, total = torch.cuda.mem_get_info(device)
    return free, total, int(total * gpu_memory_utilization) - (total - free)


def activation_reserve_bytes(model_config: ModelConfig, max_num_seqs: int) -> int:
    """GPU memory the engine leaves free beside its weights and KV cache: ACTIVATION_RESERVE_BYTES and 8 bytes of
    logits per vocabulary entry and sequence."""
    return ACTIVATION_RESERVE_BYTES + max_num_seqs * model_config.vocab_size * 8


def num_kv_blocks(model_config: ModelConfig, config: EngineConfig, max_model_len: int, kv_format: KVCacheFormat,
                  budget_bytes: int) -> int:
    """Blocks to allocate: ``num_blocks`` when given, else as many as ``budget_bytes`` hold, but no more
    than ``max_num_seqs`` full-length sequences need."""
    cache = config.cache
    if cache.num_blocks:
        return cache.num_blocks
    block_bytes = kv_bytes_per_block(model_config, cache.block_size, kv_format)
    useful = config.scheduler.max_num_seqs * -(-max_model_len // cache.block_size)
    return max(1, min(budget_bytes // block_bytes, useful))


def weights_bytes(model_config: ModelConfig, dtype: torch.dtype, quantization: QuantizedModules | None = None,
                  device: torch.device | None = None) -> int:
    """Bytes of the model's parameters in ``dtype``, counted on a meta-device build (nothing allocated; tied
    embeddings and shared layers' modules counted once, as the engine shares them). With ``quantization`` (a
    ``trident quantize`` checkpoint), the listed layers count their codes, scales and zero points instead of a
    ``dtype`` weight, and the quantized experts modules (``quantization.experts``) their codes and float32 scales (in
    ``quantization.experts_format()``). On
    the CPU (``device`` None or a CPU), weight-only layers also count the kernel layouts they build from their codes
    and keep (``QuantizedLinear.derived_bytes``: for the native kernel or torch's packed ones); on CUDA the affine
    offsets they keep for the Triton kernels (``cuda_offsets_bytes``)."""
    from trident.models.build import meta_model

    model = meta_model(model_config)
    element = torch.empty((), dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters()) * element
    if quantization is not None:
        from trident.quant.format import QUANT_METHOD, listed_has_bias, listed_shape
        from trident.quant.linear import cpu_derived_bytes, cuda_offsets_bytes
        from trident.quant.rtn import quantized_bytes

        weight_only = quantization.quant_method == QUANT_METHOD
        on_cpu = device is None or device.type == "cpu"
        for name in quantization.modules:
            out_features, in_features = listed_shape(model, name)
            config = quantization.config_of(name)
            total += quantized_bytes(out_features, in_features, config)
            total -= out_features * in_features * element
            if weight_only and on_cpu:
                total += cpu_derived_bytes(out_features, in_features, config, dtype, listed_has_bias(model, name))
            elif weight_only and device.type == "cuda":
                total += cuda_offsets_bytes(out_features, in_features, config)
        if quantization.experts:
            from trident.moe.quant import quantized_experts_bytes

            bits, group = quantization.experts_format()
        for name in quantization.experts:
            for matrix in (model.get_submodule(name).gate_up_proj, model.get_submodule(name).down_proj):
                total += quantized_experts_bytes(*matrix.shape, bits, group) - matrix.numel() * element
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """What an engine of this model and config allocates."""

    weights_bytes: int
    kv_cache_bytes: int
    num_blocks: int
    max_model_len: int
    dtype: torch.dtype
    kv_format: KVCacheFormat
    block_bytes: int
    """Bytes of one KV block over all layers (keys, values and their scales)."""

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


def estimate_memory(model_config: ModelConfig, config: EngineConfig,
                    quantization: QuantizedModules | None = None) -> MemoryEstimate:
    """Weights plus KV cache of an engine built from ``config`` for a model of ``model_config`` (whose
    checkpoint's ``quantization`` it is, if any)."""
    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    max_model_len = resolve_max_model_len(model_config, config, device)
    kv_format = kv_format_of(config, dtype)
    weights = weights_bytes(model_config, dtype, quantization, device)
    blocks = num_kv_blocks(model_config, config, max_model_len, kv_format,
                           kv_budget_bytes(model_config, config, device, pending_bytes=weights))
    block_bytes = kv_bytes_per_block(model_config, config.cache.block_size, kv_format)
    return MemoryEstimate(weights_bytes=weights, kv_cache_bytes=blocks * block_bytes, num_blocks=blocks,
                          max_model_len=max_model_len, dtype=dtype, kv_format=kv_format, block_bytes=block_bytes)


def cuda_graph_batch_sizes(config: EngineConfig, device: torch.device, supported: bool) -> tuple[int, ...]:
    """Decode batch sizes to capture as CUDA graphs (a step of B sequences replays the smallest one >= B):
    1, 2, 4, 8, then every 8 to 64, every 16 to 128, every 32 beyond. Empty off CUDA, with enforce_eager,
    or when the attention backend cannot be captured."""
    if device.type != "cuda" or config.enforce_eager or not supported:
        return ()
    largest = config.cuda_graph_max_batch_size or min(config.scheduler.max_num_seqs, 512)
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 129, 16), *range(160, 513, 32)]
    chosen = [b for b in sizes if b < largest]
    return (*chosen, largest)


def default_batched_tokens(config: EngineConfig, device: torch.device) -> EngineConfig:
    """``config`` with its step token budget resolved: as given, else CUDA_BATCHED_TOKENS on CUDA and
    CPU_BATCHED_TOKENS elsewhere."""
    if config.scheduler.max_num_batched_tokens is not None:
        return config
    tokens = CUDA_BATCHED_TOKENS if device.type == "cuda" else CPU_BATCHED_TOKENS
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                     max_num_batched_tokens=tokens))
