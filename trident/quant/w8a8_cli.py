"""`trident quantize MODEL --method smoothquant|w8a8 --bits 8 [--calib TEXT] [--smooth-alpha A] --out DIR`: W8A8
(int8 per-channel weights, int8 activations quantized per token at run time; trident/quant/w8a8.py), with
SmoothQuant's scale migration calibrated on a text first (``smoothquant``; trident/quant/smoothquant.py) or
without it (``w8a8``). Writes a ``trident-w8a8`` folder (trident/quant/format.py) whose norm weights are the
migrated ones."""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

from trident.cli_args import model_path, new_output_folder
from trident.errors import TridentError

W8A8_METHODS = ("smoothquant", "w8a8")
"""--method values this module runs."""
DEFAULT_CALIB_SAMPLES = 16
"""Calibration sequences of SmoothQuant (x --calib-seq-len 512 = 8,192 tokens): channel maxima, not Hessians,
need far fewer tokens than GPTQ; outlier channels are a property of the model and show on any text."""


def check_w8a8_args(args: argparse.Namespace) -> None:
    """Refuse the flags --method smoothquant / w8a8 cannot take, with the fix."""
    if args.bits != 8:
        raise TridentError(f"--method {args.method} quantizes weights and activations to int8: use --bits 8")
    if args.group_size is not None or args.asymmetric:
        raise TridentError(f"--method {args.method} stores weights per output channel, symmetric (what the int8 "
                           "matmul's epilogue scales by): drop --group-size / --asymmetric")
    wrong = [flag for flag, value in (("--avg-bits", args.avg_bits), ("--calib-tokens", args.calib_tokens),
                                      ("--damp", args.damp), ("--act-order", args.act_order)) if value is not None]
    if wrong:
        raise TridentError(f"{', '.join(wrong)} do not apply to --method {args.method}")
    if args.method == "smoothquant":
        if args.calib is None:
            raise TridentError("--method smoothquant needs calibration text for the activation ranges: add --calib "
                               "shakespeare (or kjv, or a UTF-8 file)")
    else:
        given = [flag for flag, value in (("--calib", args.calib), ("--calib-samples", args.calib_samples),
                                          ("--calib-seq-len", args.calib_seq_len),
                                          ("--smooth-alpha", args.smooth_alpha),
                                          ("--[no-]smooth-mlp-down", args.smooth_mlp_down)) if value is not None]
        if given:
            raise TridentError(f"--method w8a8 migrates nothing and needs no calibration: drop {', '.join(given)}, "
                               "or use --method smoothquant")


def run_w8a8(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from trident.attention.registry import create_backend
    from trident.bench import report as bench_report
    from trident.loader import load_checkpoint
    from trident.models.build import build_model
    from trident.quant.format import W8A8_METHOD, QuantizedModules, save_quantized
    from trident.quant.w8a8 import quantize_model_w8a8

    check_w8a8_args(args)
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model_path(args.model))
    if checkpoint.quantization is not None:
        raise TridentError(f"{args.model} is already quantized; quantize the original model")
    device = torch.device("cpu")
    model = build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=device,
                        backend=create_backend("torch", device))
    record: dict = {}
    replaced: dict[str, torch.Tensor] = {}
    alpha = None
    if args.method == "smoothquant":
        alpha, replaced, record = _smooth(args, checkpoint, model, console)
    report = quantize_model_w8a8(model)
    if not report.modules:
        raise TridentError(f"{args.model} has no linear layers to quantize")
    modules = QuantizedModules(report.config, tuple(report.names), method=args.method if alpha is not None else "rtn",
                               quant_method=W8A8_METHOD, smooth_alpha=alpha)
    files = save_quantized(model, checkpoint, modules, out, replaced)
    seconds = time.perf_counter() - t0
    totals = {"params_quantized": report.params_quantized,
              "quantized_weight_bytes_after": sum(m.bytes_after for m in report.modules),
              "file_bytes_before": checkpoint.file_bytes,
              "file_bytes_after": os.path.getsize(os.path.join(out, "model.safetensors")),
              "mean_relative_error": sum(m.relative_error for m in report.modules) / len(report.modules),
              "max_relative_error": max(m.relative_error for m in report.modules)}
    _print_table(console, args, report, record, totals)
    full = {"kind": "quantize", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "source_format": checkpoint.format, "method": args.method, "bits": 8,
            "activations": "int8 per token, dynamic", "out": out, "files": files, "seconds": seconds, **totals,
            **record, **report.as_dict()}
    written = bench_report.write_json(full, args.json, "quantize")
    console.print(f"W8A8 model written to {out}; report written to {written}")
    return 0


def _smooth(args: argparse.Namespace, checkpoint, model, console):
    """Calibrate, migrate in place; -> (alpha, the source tensors migration changed by HF name, the report's
    smoothing part)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trident.quant.calibrate import calibration_tokens, run_calibration
    from trident.quant.gptq_config import CalibrationConfig
    from trident.quant.smoothquant import (
        SmoothConfig,
        activation_maxima,
        changed_source_tensors,
        migrate,
        migrated_linears,
    )

    smooth = SmoothConfig(**{k: v for k, v in (("alpha", args.smooth_alpha), ("mlp_down", args.smooth_mlp_down))
                             if v is not None})
    linears = migrated_linears(model, smooth)  # an unsupported model fails before the calibration's work
    calibration = CalibrationConfig(args.calib, samples=args.calib_samples or DEFAULT_CALIB_SAMPLES,
                                    **({} if args.calib_seq_len is None else {"seq_len": args.calib_seq_len}))
    tokens = calibration_tokens(checkpoint.tokenizer, calibration)
    console.log(f"calibrating on {tokens.token_ids.shape[0]} x {tokens.token_ids.shape[1]} tokens of "
                f"{tokens.description} ({tokens.slice} slice, fingerprint {tokens.fingerprint})")
    t0 = time.perf_counter()
    with Progress(TextColumn("activation ranges"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        maxima = activation_maxima(model, linears, lambda: run_calibration(
            model, tokens.token_ids, batch_size=calibration.batch_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total)))
    smoothed = migrate(model, maxima, smooth)
    replaced = changed_source_tensors(model, smoothed)
    record = {"calibration": {**tokens.as_dict(), "batch_size": calibration.batch_size,
                              "seconds": time.perf_counter() - t0},
              "smoothing": {"alpha": smooth.alpha, "min_scale": smooth.min_scale, "max_scale": smooth.max_scale,
                            "mlp_down": smooth.mlp_down,
                            "pairs": [{"source": p.source, "kind": p.kind, "linear": p.linear,
                                       "scale_min": float(p.scales.min()),
                                       "scale_max": float(p.scales.max()),
                                       "activation_spread_before": p.activation_spread_before,
                                       "activation_spread_after": p.activation_spread_after} for p in smoothed]}}
    return smooth.alpha, replaced, record


def _print_table(console, args, report, record: dict, totals: dict) -> None:
    from rich.table import Table

    pairs = {p["linear"]: p for p in record.get("smoothing", {}).get("pairs", [])}
    how = f"SmoothQuant alpha {record['smoothing']['alpha']:g}" if pairs else "no migration"
    table = Table(title=f"trident quantize {args.model}: W8A8 (int8 per-channel weights, int8 per-token "
                  f"activations), {how}")
    for name in ("module", "shape", "rel. error", "input max/median channel (before -> after)", "bytes after"):
        table.add_column(name, justify="left" if name == "module" else "right")
    for m in report.modules:
        p = pairs.get(m.name)
        spread = f"{p['activation_spread_before']:.1f} -> {p['activation_spread_after']:.1f}" if p else "-"
        table.add_row(m.name, f"{m.out_features}x{m.in_features}", f"{m.relative_error:.5f}", spread,
                      f"{m.bytes_after:,}")
    table.caption = (f"{totals['params_quantized']:,} parameters quantized · mean relative weight error "
                     f"{totals['mean_relative_error']:.5f} (max {totals['max_relative_error']:.5f}; of the migrated "
                     f"weights when smoothed) · weight files {totals['file_bytes_before']:,} -> "
                     f"{totals['file_bytes_after']:,} bytes")
    console.print(table)
