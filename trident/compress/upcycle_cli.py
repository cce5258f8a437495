"""`trident upcycle MODEL --experts E --top-k K [--reinit-fraction R] [--noise S] --out DIR`: a dense Llama-form
model turned into a Mixtral mixture of experts (trident/compress/upcycle.py), written as a Hugging Face folder that
trident and transformers load; a summary table and a JSON record."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone

from trident.cli_args import DEFAULT_MODEL, model_path, new_output_folder
from trident.compress.upcycle import UpcycleConfig

UPCYCLE_DESCRIPTION = (
    "Sparse upcycling: every decoder layer's gated MLP becomes --experts experts, each a copy of it (Mixtral's "
    "w1/w3/w2), with a router choosing --top-k of them per token (softmax, top k renormalised to sum to 1). "
    "Attention, norms and embeddings are copied. With identical experts the model computes exactly the dense "
    "model's logits; --reinit-fraction R draws a random R of each expert's intermediate neurons afresh from the "
    "matrix's own mean and standard deviation (Drop-Upcycling), --noise S adds Gaussian noise of S times each "
    "matrix's standard deviation, so that the experts differ and can specialise when trained further. The router "
    "starts as a seeded normal of standard deviation --router-std (near-uniform routing). Writes a Hugging Face "
    "folder (config.json with model_type mixtral, model.safetensors in float32, the tokenizer)."
)


def add_upcycle_parser(sub) -> None:
    defaults = UpcycleConfig()
    p = sub.add_parser("upcycle", help="turn a dense model into a mixture of experts (sparse upcycling) in a folder",
                       description=UPCYCLE_DESCRIPTION,
                       epilog="See docs/compression.md. Example: trident upcycle default --experts 4 --top-k 2 "
                       "--reinit-fraction 0.1 --out smollm2-moe")
    p.add_argument("model", metavar="MODEL", help=f"a .gguf file, a Hugging Face folder, or '{DEFAULT_MODEL}' (the "
                   "embedded SmolLM2-135M-Instruct Q4_1 GGUF); a dense Llama or Mistral")
    p.add_argument("--experts", type=int, default=defaults.num_experts,
                   help=f"experts per layer (default {defaults.num_experts})")
    p.add_argument("--top-k", type=int, default=defaults.top_k,
                   help=f"experts per token (default {defaults.top_k})")
    p.add_argument("--reinit-fraction", type=float, default=defaults.reinit_fraction, metavar="R",
                   help="fraction of each expert's intermediate neurons re-initialised (default "
                   f"{defaults.reinit_fraction}: exact copies)")
    p.add_argument("--noise", type=float, default=defaults.noise, metavar="S",
                   help=f"noise on every expert weight, times its matrix's std (default {defaults.noise})")
    p.add_argument("--router-std", type=float, default=defaults.router_std, metavar="STD",
                   help=f"standard deviation of the router's initial weights (default {defaults.router_std})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the draws (default {defaults.seed})")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the record (default: bench-results/upcycle-TIME.json)")
    p.set_defaults(func=run_upcycle)


def run_upcycle(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trident.bench import report as bench_report
    from trident.compress.upcycle import check_dense, save_upcycled, upcycle
    from trident.loader import load_checkpoint

    config = UpcycleConfig(num_experts=args.experts, top_k=args.top_k, reinit_fraction=args.reinit_fraction,
                           noise=args.noise, router_std=args.router_std, seed=args.seed)
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model_path(args.model))
    check_dense(checkpoint)
    with Progress(TextColumn("upcycling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("upcycle", total=checkpoint.config.num_layers)
        result = upcycle(checkpoint, config, progress=lambda _: bar.advance(task))
    files = save_upcycled(result, checkpoint, out)
    seconds = time.perf_counter() - t0
    _print_table(console, args, config, result)
    record = {"kind": "upcycle", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "source_format": checkpoint.format, "out": out, "files": files,
              "seconds": seconds, "config": asdict(config),
              "file_bytes_before": checkpoint.file_bytes,
              "file_bytes_after": os.path.getsize(os.path.join(out, "model.safetensors")), **result.as_dict()}
    console.print(f"mixture of experts written to {out}; record written to "
                  f"{bench_report.write_json(record, args.json, 'upcycle')}")
    return 0


def _print_table(console, args, config: UpcycleConfig, result) -> None:
    from rich.table import Table

    table = Table(title=f"trident upcycle {args.model}: {config.num_experts} experts, top-{config.top_k}, "
                  f"reinit {config.reinit_fraction:g}, noise {config.noise:g}, router std {config.router_std:g}")
    for name in ("", "dense", "mixture of experts"):
        table.add_column(name, justify="left" if not name else "right")
    table.add_row("parameters", f"{result.params_dense:,}", f"{result.params_moe:,}")
    table.add_row("active per token", f"{result.params_dense:,}", f"{result.params_active:,}")
    layers = result.layers
    table.add_row("experts' distance from the dense MLP", "",
                  f"{sum(r.distance_from_dense for r in layers) / len(layers):.4f}")
    table.add_row("distance between experts", "",
                  f"{sum(r.distance_between_experts for r in layers) / len(layers):.4f}")
    table.caption = ("distances: relative Frobenius norms over w1, w3, w2 (|| . || / ||dense MLP||), mean over "
                     f"layers; {layers[0].reinit_neurons} neurons re-initialised per expert and layer")
    console.print(table)
