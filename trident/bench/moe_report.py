"""`trident bench ... --moe-report`: the expert load of an MoE model over the benchmark's trident runs.

A table per MoE layer (tokens routed, imbalance = max / mean expert load, the entropy balance term, the busiest
and idlest experts' shares) and a heat map PNG: experts across, layers down, each cell the expert's share of its
layer's (token, expert) assignments. The figures come from ``LLMEngine.moe_stats()`` (trident/moe/stats.py).
"""

from __future__ import annotations

import math

from rich.table import Table

from trident.moe.stats import MoeStats


def moe_table(stats: MoeStats, title: str) -> Table:
    table = Table(title=title)
    for column in ("layer", "imbalance (max/mean)", "entropy term", "busiest expert", "idlest expert"):
        table.add_column(column, justify="right")
    for load in stats.layers:
        shares = load.token_share
        busiest = max(range(len(shares)), key=shares.__getitem__)
        idlest = min(range(len(shares)), key=shares.__getitem__)
        table.add_row(str(load.layer), f"{load.imbalance:.2f}", f"{load.entropy_term:.3f}",
                      f"#{busiest} {shares[busiest]:.1%}", f"#{idlest} {shares[idlest]:.1%}")
    return table


def moe_caption(stats: MoeStats) -> str:
    """One line under the table: what the figures cover and what even would be."""
    even = 1.0 / stats.num_experts
    return (f"{stats.num_tokens} tokens through {len(stats.layers)} MoE layers, {stats.num_experts} experts, "
            f"top-{stats.top_k}; an even load is {even:.1%} per expert (imbalance 1.00, entropy term "
            f"{-stats.alpha * math.log(stats.num_experts):.3f} with alpha {stats.alpha:g})")


def moe_record(stats: MoeStats) -> dict:
    """The snapshot as JSON-ready data."""
    return {"num_experts": stats.num_experts, "top_k": stats.top_k, "num_tokens": stats.num_tokens,
            "alpha": stats.alpha,
            "layers": [{"layer": load.layer, "token_counts": list(load.token_counts), "imbalance": load.imbalance,
                        "entropy_term": load.entropy_term, "mean_probs": list(load.mean_probs)}
                       for load in stats.layers]}


def write_heatmap(path: str, stats: MoeStats, title: str) -> None:
    """Save the experts x layers heat map of token shares to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shares = [list(load.token_share) for load in stats.layers]
    width = min(4 + 0.12 * stats.num_experts, 24)
    height = min(3 + 0.25 * len(stats.layers), 16)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, whatever matplotlib's global backend is
    ax = fig.subplots()
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats.layers)), [str(load.layer) for load in stats.layers])
    fig.colorbar(image, ax=ax, label=f"token share (even {1 / stats.num_experts:.1%})")
    ax.set_title(title)
    fig.savefig(path, dpi=100)

