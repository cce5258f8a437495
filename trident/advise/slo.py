"""What a user asks of a deployment: a service-level objective (SLO), given as a named scenario or explicit limits,
and what ranks the variants that meet it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trident.errors import TridentError

OBJECTIVES = ("quality", "latency", "throughput", "memory")
"""What ranks the variants that meet an SLO: the smallest perplexity change, the shortest time per output token,
the most output tokens a second, the least memory."""


@dataclass(frozen=True)
class Slo:
    """Limits a variant must meet (None: no limit) and the objective that ranks those that do."""

    ttft_ms: float | None = None
    """Time to the first token of one request, milliseconds."""
    tpot_ms: float | None = None
    """Time per output token of each sequence with the batch full (``--max-num-seqs`` at once), milliseconds."""
    min_throughput: float | None = None
    """Output tokens a second over all sequences, the batch full."""
    min_context: int | None = None
    """Tokens a sequence must be able to hold (prompt and output); the model's context must reach it and the memory
    estimate is made at it."""
    max_memory_bytes: int | None = None
    """The estimate (weights, KV cache for the batch at the context, activations, runtime) at most this."""
    max_perplexity_change: float | None = None
    """Perplexity at most this much above the first variant's (0.05: +5%)."""
    objective: str = "quality"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TridentError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "objective" and value is not None and not value > 0:
                raise TridentError(f"the SLO's {field.name} must be positive, got {value!r}")

    def describe(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms else "",
                 f"TPOT <= {self.tpot_ms:g} ms" if self.tpot_ms else "",
                 f">= {self.min_throughput:g} tok/s" if self.min_throughput else "",
                 f"context >= {self.min_context:,}" if self.min_context else "",
                 f"memory <= {self.max_memory_bytes / 2**30:.2f} GiB" if self.max_memory_bytes else "",
                 f"perplexity <= +{self.max_perplexity_change:.0%}" if self.max_perplexity_change else ""]
        limits = ", ".join(p for p in parts if p) or "no limits"
        return f"{limits}; best {self.objective}"


SCENARIOS: dict[str, Slo] = {
    # interactive use: the first token within 200 ms, then faster than one reads (20 tokens a second)
    "realtime": Slo(ttft_ms=200, tpot_ms=50, max_perplexity_change=0.10, objective="latency"),
    # long documents: 32K tokens a sequence, the best quality that holds them
    "long-context": Slo(min_context=32768, objective="quality"),
    # batch jobs and busy endpoints: the most tokens a second within a quality bound
    "high-throughput": Slo(max_perplexity_change=0.10, objective="throughput"),
    # small machines: the least memory within a quality bound
    "edge": Slo(max_perplexity_change=0.10, objective="memory"),
}
"""The named scenarios of `trident advise --scenario` (the seed's selection matrix: real-time, long text, high
concurrency, plus small devices)."""


def slo_for(scenario: str | None, **limits) -> Slo:
    """The scenario's SLO (none: no limits, best quality) with the ``limits`` that are not None replacing its
    own."""
    if scenario is not None and scenario not in SCENARIOS:
        raise TridentError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    base = SCENARIOS[scenario] if scenario else Slo()
    return dataclasses.replace(base, **{k: v for k, v in limits.items() if v is not None})
