"""Measure one variant of a model for `trident advise`: its weights held as stored, in float or quantized to int8 /
int4 (round-to-nearest, in memory, as `trident quantize` would write them), with a KV cache dtype; on this machine,
with the bench harness, in short runs whose results are cached.

For each variant, on one engine that batches up to the largest of ``batches`` sequences:

1. perplexity on the first ``perplexity_tokens`` of a text's eval slice, in windows of ``window`` tokens
   (trident/compress/eval.py);
2. batch 1 (trident/bench/trident_side.run_latency): time to the first token of a ``prompt_len``-token prompt, then
   time per output token over ``output_len`` tokens;
3. for each batch cap B of ``batches`` (:func:`run_batch`): B prompts of ``prompt_len`` tokens arriving at once,
   ``output_len`` tokens each: output tokens a second over all of them, and the medians over the requests of the
   time to the first token and of the time per output token after it;
4. the weights as the engine holds them (LLMEngine.memory_usage, after the runs).

Results are cached in ``$TRIDENT_CACHE_DIR/advise/`` under a hash of the variant, the settings, the model file's
path, size and modification time, and trident's version: a second `trident advise` reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

from trident.cache import cache_dir
from trident.cli_args import model_path
from trident.errors import TridentError

WEIGHTS = ("stored", "float", "int8", "int4")
"""A variant's weights: as the model is stored (a GGUF file's Q4/Q8 codes where the engine keeps them), its float
weights in the compute dtype, or those quantized by round-to-nearest to int8 per channel or int4 in groups."""
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
INT4_GROUP_SIZES = (128, 64, 32)
"""int4 variants take the largest of these group sizes that divides every quantized layer's inputs."""


@dataclass(frozen=True)
class MatrixSettings:
    """How every variant is measured."""

    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    text: str = "shakespeare"
    """The perplexity text: a named corpus (its eval slice) or a UTF-8 file."""
    perplexity_tokens: int = 2048
    window: int = 256
    prompt_len: int = 128
    output_len: int = 32
    batches: tuple[int, ...] = (1, 8)
    """Batch caps: sequences at once in each throughput run, the --max-num-seqs an advice row is for."""
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("perplexity_tokens", "window", "prompt_len", "output_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TridentError(f"advise settings: {name} must be a positive integer, got {value!r}")
        if not self.batches or any(not isinstance(b, int) or b < 1 for b in self.batches):
            raise TridentError(f"advise settings: batch caps must be positive integers, got {self.batches!r}")
        if self.output_len < 2:
            raise TridentError("advise settings: output_len must be at least 2 (time per output token needs two)")


@dataclass(frozen=True)
class Variant:
    model: str
    """As given (``default``: the embedded model)."""
    weights: str
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise TridentError(f"unknown weights {self.weights!r}; choose from {', '.join(WEIGHTS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise TridentError(f"unknown KV cache dtype {self.kv_cache_dtype!r}; choose from "
                               f"{', '.join(KV_CACHE_DTYPES)}")

    @property
    def label(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f", KV {self.kv_cache_dtype}"
        return f"{os.path.basename(self.model.rstrip('/'))} {self.weights}{kv}"


@dataclass(frozen=True)
class BatchRun:
    """``batch`` requests arriving at once, the engine batching them all."""

    batch: int
    throughput: float
    """Output tokens a second over all of them."""
    ttft_ms: float
    """Median time to the first token (the later requests wait for the others' prefill)."""
    tpot_ms: float
    """Median time per output token after the first, per request (as `trident bench serve`)."""


@dataclass(frozen=True)
class VariantMeasurement:
    """One variant's figures on this machine."""

    variant: Variant
    weights_description: str
    dtype: str
    kv_format: str
    perplexity: float
    weights_bytes: int
    """LLMEngine.memory_usage().weights_bytes after the runs (the layers' kernel layouts included)."""
    ttft_ms: float
    tpot_ms: float
    """Batch 1: decode time per output token."""
    batch_runs: tuple[BatchRun, ...]
    """One per batch cap, in the order of ``MatrixSettings.batches``."""
    model_context: int
    group_size: int | None
    """The int4 / int8 variant's group size (None: per channel, or not quantized here)."""
    seconds: float
    """Time this measurement took (loading included)."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> VariantMeasurement:
        return cls(**{**record, "variant": Variant(**record["variant"]),
                      "batch_runs": tuple(BatchRun(**run) for run in record["batch_runs"])})


def measure_variant(variant: Variant, settings: MatrixSettings, *, use_cache: bool = True,
                    log=lambda _: None) -> tuple[VariantMeasurement, bool]:
    """(the variant's measurement, whether it came from the cache)."""
    path = _cache_file(variant, settings)
    if use_cache and path.is_file():
        try:
            return VariantMeasurement.from_dict(json.loads(path.read_text())), True
        except (ValueError, TypeError, KeyError):
            path.unlink(missing_ok=True)  # a record of another layout: measure again
    measurement = _measure(variant, settings, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(measurement.as_dict()))
    tmp.replace(path)
    return measurement, False


def _cache_file(variant: Variant, settings: MatrixSettings):
    from trident.loader import resolve_model_path

    model = resolve_model_path(model_path(variant.model))
    files = [os.path.join(model, f) for f in sorted(os.listdir(model))] if os.path.isdir(model) else [model]
    identity = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files if os.path.isfile(f)]
    try:
        trident_version = version("trident")
    except PackageNotFoundError:
        trident_version = "unknown"
    key = json.dumps([asdict(variant), asdict(settings), identity, trident_version], sort_keys=True)
    return cache_dir("advise") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _measure(variant: Variant, settings: MatrixSettings, log) -> VariantMeasurement:
    import torch

    from trident.bench.report import median
    from trident.bench.trident_side import run_latency
    from trident.bench.workloads import latency_workload, offline_workload
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.texts import default_slice, encode_first, read_source, slice_text
    from trident.compress.variants import release_memory, weights_description
    from trident.engine.engine import LLMEngine

    t0 = time.perf_counter()
    log(f"{variant.label}: loading")
    checkpoint = variant_checkpoint(variant, settings)
    group_size = checkpoint.quantization.config.group_size if variant.weights in ("int8", "int4") else None
    config = _engine_config(variant, settings)
    engine = LLMEngine(config, checkpoint)
    del checkpoint
    try:
        if engine.tokenizer is None:
            raise TridentError(f"{variant.model} has no tokenizer; advise needs one to tokenize its text")
        source = read_source(settings.text)
        text = slice_text(source.text, default_slice(settings.text))
        token_ids = encode_first(engine.tokenizer, text, settings.perplexity_tokens)
        ppl = perplexity(engine, token_ids, PerplexityConfig(window=settings.window,
                                                             max_tokens=settings.perplexity_tokens),
                         progress=True, description=f"{variant.label}: perplexity")
        log(f"{variant.label}: perplexity {ppl.perplexity:.3f}; batch 1")
        vocab = engine.model_config.vocab_size
        single = median([run_latency(engine, latency_workload(engine.tokenizer, settings.prompt_len,
                                                              settings.output_len, vocab)) for _ in range(2)])
        runs = []
        for batch in settings.batches:
            log(f"{variant.label}: batch of {batch}")
            runs.append(run_batch(engine, offline_workload(engine.tokenizer, batch, settings.prompt_len,
                                                           settings.output_len, vocab)))
        return VariantMeasurement(
            variant=variant, weights_description=weights_description(engine.model),
            dtype=str(engine.dtype).removeprefix("torch."), kv_format=engine.kv_format.name,
            perplexity=ppl.perplexity, weights_bytes=engine.memory_usage().weights_bytes,
            ttft_ms=single["ttft_ms"], tpot_ms=1000 / single["decode_tok_s"],
            batch_runs=tuple(runs),
            model_context=engine.model_config.max_position_embeddings, group_size=group_size,
            seconds=time.perf_counter() - t0)
    finally:
        del engine
        release_memory(settings.device)
        if torch.device(settings.device).type == "cpu":
            from trident.engine.heap import release_free_heap

            release_free_heap()


def _engine_config(variant: Variant, settings: MatrixSettings):
    from trident.engine.llm import engine_config

    s = settings
    tokens = max(s.prompt_len + s.output_len, s.window) + 64  # the warm-up requests are shorter
    blocks = max(*s.batches, 4) * -(-tokens // s.block_size) + 4
    return engine_config(model_path(variant.model), device=s.device, dtype=s.dtype, num_threads=s.threads,
                         kv_cache_dtype=variant.kv_cache_dtype, block_size=s.block_size, num_blocks=blocks,
                         max_num_seqs=max(s.batches), enable_prefix_caching=False,
                         gguf_weights="dequantize" if variant.weights != "stored" else "auto")


def variant_checkpoint(variant: Variant, settings: MatrixSettings):
    """The checkpoint a variant runs: as stored (GGUF codes kept where the engine keeps them), its float weights,
    or those quantized in memory by round-to-nearest."""
    import torch

    from trident.engine.sizing import gguf_native
    from trident.loader import load_checkpoint

    config = _engine_config(variant, settings)
    checkpoint = load_checkpoint(config.model or None, gguf_native(config, torch.device(settings.device)))
    if variant.weights in ("stored", "float"):
        if variant.weights == "float" and checkpoint.quantization is not None:
            raise TridentError(f"{variant.model} is stored quantized ({checkpoint.quantization.config}); it has no "
                               "float weights to run")
        return checkpoint
    if checkpoint.quantization is not None:
        raise TridentError(f"{variant.model} is stored quantized already; measure it as stored")
    from trident.bench.quantized_weights import quantize_checkpoint
    from trident.quant.rtn import QuantConfig

    group = None if variant.weights == "int8" else int4_group_size(checkpoint.config)
    return quantize_checkpoint(checkpoint, QuantConfig(bits=int(variant.weights[3:]), group_size=group))


def int4_group_size(model_config) -> int:
    """The largest of INT4_GROUP_SIZES that divides the hidden and intermediate sizes (every layer's inputs)."""
    widths = [model_config.hidden_size, model_config.intermediate_size, model_config.num_heads * model_config.head_dim]
    if model_config.moe is not None:
        widths.append(model_config.moe.moe_intermediate_size)
    for group in INT4_GROUP_SIZES:
        if all(w % group == 0 for w in widths if w):
            return group
    raise TridentError(f"no int4 group size of {INT4_GROUP_SIZES} divides this model's layer widths {widths}")


def variant_quantization(variant: Variant, described, group_size: int | None):
    """The QuantizedModules a variant's engine holds, from its model's description (``loader.describe_model``):
    the stored one, none for float, or the round-to-nearest plan of an int8 / int4 variant."""
    if variant.weights == "stored":
        return described.quantization
    if variant.weights == "float":
        return None
    from trident.bench.quantized_weights import quantization_plan
    from trident.models.build import meta_model
    from trident.quant.rtn import QuantConfig

    return quantization_plan(meta_model(described.config),
                             QuantConfig(bits=int(variant.weights[3:]), group_size=group_size))


def run_batch(engine, workload) -> BatchRun:
    """Every prompt of ``workload`` at once, continuously batched (after a warm-up): output tokens a second, and the
    medians over the requests of the time to first token and of the time per output token after it."""
    from statistics import median

    from trident.bench.trident_side import fixed_length_params, warm_up

    warm_up(engine, len(workload.prompts), prompt_len=len(workload.prompts[0]))
    t0 = time.perf_counter()
    first, done, tokens = {}, {}, {}
    for prompt, output_len in zip(workload.prompts, workload.output_lens):
        request = engine.add_request(list(prompt), fixed_length_params(output_len))
        tokens[request] = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            tokens[out.request_id] = len(out.outputs[0].token_ids)
            if tokens[out.request_id] and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
    elapsed = time.perf_counter() - t0
    return BatchRun(batch=len(workload.prompts), throughput=sum(tokens.values()) / elapsed,
                    ttft_ms=1000 * median(first[r] - t0 for r in tokens),
                    tpot_ms=1000 * median((done[r] - first[r]) / max(1, tokens[r] - 1) for r in tokens))
