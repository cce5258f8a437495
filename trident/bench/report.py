"""The table `trident bench latency|offline` prints and the JSON record it writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from rich.console import Console
from rich.table import Table

LATENCY_KEYS = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_ms", "prompt_tokens", "output_tokens")
OFFLINE_KEYS = ("load_s", "requests", "output_tokens", "elapsed_s", "output_tok_s")
MAIN_METRIC = {"latency": "decode_tok_s", "offline": "output_tok_s"}


def summarize(label: str, load_s: float | None, runs: list[dict], error: str | None, roofline_tok_s: float | None,
              kind: str) -> dict:
    """One engine's row: medians over its repetitions, its fraction of the roofline, or the error that
    stopped it."""
    row: dict = {"engine": label, "load_s": load_s}
    if runs:
        row.update(median(runs))
        main = row.get(MAIN_METRIC[kind])
        if roofline_tok_s and main:
            row["roofline_tok_s"] = roofline_tok_s
            row["roofline_fraction"] = main / roofline_tok_s
    row["runs"] = runs
    if error is not None:
        row["error"] = error
    return row


def median(runs: list[dict]) -> dict:
    """Per-key median over repetitions: of floats, of integers (counts) the lower one; other values (a
    method's name) from the first run."""
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, int):
            out[k] = statistics.median_low(r[k] for r in runs)
        else:
            out[k] = statistics.median(r[k] for r in runs)
    return out


def print_table(kind: str, title: str, rows: list[dict], captions: list[str]) -> None:
    keys = LATENCY_KEYS if kind == "latency" else OFFLINE_KEYS
    table = Table(title=title)
    table.add_column("engine")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("roofline tok/s", justify="right")
    table.add_column("of roofline", justify="right")
    table.add_column("method / error")
    for row in rows:
        fraction = row.get("roofline_fraction")
        table.add_row(row["engine"], *(fmt(row.get(k)) for k in keys), fmt(row.get("roofline_tok_s")),
                      "-" if fraction is None else f"{100 * fraction:.1f}%",
                      f"[red]{row['error']}[/red]" if "error" in row else str(row.get("method", "")))
    main = MAIN_METRIC[kind]
    if len(rows) == 2 and rows[0].get(main) and rows[1].get(main):
        captions = [*captions, f"trident / peer {main}: {rows[0][main] / rows[1][main]:.2f}x"]
    table.caption = "\n".join([*captions, *spread_captions(rows, kind)])
    Console(width=max(Console().width, 180)).print(table)


def spread_captions(rows: list[dict], kind: str) -> list[str]:
    """For each engine with more than one repetition, the range of its main figure beside the median the table
    shows: a target near the median is only met if the spread says so."""
    main = MAIN_METRIC[kind]
    lines = []
    for row in rows:
        values = sorted(r[main] for r in row.get("runs", ()) if r.get(main) is not None)
        if len(values) > 1:
            lines.append(f"{row['engine']} {main} over {len(values)} repetitions: min {fmt(values[0])}, "
                         f"median {fmt(statistics.median(values))}, max {fmt(values[-1])}")
    return lines


def default_json_path(kind: str) -> str:
    """Where a record of ``kind`` goes when no path is given: bench-results/KIND-TIME.json."""
    return os.path.join("bench-results", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def write_json(record: dict, path: str | None, kind: str) -> str:
    path = path or default_json_path(kind)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def machine(device: str, threads: int | None) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": threads or os.cpu_count(), "cpu_model": cpu_model(),
            "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def device_name(device: str) -> str:
    """The GPU's name on CUDA, the CPU model otherwise."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model() or "cpu"


def size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)
