"""`trident advise MODEL... [--scenario S | limits]` (parser: trident/advise/cli.py): measure the variants, print
the selection matrix against the SLO, the recommendation with the commands that serve it, and optionally JSON and a
Pareto plot of quality against throughput."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from trident.advise.matrix import MatrixRow, evaluate, pareto_front, recommend, serve_commands
from trident.advise.measure import MatrixSettings, Variant, VariantMeasurement, measure_variant
from trident.advise.memory import FitEstimate, estimate_fit
from trident.advise.slo import Slo, slo_for
from trident.errors import TridentError

PERPLEXITY_WINDOW = 256


def run_matrix(args: argparse.Namespace) -> int:
    from trident.serve.model_spec import parse_size

    settings = MatrixSettings(device=args.device, dtype=args.dtype, threads=args.threads, text=args.text,
                              perplexity_tokens=args.perplexity_tokens, window=PERPLEXITY_WINDOW,
                              prompt_len=args.prompt_len, output_len=args.output_len,
                              batches=tuple(sorted({int(b) for b in _names(args.batch)})))
    slo = slo_for(args.scenario, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms, min_throughput=args.min_throughput,
                  min_context=args.min_context, max_perplexity_change=args.max_perplexity_change,
                  objective=args.objective,
                  max_memory_bytes=None if args.max_memory is None else parse_size(args.max_memory, "--max-memory"))
    variants = candidate_variants(args.models or ["default"], _names(args.variants), _names(args.kv_cache_dtypes))
    console = Console()
    console.print(f"SLO: {slo.describe()}; {len(variants)} variants, batch caps "
                  f"{', '.join(map(str, settings.batches))}, on {settings.device}")
    measurements = []
    for i, variant in enumerate(variants):
        measurement, cached = measure_variant(variant, settings, use_cache=not args.no_cache,
                                              log=lambda line: console.print(f"  {line}", style="dim"))
        console.print(f"[{i + 1}/{len(variants)}] {variant.label}: "
                      + ("cached" if cached else f"measured in {measurement.seconds:.0f} s"))
        measurements.append(measurement)
    fits = [variant_fit(m, settings, slo) for m in measurements]  # the concurrency is each row's batch cap
    rows = evaluate([(m, run, dataclasses.replace(fit, concurrency=run.batch)) for m, fit in zip(measurements, fits)
                     for run in m.batch_runs], slo)
    best = recommend(rows, slo)
    console.print(matrix_table(rows, best, settings))
    if best is None:
        console.print("no variant meets the SLO; relax a limit or try other variants (--variants, "
                      "--kv-cache-dtypes, a smaller --batch)")
    else:
        console.print(f"recommended: {best.variant.label} ({slo.objective}); serve it with:")
        for command in serve_commands(best, settings):
            console.print(f"  {command}", soft_wrap=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(matrix_record(measurements, rows, best, settings, slo), f, indent=2)
    if args.plot:
        write_pareto_plot(rows, best, args.plot)
        console.print(f"plot: {args.plot}")
    return 0


def _names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise TridentError(f"expected a comma-separated list, got {spec!r}")
    return names


def candidate_variants(models: list[str], weights: list[str], kv_dtypes: list[str]) -> list[Variant]:
    """Every model x weights x KV cache that makes sense: a model stored quantized only as stored; a model stored in
    float has no separate float variant."""
    from trident.cli_args import model_path
    from trident.loader.describe import describe_model

    variants = []
    for model in models:
        described = describe_model(model_path(model), gguf_native=True)
        gguf = described.path.endswith(".gguf")
        for w in weights:
            if described.quantization is not None and not gguf and w != "stored":
                continue  # a trident quantize folder: nothing else to build from it
            if w == "float" and not gguf:
                continue  # the same as stored
            variants.extend(Variant(model, w, kv) for kv in kv_dtypes)
    if not variants:
        raise TridentError("no variants to measure: check MODEL and --variants")
    return variants


def variant_fit(m: VariantMeasurement, settings: MatrixSettings, slo: Slo) -> FitEstimate:
    """The memory estimate of the variant at the SLO's context (at most the model's; the engine's default context
    without one), for the largest batch cap."""
    import torch

    from trident.advise.measure import variant_quantization
    from trident.cli_args import model_path
    from trident.engine.llm import engine_config
    from trident.engine.sizing import gguf_native
    from trident.loader.describe import describe_model

    v = m.variant
    context = None if slo.min_context is None else min(slo.min_context, m.model_context)
    config = engine_config(model_path(v.model), device=settings.device, dtype=settings.dtype,
                           kv_cache_dtype=v.kv_cache_dtype, max_model_len=context, max_num_seqs=max(settings.batches),
                           max_num_batched_tokens=None, gguf_weights="auto" if v.weights == "stored" else "dequantize")
    described = describe_model(model_path(v.model), gguf_native(config, torch.device(settings.device)))
    return estimate_fit(described.config, config, variant_quantization(v, described, m.group_size))


def matrix_table(rows: list[MatrixRow], best: MatrixRow | None, settings: MatrixSettings) -> Table:
    table = Table(title=f"Variants measured here at context {rows[0].fit.context:,} (perplexity against the first "
                  "row; TTFT of one request; TPOT and tok/s with the batch full; * recommended)")
    for column in ("variant", "weights", "batch", "memory", "perplexity", "TTFT ms", "TPOT ms", "tok/s", "SLO"):
        table.add_column(column, justify="left" if column in ("variant", "weights", "SLO") else "right")
    for row in rows:
        m = row.measurement
        table.add_row(row.variant.label + (" *" if row is best else ""), m.weights_description, str(row.run.batch),
                      f"{row.fit.total_bytes / 2**20:,.0f} MiB", f"{m.perplexity:.2f} ({row.perplexity_change:+.1%})",
                      f"{m.ttft_ms:.0f}", f"{row.run.tpot_ms:.1f}", f"{row.run.throughput:.0f}",
                      "meets" if row.meets else "; ".join(row.misses), style="bold" if row is best else None)
    return table


def matrix_record(measurements: list[VariantMeasurement], rows: list[MatrixRow], best: MatrixRow | None,
                  settings: MatrixSettings, slo: Slo) -> dict:
    from dataclasses import asdict

    return {
        "settings": asdict(settings), "slo": asdict(slo),
        "measurements": [m.as_dict() for m in measurements],
        "rows": [{"variant": asdict(row.variant), "batch": row.run.batch, "perplexity_change": row.perplexity_change,
                  "throughput": row.run.throughput, "tpot_ms": row.run.tpot_ms, "batch_ttft_ms": row.run.ttft_ms,
                  "ttft_ms": row.measurement.ttft_ms, "memory_estimate_bytes": row.fit.total_bytes,
                  "context": row.fit.context, "meets": row.meets, "misses": list(row.misses)} for row in rows],
        "recommended": None if best is None else {"variant": asdict(best.variant), "batch": best.run.batch,
                                                  "commands": serve_commands(best, settings)},
    }


def write_pareto_plot(rows: list[MatrixRow], best: MatrixRow | None, path: str) -> None:
    """Perplexity change against throughput, one point per variant, the Pareto front joined, the SLO's failures
    hollow, the recommendation ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    front = sorted(pareto_front(rows), key=lambda r: r.run.throughput)
    ax.plot([r.run.throughput for r in front], [100 * r.perplexity_change for r in front], "-",
            color="#999999", zorder=1, label="Pareto front")
    for row in rows:
        x, y = row.run.throughput, 100 * row.perplexity_change
        ax.scatter([x], [y], s=60, zorder=2, facecolors="#2a7ae2" if row.meets else "none", edgecolors="#2a7ae2")
        ax.annotate(f"{row.variant.label} b{row.run.batch}", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    if best is not None:
        ax.scatter([best.run.throughput], [100 * best.perplexity_change], s=220, facecolors="none",
                   edgecolors="#e2552a", linewidths=2, zorder=3, label="recommended")
    ax.set_xlabel("output tokens / s (the batch full)")
    ax.set_ylabel("perplexity change, %")
    ax.set_title("trident advise: quality against throughput (filled: meets the SLO)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
