"""`trident advise --fit` (parser: trident/advise/cli.py): does a model serve a context to a number of sequences
on this device? The estimate of trident/advise/memory.py as tables, from the model's config alone (nothing is
loaded), with the `trident serve` command that holds it. Exit status 0 when it fits, 1 when it does not."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from trident.advise.memory import FitEstimate, estimate_fit
from trident.config import EngineConfig, ModelConfig
from trident.errors import TridentError
from trident.loader.info import human_bytes
from trident.quant.format import QuantizedModules

DEFAULT_CONTEXTS = (2048, 8192, 32768, 131072)
"""Contexts of the "most sequences" table (those up to the model's, and the one asked for)."""


@dataclass(frozen=True)
class FitSubject:
    """The model a fit estimate is for: its config and quantization, and how to name it."""

    name: str
    serve_name: str
    """What `trident serve` takes for it (a path; a named shape has none: the shape's name stands in)."""
    config: ModelConfig
    quantization: QuantizedModules | None
    weights: str
    """How its weights are held, in words."""


def run_fit(args: argparse.Namespace, config: EngineConfig) -> int:
    """`trident advise --fit`: print the estimate for ``config``'s context and concurrency; the exit status."""
    if len(args.models) > 1:
        raise TridentError("--fit takes one MODEL")
    subject = fit_subject(args.models[0] if args.models else None, args.shape, args.weights, args.group_size,
                          config)
    estimate = estimate_fit(subject.config, config, subject.quantization)
    contexts = _contexts(args.contexts, estimate)
    console = Console()
    for table in fit_tables(subject, estimate, contexts):
        console.print(table)
    console.print(verdict(subject, estimate, config))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fit_record(subject, estimate, contexts), f, indent=2)
    return 0 if estimate.fits else 1


def fit_subject(model: str | None, shape: str | None, weights: str | None, group_size: int | None,
                config: EngineConfig) -> FitSubject:
    """The model to estimate: a path (None: the default model) read without its weights, or a named shape; with
    ``weights`` its float layers as `trident quantize` would store them."""
    from trident.engine.sizing import gguf_native

    if shape is not None and model is not None:
        raise TridentError("pass either a MODEL path or --shape, not both")
    if shape is not None:
        from trident.bench.shapes import resolve_shape

        resolved = resolve_shape(shape)
        model_config, quantization, name, serve_name = (ModelConfig.from_hf_dict(resolved.hf_config), None,
                                                        f"{resolved.name} (shape)", resolved.name)
    else:
        from trident.loader.describe import describe_model

        described = describe_model(model, gguf_native(config, torch.device(config.device)))
        model_config, quantization, name = described.config, described.quantization, os.path.basename(described.path)
        serve_name = model or "default"
    if weights not in (None, "float"):
        if quantization is not None:
            raise TridentError(f"{name} is stored quantized already; leave out --weights")
        from trident.bench.quantized_weights import bench_quant_config, quant_method_of, quantization_plan
        from trident.models.build import meta_model

        quantization = quantization_plan(meta_model(model_config), bench_quant_config(weights, group_size),
                                         quant_method_of(weights))
    elif group_size is not None:
        raise TridentError("--group-size goes with --weights int8 or int4")
    return FitSubject(name, serve_name, model_config, quantization, _describe_weights(quantization, config))


def _describe_weights(quantization: QuantizedModules | None, config: EngineConfig) -> str:
    from trident.engine.sizing import resolve_dtype

    dtype = str(resolve_dtype(config.dtype, torch.device(config.device))).removeprefix("torch.")
    if quantization is None:
        return dtype
    bits = sorted({quantization.config_of(name).bits for name in quantization.modules})
    kind = "W8A8" if quantization.quant_method == "trident-w8a8" else "/".join(f"int{b}" for b in bits)
    experts = (f", int{quantization.experts_format()[0]} experts ({len(quantization.experts)})"
               if quantization.experts else "")
    return f"{kind} layers ({len(quantization.modules)}){experts}, the rest {dtype}"


def _contexts(spec: str | None, estimate: FitEstimate) -> list[int]:
    if spec is not None:
        try:
            asked = [int(v) for v in spec.split(",")]
        except ValueError:
            raise TridentError(f"--contexts takes token counts separated by commas, got {spec!r}") from None
        if any(v <= 0 for v in asked):
            raise TridentError(f"--contexts must be positive token counts, got {spec!r}")
    else:
        asked = [c for c in DEFAULT_CONTEXTS if c <= estimate.model_context]
    return sorted(set(asked) | {estimate.context})


def fit_tables(subject: FitSubject, estimate: FitEstimate, contexts: list[int]) -> list[Table]:
    """The estimate's parts, and the most sequences that fit at each context."""
    e, device = estimate, estimate.device
    parts = Table(title=f"{subject.name}: {e.concurrency} sequences of {e.context} tokens on {device.name} "
                  f"({device.description}, {human_bytes(device.free_bytes)} free of {human_bytes(device.total_bytes)})")
    for column in ("part", "bytes", "what"):
        parts.add_column(column, justify="right" if column == "bytes" else "left")
    parts.add_row("weights", human_bytes(e.weights_bytes), subject.weights)
    parts.add_row("KV cache", human_bytes(e.kv_bytes), f"{e.kv_cache_dtype}, {human_bytes(round(e.kv_bytes_per_token))}"
                  f" a token: {human_bytes(e.kv_bytes_per_sequence())} a sequence")
    parts.add_row("activations", human_bytes(e.activation_bytes),
                  "the engine's reserve" if device.name != "cpu" else "one step's tensors, the sampled logits")
    parts.add_row("runtime", human_bytes(e.runtime_bytes), "tokenizer, kernel caches, allocator slack"
                  if e.runtime_bytes else "(the CUDA context: outside the free memory)")
    parts.add_row("total", human_bytes(e.total_bytes), "fits" if e.fits else "does NOT fit", style="bold")
    most = Table(title="Most sequences that fit, by context")
    for column in ("context", "KV a sequence", "sequences"):
        most.add_column(column, justify="right")
    for context in contexts:
        most.add_row(f"{context:,}" + (" (model max)" if context == e.model_context else ""),
                     human_bytes(e.kv_bytes_per_sequence(context)), f"{e.max_concurrency(context):,}")
    return [parts, most]


def verdict(subject: FitSubject, estimate: FitEstimate, config: EngineConfig) -> str:
    """What to do: the serve command that holds the estimate, or the ways to make it fit."""
    e = estimate
    if not e.fits:
        most = e.max_concurrency()
        ways = [f"at most {most:,} sequence{'' if most == 1 else 's'} of {e.context:,} tokens (--max-num-seqs)",
                f"{e.concurrency} sequences of at most {e.max_context():,} tokens (--max-model-len)"]
        if e.kv_cache_dtype not in ("int8", "fp8"):
            ways.append("an 8-bit KV cache (--kv-cache-dtype int8)")
        if subject.quantization is None:
            ways.append("quantized weights (trident quantize --bits 4|8)")
        return f"does not fit: {human_bytes(e.total_bytes)} needed, {human_bytes(e.device.free_bytes)} free; try " + \
            "; or ".join(ways)
    command = [f"trident serve {subject.serve_name}", f"--device {e.device.name}" if e.device.name != "cpu" else "",
               f"--max-model-len {e.context}", f"--max-num-seqs {e.concurrency}",
               f"--kv-cache-dtype {config.cache.kv_cache_dtype}" if config.cache.kv_cache_dtype != "auto" else "",
               f"--dtype {config.dtype}" if config.dtype != "auto" else ""]
    if e.device.name == "cpu" and config.cache.memory_budget_bytes is None:
        command.append(f"--kv-cache-memory {-(-e.kv_bytes // 2**20)}MiB")
    return (f"fits: {human_bytes(e.total_bytes)} of {human_bytes(e.device.free_bytes)} free\nserve it with: "
            + " ".join(c for c in command if c))


def fit_record(subject: FitSubject, estimate: FitEstimate, contexts: list[int]) -> dict:
    """The estimate as a JSON-ready dict."""
    e = estimate
    return {
        "model": subject.name, "weights": subject.weights, "dtype": e.dtype, "kv_cache_dtype": e.kv_cache_dtype,
        "context": e.context, "concurrency": e.concurrency, "model_context": e.model_context,
        "device": {"name": e.device.name, "description": e.device.description, "total_bytes": e.device.total_bytes,
                   "free_bytes": e.device.free_bytes},
        "bytes": {"weights": e.weights_bytes, "kv_cache": e.kv_bytes, "activations": e.activation_bytes,
                  "runtime": e.runtime_bytes, "total": e.total_bytes},
        "kv_bytes_per_token": e.kv_bytes_per_token, "fits": e.fits, "max_context": e.max_context(),
        "max_concurrency": {str(c): e.max_concurrency(c) for c in contexts},
    }
