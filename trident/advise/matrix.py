"""The selection matrix of `trident advise`: each measured variant at each batch cap against an SLO, with its
memory estimate at the SLO's context for that batch, whether it meets every limit (and which it misses), and the
recommendation: the row that meets them all and is best by the SLO's objective."""

from __future__ import annotations

import os
from dataclasses import dataclass

from trident.advise.measure import BatchRun, MatrixSettings, Variant, VariantMeasurement
from trident.advise.memory import FitEstimate
from trident.advise.slo import Slo


@dataclass(frozen=True)
class MatrixRow:
    """A variant at one batch cap."""

    measurement: VariantMeasurement
    run: BatchRun
    fit: FitEstimate
    """The memory estimate for ``run.batch`` sequences of the SLO's context (or the engine's default)."""
    perplexity_change: float
    """Against the first row's perplexity (the reference variant)."""
    misses: tuple[str, ...]
    """The limits it does not meet, in words; empty when it meets the SLO."""

    @property
    def meets(self) -> bool:
        return not self.misses

    @property
    def variant(self) -> Variant:
        return self.measurement.variant


def evaluate(cells: list[tuple[VariantMeasurement, BatchRun, FitEstimate]], slo: Slo) -> list[MatrixRow]:
    """Each (measurement, one of its batch runs, the fit estimate at that batch) against ``slo``; the first
    measurement's perplexity is the reference."""
    reference = cells[0][0].perplexity
    rows = []
    for m, run, fit in cells:
        change = m.perplexity / reference - 1
        misses = []
        if slo.ttft_ms is not None and m.ttft_ms > slo.ttft_ms:
            misses.append(f"TTFT {m.ttft_ms:.0f} > {slo.ttft_ms:g} ms")
        if slo.tpot_ms is not None and run.tpot_ms > slo.tpot_ms:
            misses.append(f"TPOT {run.tpot_ms:.0f} > {slo.tpot_ms:g} ms")
        if slo.min_throughput is not None and run.throughput < slo.min_throughput:
            misses.append(f"{run.throughput:.0f} < {slo.min_throughput:g} tok/s")
        if slo.min_context is not None and m.model_context < slo.min_context:
            misses.append(f"context {m.model_context:,} < {slo.min_context:,}")
        if slo.max_perplexity_change is not None and change > slo.max_perplexity_change:
            misses.append(f"perplexity {change:+.1%} > +{slo.max_perplexity_change:.0%}")
        if not fit.fits:
            misses.append(f"needs {fit.total_bytes / 2**30:.2f} GiB > {fit.device.free_bytes / 2**30:.2f} free")
        if slo.max_memory_bytes is not None and fit.total_bytes > slo.max_memory_bytes:
            misses.append(f"memory {fit.total_bytes / 2**30:.2f} > {slo.max_memory_bytes / 2**30:.2f} GiB")
        rows.append(MatrixRow(m, run, fit, change, tuple(misses)))
    return rows


OBJECTIVE_KEYS = {
    "quality": lambda r: (r.perplexity_change, -r.run.throughput),
    "latency": lambda r: (r.run.tpot_ms, r.measurement.ttft_ms),
    "throughput": lambda r: (-r.run.throughput, r.perplexity_change),
    "memory": lambda r: (r.fit.total_bytes, r.perplexity_change, -r.run.throughput),
}
"""How each objective orders the rows that meet an SLO (the first is recommended)."""


def recommend(rows: list[MatrixRow], slo: Slo) -> MatrixRow | None:
    """The best row that meets the SLO by its objective, or None when none does."""
    meeting = [r for r in rows if r.meets]
    return min(meeting, key=OBJECTIVE_KEYS[slo.objective]) if meeting else None


def pareto_front(rows: list[MatrixRow]) -> list[MatrixRow]:
    """The rows no other row beats on both throughput (higher) and perplexity change (lower)."""
    return [r for r in rows if not any(
        o.run.throughput >= r.run.throughput and o.perplexity_change <= r.perplexity_change
        and (o.run.throughput, o.perplexity_change) != (r.run.throughput, r.perplexity_change) for o in rows)]


def serve_commands(row: MatrixRow, settings: MatrixSettings) -> list[str]:
    """The commands that serve the recommended variant as measured: `trident quantize` first for an in-memory
    int8 / int4 variant."""
    v, fit = row.variant, row.fit
    model = v.model
    commands = []
    if v.weights in ("int8", "int4"):
        out = f"{os.path.basename(model.rstrip('/')) if model != 'default' else 'model'}-{v.weights}"
        group = f" --group-size {row.measurement.group_size}" if row.measurement.group_size else ""
        commands.append(f"trident quantize {model} --bits {v.weights[3:]}{group} --out {out}")
        model = out
    serve = [f"trident serve {model}", f"--max-model-len {fit.context}", f"--max-num-seqs {row.run.batch}"]
    if settings.device != "cpu":
        serve.append(f"--device {settings.device}")
    if settings.dtype != "auto":
        serve.append(f"--dtype {settings.dtype}")
    if v.weights == "float" and (model == "default" or model.endswith(".gguf")):
        serve.append("--gguf-weights dequantize")
    if v.kv_cache_dtype != "auto":
        serve.append(f"--kv-cache-dtype {v.kv_cache_dtype}")
    if settings.device == "cpu":
        serve.append(f"--kv-cache-memory {-(-fit.kv_bytes // 2**20)}MiB")
    commands.append(" ".join(serve))
    return commands
