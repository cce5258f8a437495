"""`trident eval report ORIGINAL [VARIANT...] --text FILE|shakespeare|kjv` and `trident quantize ... --report`:
variants of one model side by side (trident/compress/variants.py), as a table, a JSON record and optionally a
PNG of perplexity against decode speed."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from trident.compress.eval import PerplexityConfig
from trident.compress.texts import CORPORA
from trident.compress.variants import VariantSettings
from trident.errors import TridentError

DEFAULT_MAX_TOKENS = 4096
"""Tokens of the text the report scores by default (8 windows of 512)."""
DEFAULT_REPORT_TEXT = "shakespeare"
"""The text of ``trident quantize --report`` when --report-text is not given (its eval slice)."""

REPORT_DESCRIPTION = (
    "Variants of one model side by side, the first MODEL being the original: parameters (quantized weights counted "
    "as N x K), bytes of the weight files, resident weight bytes once loaded (every tensor the model holds, copies "
    "derived on first use such as the CPU int4 kernel's re-packed codes included; on CUDA also the peak allocated "
    "memory), perplexity on the same windows of the same text (as trident eval ppl: the windows' fingerprint must "
    "agree), batch-1 prefill and decode tok/s (the latency run of trident bench latency, short), and each "
    "variant's change against the original (perplexity in %, size, memory and speed as variant / original). "
    "Each model is loaded alone, one after the other."
)
REPORT_EPILOG = (
    "Speeds come from a short run on this machine as it is at the time: on a shared machine they are indications, "
    "not benchmark figures (trident bench latency repeats longer runs). See docs/compression.md. Example: trident "
    "eval report default smollm2-int8 smollm2-int4 --text shakespeare --plot variants.png"
)


def add_report_parser(kinds) -> None:
    """``trident eval report`` (``kinds``: the ``trident eval`` subparsers)."""
    from trident.compress.eval_cli import add_text_arguments

    q = kinds.add_parser("report", help="variants of a model side by side: size, memory, perplexity, tok/s",
                         description=REPORT_DESCRIPTION, epilog=REPORT_EPILOG)
    q.add_argument("models", nargs="+", metavar="MODEL",
                   help="the original first (a .gguf file, a Hugging Face folder, or 'default': the embedded "
                   "SmolLM2-135M-Instruct Q4_1 GGUF), then its variants (e.g. trident quantize folders)")
    add_text_arguments(q, max_tokens=DEFAULT_MAX_TOKENS)
    _speed_arguments(q)
    g = q.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--gguf-weights", default="auto", choices=["auto", "native", "dequantize"],
                   help="a GGUF original's Q4_0/Q4_1/Q8_0 weights: native, dequantize, or auto (native on the CPU "
                   "with a 16-bit --dtype)")
    o = q.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the record (default: bench-results/variants-TIME.json)")
    o.add_argument("--plot", default=None, metavar="FILE", help="also write a PNG: perplexity against decode tok/s")
    q.set_defaults(func=run_eval_report)


def _speed_arguments(p) -> None:
    defaults = VariantSettings()
    g = p.add_argument_group("speed (batch-1 latency run, as trident bench latency)")
    g.add_argument("--prompt-len", type=int, default=defaults.prompt_len,
                   help=f"prompt tokens (default {defaults.prompt_len})")
    g.add_argument("--output-len", type=int, default=defaults.output_len,
                   help=f"generated tokens (default {defaults.output_len})")
    g.add_argument("--repeat", type=int, default=defaults.repeat,
                   help=f"latency runs per variant, medians reported (default {defaults.repeat})")


def add_report_arguments(p) -> None:
    """``trident quantize``'s --report flags."""
    g = p.add_argument_group("report (--report: the original and the written folder side by side, as trident "
                             "eval report)")
    g.add_argument("--report", action="store_true",
                   help="after writing --out, measure the original and --out: size on disk, resident memory, "
                   "perplexity, batch-1 tok/s; print a table and write a JSON beside the quantize JSON")
    g.add_argument("--report-text", default=None, metavar="FILE|" + "|".join(CORPORA),
                   help=f"the text to measure perplexity on (default: {DEFAULT_REPORT_TEXT}; a named corpus's eval "
                   "slice, a file whole)")
    g.add_argument("--report-device", default="cpu", choices=["cpu", "cuda"], help="where to measure (default cpu)")
    g.add_argument("--report-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the measurements (default auto)")
    g.add_argument("--report-threads", type=int, default=None, metavar="N",
                   help="CPU threads of the measurements (default: all cores)")
    g.add_argument("--report-max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"tokens of the text scored (default {DEFAULT_MAX_TOKENS:,})")
    g.add_argument("--report-window", type=int, default=PerplexityConfig().window, metavar="W",
                   help=f"tokens per perplexity window (default {PerplexityConfig().window})")
    g.add_argument("--report-plot", default=None, metavar="FILE",
                   help="also write a PNG: perplexity against decode tok/s")


def run_eval_report(args: argparse.Namespace) -> int:
    from trident.compress.eval_cli import perplexity_config_of, read_text

    settings = VariantSettings(perplexity=perplexity_config_of(args), prompt_len=args.prompt_len,
                               output_len=args.output_len, repeat=args.repeat, device=args.device, dtype=args.dtype,
                               threads=args.threads, gguf_weights=args.gguf_weights)
    check_device(settings.device)
    source, which, text = read_text(args.text, args.slice)
    report_variants(args.models, (source, which, text), settings, json_path=args.json, plot_path=args.plot)
    return 0


@dataclass(frozen=True)
class QuantizeReport:
    """``trident quantize --report``: its settings and text, checked before quantizing, measured after."""

    settings: VariantSettings
    text: tuple
    """(source, slice name, sliced text) as read by trident.compress.eval_cli.read_text."""
    plot_path: str | None

    @classmethod
    def of(cls, args: argparse.Namespace) -> QuantizeReport | None:
        """The report --report asks for (None without it); a report flag without --report is refused."""
        from trident.compress.eval_cli import read_text

        given = [f"--{name.replace('_', '-')}" for name in ("report_text", "report_plot")
                 if getattr(args, name) is not None]
        if not args.report:
            if given:
                raise TridentError(f"{', '.join(given)} only apply with --report")
            return None
        settings = VariantSettings(
            perplexity=PerplexityConfig(window=args.report_window, max_tokens=args.report_max_tokens),
            device=args.report_device, dtype=args.report_dtype, threads=args.report_threads)
        check_device(settings.device)
        return cls(settings, read_text(args.report_text or DEFAULT_REPORT_TEXT, None), args.report_plot)

    def run(self, original: str, out: str, quantize_json: str) -> str:
        """Measure ``original`` and ``out``; returns the JSON path (``quantize_json`` ending in -report.json)."""
        stem, _ = os.path.splitext(quantize_json)
        return report_variants([original, out], self.text, self.settings, json_path=f"{stem}-report.json",
                               plot_path=self.plot_path, extra={"quantize_json": quantize_json})


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TridentError("the report asks for cuda, but torch sees no CUDA device here; use cpu")


def report_variants(models, text, settings, *, json_path: str | None, plot_path: str | None,
                    extra: dict | None = None) -> str:
    """Measure ``models`` (the original first) on ``text`` = (source, slice, sliced text), print the table, write
    the JSON (and the PNG); returns the JSON path."""
    from rich.console import Console

    from trident.bench import report as bench_report
    from trident.compress.variants import measure_variants

    source, which, sliced = text
    console = Console()
    result = measure_variants(models, sliced, settings, log=console.log)
    p = settings.perplexity
    device = settings.device
    text_caption = (f"{source.description} · slice {which} · window {p.window}, stride {p.stride_tokens} · "
                    f"{result.num_windows:,} windows, {result.num_scored_tokens:,} scored tokens · fingerprint "
                    f"{result.fingerprint}")
    speed_caption = (f"{device} ({bench_report.device_name(device)}), {result.rows[0].dtype} · batch 1, "
                     f"{settings.prompt_len}-token prompt, {settings.output_len} generated, median of "
                     f"{settings.repeat} runs: a short run on this machine as loaded now, not a benchmark figure")
    _print_table(console, result, [text_caption, speed_caption,
                                   "x: variant / original · resident: every tensor the loaded model holds "
                                   "(derived copies included, KV cache not)"])
    record = {"kind": "variants", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": bench_report.machine(device, settings.threads), "device": device,
              "text": {"source": source.source, "description": source.description, "slice": which,
                       "characters": len(sliced)},
              **(extra or {}), **result.as_dict()}
    path = bench_report.write_json(record, json_path, "variants")
    console.print(f"report written to {path}")
    if plot_path:
        from trident.compress.variants_plot import write_plot

        write_plot(plot_path, result, f"{source.description}, {device}")
        console.print(f"plot written to {plot_path}")
    return path


def _print_table(console, result, captions: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from trident.bench.report import size

    cuda = any(row.cuda_peak_bytes is not None for row in result.rows)
    table = Table(title="trident variants: " + " vs ".join(row.name for row in result.rows))
    columns = ["variant", "weights held as", "params", "disk", "resident", *(["CUDA peak"] if cuda else []),
               "perplexity", "ppl change", "disk x", "memory x", "prefill tok/s", "decode tok/s", "decode x"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("variant", "weights held as") else "right")
    for row, change in zip(result.rows, result.changes()):
        ratios = (["-"] * 3 if change is None else
                  [f"{100 * change.perplexity_change:+.2f}%", f"{change.size_ratio:.2f}x",
                   f"{change.memory_ratio:.2f}x"])
        table.add_row(row.name, row.weights, f"{row.params / 1e6:,.1f}M", size(row.disk_bytes),
                      size(row.resident_bytes), *([size(row.cuda_peak_bytes or 0)] if cuda else []),
                      f"{row.perplexity:.4f}", *ratios, f"{row.prefill_tok_s:,.1f}", f"{row.decode_tok_s:,.1f}",
                      "-" if change is None else f"{change.decode_speedup:.2f}x")
    table.caption = "\n".join(captions)
    Console(width=max(console.width, 170)).print(table)

