"""Does a model serve ``context`` tokens to ``concurrency`` sequences at once on this device? Answered from the
model's config before any weight is loaded: ``trident advise --fit`` and the server's check before it loads a model.

What serving adds to a process's resident memory, in four parts:

- weights: what the engine holds (engine/sizing.py ``weights_bytes``: the compute dtype, quantized codes and scales,
  int8 experts, the CPU kernels' layouts of quantized layers); exact (tests/integration/test_sizing.py);
- KV cache: ``concurrency`` sequences of ``context`` tokens in whole blocks of the cache format; exact;
- activations: on CUDA the reserve the engine keeps free beside its KV cache (``sizing.activation_reserve_bytes``);
  on the CPU one step's tensors at the step token budget T: hidden states, q/k/v, the MLP's gate, up and product,
  one layer's keys and values gathered from the cache for a prefill chunk with its T x context mask (torch's CPU
  attention kernel works in blocks: no scores matrix), and float32 logits, probabilities and a sorted copy of each
  sequence's sampled row;
- runtime: on the CPU a constant measured with the default model (the tokenizer's tables, torch's kernel caches, the
  allocator's slack, what loading leaves in the heap); on CUDA none, the CUDA context being outside the free memory
  the device reports.

tests/advise/test_memory_measured.py compares the estimate with the resident memory a process gains, on the CPU;
scripts/cuda_fit_check.py with the GPU memory an engine and a full batch take (session 15: 0.86-1.03 of the estimate
over six shape / weights / KV cases on an H200; the fixed 2 GiB reserve is what small models leave unused).
Loading briefly needs more than this: a GGUF file dequantized to float32 peaked 58% above its weights (session 14).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from trident.config import EngineConfig, ModelConfig
from trident.engine.sizing import (
    MemoryEstimate,
    activation_reserve_bytes,
    cuda_usable_bytes,
    default_batched_tokens,
    kv_bytes_per_block,
    kv_format_of,
    resolve_dtype,
    resolve_max_model_len,
    weights_bytes,
)
from trident.errors import TridentError
from trident.quant.format import QuantizedModules

CPU_RUNTIME_BYTES = 80 << 20
"""What a CPU serving process holds beside weights, KV cache and a step's tensors: measured with the default model
(session 14: 61-106 MiB over the other parts across five configurations, docs/benchmarks.md); about 40 MiB of
it varies from run to run (what the loading threads leave in the heap)."""
LOGITS_COPIES = 3
"""float32 [rows, vocab] tensors the sampler holds at once per sampled row: logits, probabilities, a sorted copy."""


@dataclass(frozen=True)
class DeviceMemory:
    """The memory of the device an engine would run on."""

    name: str
    """``cpu`` or ``cuda:N``."""
    description: str
    total_bytes: int
    free_bytes: int
    """What a new engine may take: on the CPU the memory the system reports available (free plus reclaimable
    caches); on CUDA ``gpu_memory_utilization`` of the total, less what is in use (other processes, this one's CUDA
    context and tensors)."""


def device_memory(device: torch.device, gpu_memory_utilization: float = 0.9) -> DeviceMemory:
    """The memory of ``device`` now."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TridentError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        _, total, usable = cuda_usable_bytes(torch.device("cuda", index), gpu_memory_utilization)
        return DeviceMemory(f"cuda:{index}", torch.cuda.get_device_name(index), total, max(0, usable))
    if device.type != "cpu":
        raise TridentError(f"memory estimates cover cpu and cuda devices, not {device.type}")
    total, available = _system_memory()
    return DeviceMemory("cpu", "system RAM", total, available)


def runtime_bytes(device: torch.device) -> int:
    """The runtime part of an estimate: CPU_RUNTIME_BYTES on the CPU; none on CUDA (the context is outside the free
    memory the device reports)."""
    return CPU_RUNTIME_BYTES if device.type == "cpu" else 0


def _system_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM: /proc/meminfo's MemTotal and MemAvailable on Linux, else sysconf's pages."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


@dataclass(frozen=True)
class Activations:
    """Bytes a step's tensors take: ``fixed`` plus ``per_sequence`` for each sequence batched."""

    fixed: int
    per_sequence: int

    def bytes(self, concurrency: int) -> int:
        return self.fixed + self.per_sequence * concurrency


def activations(model_config: ModelConfig, config: EngineConfig, context: int) -> Activations:
    """The activation part of the estimate for an engine of ``config`` serving ``context`` tokens (see the module
    doc)."""
    device = torch.device(config.device)
    if device.type == "cuda":
        return Activations(activation_reserve_bytes(model_config, 0), activation_reserve_bytes(model_config, 1)
                           - activation_reserve_bytes(model_config, 0))
    c = model_config
    element = torch.empty((), dtype=resolve_dtype(config.dtype, device)).element_size()
    tokens = default_batched_tokens(config, device).scheduler.max_num_batched_tokens
    if c.moe is not None:  # each token's top-k experts, plus a shared expert
        routed = c.moe.router.top_k * c.moe.moe_intermediate_size
        inter = max(c.intermediate_size, routed + (c.moe.shared_expert_intermediate_size or 0))
    else:
        inter = c.intermediate_size
    spec = c.kv_cache_spec
    widths = 4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * inter
    gathered = spec.tensors_per_layer * context * spec.num_kv_heads * spec.key_dim * element  # one layer's keys/values
    mask = min(tokens, context) * context
    return Activations(tokens * widths * element + gathered + mask, LOGITS_COPIES * 4 * c.vocab_size)


@dataclass(frozen=True)
class FitEstimate:
    """The memory an engine serving ``concurrency`` sequences of ``context`` tokens needs on ``device``."""

    context: int
    concurrency: int
    model_context: int
    """The longest context the model takes."""
    weights_bytes: int
    kv_block_bytes: int
    """One KV block over all layers (keys, values, their scales)."""
    block_size: int
    activations: Activations
    runtime_bytes: int
    dtype: str
    kv_cache_dtype: str
    device: DeviceMemory

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_block_bytes / self.block_size

    def kv_bytes_per_sequence(self, context: int | None = None) -> int:
        """Whole blocks for one sequence of ``context`` tokens (this estimate's by default)."""
        return -(-(context or self.context) // self.block_size) * self.kv_block_bytes

    @property
    def kv_bytes(self) -> int:
        return self.concurrency * self.kv_bytes_per_sequence()

    @property
    def activation_bytes(self) -> int:
        return self.activations.bytes(self.concurrency)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device.free_bytes

    def max_concurrency(self, context: int | None = None) -> int:
        """The most sequences of ``context`` tokens (this estimate's by default) that fit beside the weights."""
        room = self.device.free_bytes - self.weights_bytes - self.runtime_bytes - self.activations.fixed
        return max(0, room // (self.kv_bytes_per_sequence(context) + self.activations.per_sequence))

    def max_context(self) -> int:
        """The longest context (whole blocks, at most the model's) that ``concurrency`` sequences fit in."""
        room = (self.device.free_bytes - self.weights_bytes - self.runtime_bytes
                - self.activations.bytes(self.concurrency))
        blocks = max(0, room) // (self.concurrency * self.kv_block_bytes)
        return min(self.model_context, blocks * self.block_size)


def estimate_fit(model_config: ModelConfig, config: EngineConfig, quantization: QuantizedModules | None = None,
                 device: DeviceMemory | None = None) -> FitEstimate:
    """The estimate for an engine of ``config`` (context: its max_model_len, resolved; concurrency: its
    max_num_seqs) of a model of ``model_config`` with its checkpoint's ``quantization``, on ``device`` (the
    config's device now, by default)."""
    torch_device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, torch_device)
    context = resolve_max_model_len(model_config, config, torch_device)
    kv_format = kv_format_of(config, dtype)
    return FitEstimate(
        context=context, concurrency=config.scheduler.max_num_seqs,
        model_context=model_config.max_position_embeddings,
        weights_bytes=weights_bytes(model_config, dtype, quantization, torch_device),
        kv_block_bytes=kv_bytes_per_block(model_config, config.cache.block_size, kv_format),
        block_size=config.cache.block_size, activations=activations(model_config, config, context),
        runtime_bytes=runtime_bytes(torch_device),
        dtype=str(dtype).removeprefix("torch."), kv_cache_dtype=kv_format.name,
        device=device or device_memory(torch_device, config.cache.gpu_memory_utilization))


def serving_problem(model_config: ModelConfig, config: EngineConfig, engine: MemoryEstimate,
                    device: DeviceMemory | None = None) -> str | None:
    """Why an engine of ``config`` with the memory estimate ``engine`` (``sizing.estimate_memory``: its weights and
    KV cache as it will allocate them) cannot serve on its device, or None: its KV cache holds less than one sequence
    of its context length, or weights, KV cache, activations and runtime need more than the device has free (the
    parts of :func:`estimate_fit`, with the KV cache the engine sizes). The message says what would fit."""
    from trident.loader.info import human_bytes

    torch_device = torch.device(config.device)
    tokens = engine.num_blocks * config.cache.block_size
    per_sequence = -(-engine.max_model_len // config.cache.block_size) * engine.block_bytes
    if tokens < engine.max_model_len:
        return (f"the KV cache holds {tokens:,} tokens ({human_bytes(engine.kv_cache_bytes)}), less than one sequence "
                f"of the context length {engine.max_model_len:,}; lower --max-model-len to at most {tokens:,} or give "
                f"the cache {human_bytes(per_sequence)} (--kv-cache-memory)")
    device = device or device_memory(torch_device, config.cache.gpu_memory_utilization)
    overhead = (activations(model_config, config, engine.max_model_len).bytes(config.scheduler.max_num_seqs)
                + runtime_bytes(torch_device))
    needed = engine.weights_bytes + engine.kv_cache_bytes + overhead
    if needed <= device.free_bytes:
        return None
    room = device.free_bytes - engine.weights_bytes - overhead
    sequences = room // per_sequence
    hint = (f"a KV cache of at most {human_bytes(room)} (--kv-cache-memory) holds {sequences:,} "
            f"sequence{'s' if sequences > 1 else ''} of {engine.max_model_len:,} tokens" if sequences else
            "the weights leave no room for one sequence: quantize them (trident quantize), lower --max-model-len, "
            "or use a larger device")
    return (f"it needs {human_bytes(needed)} on {device.name} ({human_bytes(engine.weights_bytes)} weights, "
            f"{human_bytes(engine.kv_cache_bytes)} KV cache, {human_bytes(overhead)} activations and runtime) but "
            f"{human_bytes(device.free_bytes)} is free; {hint} "
            "(trident advise --fit shows the parts)")
