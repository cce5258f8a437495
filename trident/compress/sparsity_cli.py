"""`trident prune MODEL --structure unstructured|2:4 [--sparsity S] [--method l1|wanda] [--calib TEXT] --out DIR
[--json FILE]`: the masks of trident/compress/sparsity.py written into a Hugging Face folder (config.json marked
``trident_sparsity``, model.safetensors with the zeros in, the tokenizer); prints a per-layer table of the zeros
and writes a JSON record (every masked projection's zeros before and after)."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

from trident.cli_args import new_output_folder
from trident.compress.sparsity import SparsityConfig
from trident.errors import TridentError


def run_mask_prune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from trident.bench import report as bench_report
    from trident.compress.prune import Shape
    from trident.compress.prune_cli import calibration_norms, load_calibration_tokens, load_float_checkpoint
    from trident.compress.sparsity import masked_tensors
    from trident.quant.gptq_config import CalibrationConfig

    if args.targets is not None:
        raise TridentError(f"--targets chooses what structured pruning removes; --structure {args.structure} masks "
                           "every decoder projection (q, k, v, o, gate, up, down): drop --targets")
    config = SparsityConfig(args.structure, args.sparsity, args.method)
    if config.method == "wanda" and args.calib is None:
        raise TridentError("--method wanda scores by activations: add --calib TEXT (shakespeare, kjv or a UTF-8 "
                           "file)")
    if config.method != "wanda" and args.calib is not None:
        raise TridentError(f"--method {config.method} reads the weights only; drop --calib or use --method wanda")
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_float_checkpoint(args.model)
    shape = Shape.of(checkpoint.config)
    norms = calib_record = None
    if config.method == "wanda":
        calib = CalibrationConfig(args.calib, samples=args.calib_samples, seq_len=args.calib_seq_len)
        tokens = load_calibration_tokens(checkpoint, calib, args.model)
        calib_record = tokens.as_dict()
        norms = calibration_norms(checkpoint, tokens.token_ids, calib.batch_size, console)
    tensors, modules = masked_tensors(checkpoint.tensors, shape, config, norms)
    files = save_masked(checkpoint, config, tensors, out)
    masked = sum(m.out_features * m.in_features for m in modules)
    record = {"kind": "prune", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "source_format": checkpoint.format, "structure": config.pattern, "method": config.method,
              "sparsity": config.sparsity, "out": out, "files": files, "seconds": time.perf_counter() - t0,
              "calibration": calib_record, "params": sum(t.numel() for t in checkpoint.tensors.values()),
              "masked_params": masked, "zeros_before": sum(m.zeros_before for m in modules),
              "zeros_after": sum(m.zeros_after for m in modules),
              "modules": [{"name": m.name, "shape": [m.out_features, m.in_features], "zeros_before": m.zeros_before,
                           "zeros_after": m.zeros_after} for m in modules]}
    _print_table(console, record, shape.num_layers)
    console.print(f"masked model written to {out}; report written to "
                  f"{bench_report.write_json(record, args.json, 'prune')}")
    return 0


def save_masked(checkpoint, config: SparsityConfig, tensors: dict, out_dir: str) -> list[str]:
    """Write the masked folder: config.json (:func:`trident.compress.sparsity.sparse_hf_config`),
    model.safetensors (every tensor under its Hugging Face name, source dtypes) and the source's tokenizer."""
    from trident.compress.sparsity import sparse_hf_config
    from trident.quant.format import write_hf_folder

    return write_hf_folder(out_dir, tensors, sparse_hf_config(checkpoint.hf_config, config), checkpoint)


def _print_table(console, record: dict, num_layers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trident prune {record['model']}: {record['structure']} {record['method']}, sparsity "
                  f"{record['sparsity']:g} of the decoder projections")
    for name in ("layer", "masked weights", "zeros before", "zeros after", "zero fraction"):
        table.add_column(name, justify="right")
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        modules = [m for m in record["modules"] if m["name"].startswith(prefix)]
        total = sum(m["shape"][0] * m["shape"][1] for m in modules)
        after = sum(m["zeros_after"] for m in modules)
        table.add_row(str(layer), f"{total:,}", f"{sum(m['zeros_before'] for m in modules):,}", f"{after:,}",
                      f"{after / total:.1%}")
    table.caption = (f"zeros in the decoder projections {record['zeros_before']:,} -> {record['zeros_after']:,} of "
                     f"{record['masked_params']:,} ({record['zeros_after'] / record['masked_params']:.1%}); "
                     f"{record['masked_params'] / record['params']:.1%} of the model's {record['params']:,} "
                     "parameters are masked (embeddings, head and norms never)")
    Console(width=max(console.width, 110)).print(table)
