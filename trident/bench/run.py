"""`trident bench offline|latency`: measure trident (and with --compare hf, Hugging Face transformers in
the same process on the same token ids), print a table and write JSON. `trident bench serve` drives a
running server instead (trident/bench/serve.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

LATENCY_KEYS = ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_ms", "prompt_tokens", "output_tokens")
OFFLINE_KEYS = ("load_s", "requests", "output_tokens", "elapsed_s", "output_tok_s")


def add_bench_parser(sub, model_help: str, engine_args) -> None:
    p = sub.add_parser("bench", help="benchmark: latency (batch 1), offline (many requests batched) or "
                       "serve (online load against a running OpenAI-compatible server)")
    p.add_argument("kind", choices=["latency", "offline", "serve"])
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also run Hugging Face transformers on the same workload in this process")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (latency 241, offline 128)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--num-prompts", type=int, default=16, help="requests in the offline or serve workload")
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep the prefix cache on (off by default: repetitions would be served from it)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per engine, interleaved; medians reported")
    p.add_argument("--json", default=None, help="where to write results (default: bench-results/KIND-TIME.json)")
    engine_args(p)
    from trident.bench.serve import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.kind == "serve":
        from trident.bench.serve import run_serve_bench

        return run_serve_bench(args)
    from trident.bench import peers, trident_side
    from trident.bench.workloads import latency_workload, offline_workload
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.loader import default_model_path

    model_path = args.model or default_model_path()
    t0 = time.perf_counter()
    engine = LLMEngine(engine_config(
        model_path, device=args.device, dtype=args.dtype, num_threads=args.threads,
        max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.prefix_caching,
    ))
    load_s = time.perf_counter() - t0
    if args.kind == "latency":
        workload = latency_workload(engine.tokenizer, args.prompt_len or 241, args.output_len)
        ours_fn, theirs_fn = trident_side.run_latency, peers.hf_latency
    else:
        workload = offline_workload(engine.tokenizer, args.num_prompts, args.prompt_len or 128, args.output_len)
        ours_fn, theirs_fn = trident_side.run_offline, peers.hf_offline
    dtype_name = str(engine.dtype).removeprefix("torch.")
    model = hf_load_s = None
    if args.compare == "hf":
        model, hf_load_s = peers.load_hf(model_path, engine.dtype)
    # Interleave the engines' repetitions so that drift of a shared machine hits both alike; report medians.
    ours_runs, theirs_runs = [], []
    for _ in range(args.repeat):
        ours_runs.append(ours_fn(engine, workload))
        if model is not None:
            theirs_runs.append(theirs_fn(model, workload))
    rows = [{"engine": f"trident ({dtype_name})", "load_s": load_s, **_median(ours_runs), "runs": ours_runs}]
    if model is not None:
        rows.append({"engine": f"hf-transformers ({dtype_name})", "load_s": hf_load_s, **_median(theirs_runs),
                     "runs": theirs_runs})
    keys = LATENCY_KEYS if args.kind == "latency" else OFFLINE_KEYS
    _print_table(args.kind, rows, keys)
    record = {
        "kind": args.kind, "model": model_path, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": args.threads or os.cpu_count(),
                    "cpu_model": _cpu_model()},
        "workload": {"prompts": len(workload.prompts), "prompt_len": len(workload.prompts[0]),
                     "output_len": workload.output_len},
        "results": rows,
    }
    path = args.json or os.path.join("bench-results", f"{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    Console().print(f"results written to {path}")
    return 0


def _print_table(kind: str, rows: list[dict], keys: tuple[str, ...]) -> None:
    table = Table(title=f"trident bench {kind}")
    table.add_column("engine")
    for key in keys:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(row["engine"], *(_fmt(row.get(k)) for k in keys))
    if len(rows) == 2:
        main = "decode_tok_s" if kind == "latency" else "output_tok_s"
        ratio = rows[0][main] / rows[1][main]
        table.caption = f"trident / peer {main}: {ratio:.2f}x"
    Console(width=max(Console().width, 130)).print(table)


def _median(runs: list[dict]) -> dict:
    """Per-key median over repetitions (numbers only)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)
