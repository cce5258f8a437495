"""The PNG of `trident eval report --plot` / `trident quantize --report-plot`: perplexity against batch-1 decode
tok/s, one labelled point per variant (lower right is better: faster and closer to the original)."""

from __future__ import annotations

from trident.compress.variants import VariantReport


def write_plot(path: str, report: VariantReport, title: str) -> None:
    """Save the scatter of ``report``'s rows to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, whatever matplotlib's global backend is
    ax = fig.subplots()
    for i, row in enumerate(report.rows):
        ax.scatter([row.decode_tok_s], [row.perplexity], color="tab:red" if i == 0 else "tab:blue", zorder=3)
        ax.annotate(row.name if i else f"{row.name} (original)", (row.decode_tok_s, row.perplexity),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(f"decode tok/s (batch 1, {report.settings.device}, {report.rows[0].dtype})")
    ax.set_ylabel(f"perplexity ({report.num_scored_tokens:,} tokens)")
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=100)
