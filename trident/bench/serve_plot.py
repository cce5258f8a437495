"""The PNG of `trident bench serve`: TTFT and TPOT distributions (empirical CDFs) with the SLO lines."""

from __future__ import annotations

from collections.abc import Sequence

from trident.bench.serve_client import RequestRecord
from trident.bench.serve_stats import Slo


def write_plot(path: str, records: Sequence[RequestRecord], slo: Slo, title: str) -> None:
    """Save two CDF panels (TTFT, TPOT, in ms) of the completed requests to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in records if r.success]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, whatever matplotlib's global backend is
    panels = (("TTFT", [r.ttft_ms for r in done if r.ttft_ms is not None], slo.ttft_ms),
              ("TPOT", [r.tpot_ms for r in done if r.tpot_ms is not None], slo.tpot_ms))
    for ax, (name, values, target) in zip(fig.subplots(1, 2), panels):
        xs = sorted(values)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{name} ({len(xs)} requests)")
        if target is not None:
            ax.axvline(target, color="tab:red", linestyle="--", label=f"SLO {target:g} ms")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
