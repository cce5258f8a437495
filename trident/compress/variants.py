"""Measure variants of one model (the original and its quantized, pruned, ... folders) side by side: for each, its
parameters, size on disk, resident weight memory, perplexity on the same windows of the same text, and batch-1
prefill and decode speed on the device chosen, with the change against the first (the original).

Each variant is loaded alone (released before the next) into an engine built from :class:`VariantSettings`, with
a KV cache of just the blocks the measurements need (``num_blocks``: no budget from free memory, no prefix cache,
so repetitions of the latency run are not served from it). On that engine:

1. perplexity (:func:`trident.compress.eval.perplexity`) on the windows of the text as the variant's tokenizer
   encodes it; the windows' fingerprint must equal the first variant's, so every row scores the same tokens;
2. the bench harness's batch-1 latency run (:func:`trident.bench.trident_side.run_latency`) on the latency
   workload of ``trident bench latency`` (``prompt_len`` tokens of its text, ``output_len`` generated, EOS
   ignored), ``repeat`` times, medians reported;
3. the resident weight memory (``LLMEngine.memory_usage``), after the runs, so that the kernel layouts the layers
   build on first use are counted; on CUDA also ``torch.cuda.max_memory_allocated`` over the load and both runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from trident.cli_args import model_path
from trident.compress.eval import PerplexityConfig, perplexity, plan_windows
from trident.errors import TridentError

KV_HEADROOM_BLOCKS = 4
"""KV blocks beyond the larger of the perplexity batch's and the latency run's needs."""
WARM_UP_TOKENS = 32 + 4
"""Tokens of the bench harness's warm-up request (trident/bench/trident_side.warm_up: 32 prompt, 4 generated)."""


@dataclass(frozen=True)
class VariantSettings:
    """How every variant is measured (the same for all rows)."""

    perplexity: PerplexityConfig = PerplexityConfig(max_tokens=4096)
    """Which windows of the text are scored (the first 4,096 tokens in windows of 512 by default)."""
    prompt_len: int = 128
    """Prompt tokens of the batch-1 latency run (the bench latency workload's text, cut to this length)."""
    output_len: int = 32
    """Tokens generated in the latency run (EOS ignored); decode tok/s counts all but the first."""
    repeat: int = 3
    """Latency runs per variant; the row holds their medians."""
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "auto"
    """Compute dtype (auto: bfloat16 on CUDA and on CPUs with native bf16 matmuls, else float32)."""
    threads: int | None = None
    """CPU threads (None: all cores)."""
    gguf_weights: str = "auto"
    """A GGUF original's Q4_0/Q4_1/Q8_0 weights: native, dequantize, or auto (as the engine decides)."""
    kv_cache_dtype: str = "auto"
    """How the KV cache stores keys and values (auto: the compute dtype)."""
    block_size: int = 16
    """Tokens per KV block."""

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len", "repeat"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TridentError(f"invalid report settings: {name} must be an integer >= 1, got {value!r}")
        if self.output_len < 2:
            raise TridentError("invalid report settings: output_len must be at least 2 (decode tok/s counts the "
                               "tokens after the first)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise TridentError(f"invalid report settings: device must be cpu or cuda, got {self.device!r}")

    def num_blocks(self) -> int:
        """KV blocks for the larger of one perplexity batch and the latency run (its warm-up runs before it)."""
        window, batch = self.perplexity.window, self.perplexity.batch_windows
        return max(batch * -(-window // self.block_size), -(-(self.prompt_len + self.output_len) // self.block_size),
                   -(-WARM_UP_TOKENS // self.block_size)) + KV_HEADROOM_BLOCKS

    def engine_config(self, model: str | None):
        """The EngineConfig every variant is loaded with (``model`` None: the embedded default model)."""
        from trident.engine.llm import engine_config

        return engine_config(model, device=self.device, dtype=self.dtype, num_threads=self.threads,
                             gguf_weights=self.gguf_weights, kv_cache_dtype=self.kv_cache_dtype,
                             block_size=self.block_size, num_blocks=self.num_blocks(),
                             enable_prefix_caching=False)


@dataclass(frozen=True)
class VariantRow:
    """One variant's measurements."""

    name: str
    """The model as given (a path, or ``default``)."""
    format: str
    """The weights' file format: gguf or safetensors."""
    weights: str
    """How the weights are stored: the quantization (int8 / int4, groups, symmetry, mixed) or float."""
    dtype: str
    """The compute dtype the engine ran."""
    params: int
    """Parameters, each quantized weight counted as its N x K weights (trident.quant.linear.num_weights)."""
    disk_bytes: int
    """Bytes of the weight files (the .gguf file, or the folder's .safetensors files; config and tokenizer not
    counted)."""
    resident_bytes: int
    """``LLMEngine.memory_usage().weights_bytes`` after the runs: every storage the model holds once (tied embeddings
    once), parameters, buffers (quantized codes, scales, zero points, rotary tables) and the kernel layouts the
    layers build on first use (QuantizedLinear.derived_tensors). The KV cache is not counted."""
    cuda_peak_bytes: int | None
    """On CUDA, torch.cuda.max_memory_allocated over loading, the perplexity batches and the latency runs (weights,
    KV cache, activations); None on the CPU."""
    perplexity: float
    nll: float
    """Mean negative log-likelihood of the scored tokens, nats."""
    ppl_seconds: float
    """Wall time of the perplexity forwards."""
    prefill_tok_s: float
    """Median over the latency runs: prompt tokens over the time to the first token."""
    decode_tok_s: float
    """Median over the latency runs: generated tokens after the first over the time they took."""
    ttft_ms: float
    load_s: float
    """Seconds to load the weights and build the engine."""
    latency_runs: tuple[dict, ...]
    """Each latency run's figures (trident/bench/trident_side.run_latency)."""

    def as_dict(self) -> dict:
        return {**asdict(self), "latency_runs": [dict(r) for r in self.latency_runs]}


@dataclass(frozen=True)
class VariantChange:
    """A variant against the original (the first row): ratios are variant / original."""

    perplexity_change: float
    """``ppl / ppl_original - 1`` (0.01 is +1%)."""
    size_ratio: float
    """Bytes on disk over the original's."""
    memory_ratio: float
    """Resident weight bytes over the original's."""
    prefill_speedup: float
    decode_speedup: float

    @classmethod
    def of(cls, row: VariantRow, original: VariantRow) -> VariantChange:
        return cls(perplexity_change=row.perplexity / original.perplexity - 1,
                   size_ratio=row.disk_bytes / original.disk_bytes,
                   memory_ratio=row.resident_bytes / original.resident_bytes,
                   prefill_speedup=row.prefill_tok_s / original.prefill_tok_s,
                   decode_speedup=row.decode_tok_s / original.decode_tok_s)


@dataclass(frozen=True)
class VariantReport:
    """Every variant's row on the same windows, and the windows' description (recorded once)."""

    rows: tuple[VariantRow, ...]
    fingerprint: str
    """The perplexity windows' fingerprint (trident/compress/eval.py), equal for every row."""
    num_windows: int
    num_scored_tokens: int
    settings: VariantSettings

    def changes(self) -> tuple[VariantChange | None, ...]:
        """Each row's change against the first (None for the first)."""
        return (None,) + tuple(VariantChange.of(row, self.rows[0]) for row in self.rows[1:])

    def as_dict(self) -> dict:
        return {"settings": asdict(self.settings), "fingerprint": self.fingerprint, "num_windows": self.num_windows,
                "num_scored_tokens": self.num_scored_tokens,
                "rows": [{**row.as_dict(), "vs_original": None if change is None else asdict(change)}
                         for row, change in zip(self.rows, self.changes())]}


def measure_variants(models: Sequence[str], text: str, settings: VariantSettings,
                     log: Callable[[str], None] = lambda _: None) -> VariantReport:
    """Load and measure each model in turn (``default``: the embedded model) on the windows of ``text``; the
    first is the original the others are compared with."""
    if not models:
        raise TridentError("no models to measure")
    rows: list[VariantRow] = []
    first = None  # the original's window plan
    for model in models:
        log(f"{model}: loading")
        engine, checkpoint, load_s = load_variant(model, settings)
        try:
            row, plan = measure_engine(engine, checkpoint, model, text, settings, load_s,
                                       expected_fingerprint=None if first is None else first.fingerprint,
                                       log=log)
        finally:
            del engine, checkpoint
            release_memory(settings.device)
        first = first or plan
        rows.append(row)
    return VariantReport(rows=tuple(rows), fingerprint=first.fingerprint, num_windows=len(first.windows),
                         num_scored_tokens=first.num_scored_tokens, settings=settings)


def load_variant(model: str, settings: VariantSettings):
    """(engine, checkpoint, seconds): the model loaded as every variant is (``default``: the embedded model). On
    CUDA the peak-memory counter is reset first."""
    import torch

    from trident.engine.engine import LLMEngine
    from trident.engine.sizing import gguf_native
    from trident.loader import load_checkpoint

    config = settings.engine_config(model_path(model))
    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TridentError("the report asks for cuda, but torch sees no CUDA device here; use cpu")
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(config.model or None, gguf_native(config, device))
    engine = LLMEngine(config, checkpoint)
    return engine, checkpoint, time.perf_counter() - t0


def measure_engine(engine, checkpoint, name: str, text: str, settings: VariantSettings, load_s: float, *,
                   expected_fingerprint: str | None = None, log: Callable[[str], None] = lambda _: None):
    """(row, window plan) of one loaded variant; refuses windows whose fingerprint differs from
    ``expected_fingerprint`` (the original's)."""
    import torch

    from trident.bench.report import median
    from trident.bench.trident_side import run_latency
    from trident.bench.workloads import latency_workload
    from trident.compress.texts import encode_first
    from trident.quant.linear import num_weights

    if engine.tokenizer is None:
        raise TridentError(f"{name} has no tokenizer; the report needs one to tokenize the text")
    token_ids = encode_first(engine.tokenizer, text, settings.perplexity.max_tokens)
    plan = plan_windows(token_ids, settings.perplexity)
    if expected_fingerprint is not None and plan.fingerprint != expected_fingerprint:
        raise TridentError(f"{name} tokenizes the text differently from the original (window fingerprint "
                           f"{plan.fingerprint} vs {expected_fingerprint}): perplexities over different tokens are "
                           "not comparable; compare variants of one model")
    ppl = perplexity(engine, token_ids, settings.perplexity, progress=True, description=f"{name}: perplexity")
    log(f"{name}: perplexity {ppl.perplexity:.4f} over {ppl.num_scored_tokens:,} tokens ({ppl.seconds:.1f} s)")
    workload = latency_workload(engine.tokenizer, settings.prompt_len, settings.output_len,
                                engine.model_config.vocab_size)
    runs = []
    for i in range(settings.repeat):
        log(f"{name}: latency run {i + 1}/{settings.repeat} (batch 1, {settings.prompt_len} prompt tokens, "
            f"{settings.output_len} generated)")
        runs.append(run_latency(engine, workload))
    speed = median(runs)
    cuda_peak = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
    row = VariantRow(
        name=name, format=checkpoint.format, weights=weights_description(engine.model),
        dtype=str(engine.dtype).removeprefix("torch."), params=num_weights(engine.model),
        disk_bytes=checkpoint.file_bytes, resident_bytes=engine.memory_usage().weights_bytes,
        cuda_peak_bytes=cuda_peak, perplexity=ppl.perplexity, nll=ppl.nll, ppl_seconds=ppl.seconds,
        prefill_tok_s=speed["prefill_tok_s"], decode_tok_s=speed["decode_tok_s"], ttft_ms=speed["ttft_ms"],
        load_s=load_s, latency_runs=tuple(runs))
    return row, plan


def weights_description(model) -> str:
    """How the model's Linear weights are stored: ``float``, or the quantized formats with their module counts
    (``int8 per channel sym x210``, or several such for mixed bits or a GGUF file's native types)."""
    from collections import Counter

    from trident.quant.linear import QuantizedLinear

    kinds = Counter()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            c = module.config
            groups = "per channel" if c.group_size is None else f"g{c.group_size}"
            kinds[f"int{c.bits} {groups} {'sym' if c.symmetric else 'asym'}"] += 1
    if not kinds:
        return "float"
    return ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common())


def release_memory(device: str) -> None:
    """Return what a released engine held (before loading the next variant)."""
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()

