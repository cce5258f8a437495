"""`trident quantize MODEL [--method rtn|gptq] --bits mixed --avg-bits B --calib TEXT [--group-size G] [--asymmetric]
[--sensitivity rtn|gptq] --out DIR`: measure each decoder-layer Linear module's sensitivity on the calibration text,
store each as int4 or int8 under the average-bits budget (see trident/quant/mixed.py), write the folder and report
the choice.

With ``--method gptq`` the chosen layout is quantized by GPTQ layer after layer (int8 per channel and int4 group
modules alike). The sensitivities are measured with round-to-nearest's int4 codes by default, or with GPTQ's
(``--sensitivity gptq``: each module's codes computed on the float model's inputs over the GPTQ calibration tokens,
``--calib-samples`` x ``--calib-seq-len`` of the same text). On the default model both met the target, round to
nearest's slightly better on the evaluation text and cheaper (docs/compression.md, Measured (mixed, GPTQ))."""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

from trident.cli_args import model_path, new_output_folder
from trident.errors import TridentError

DEFAULT_CALIB_TOKENS = 1024
"""Calibration tokens the sensitivities are measured on (two windows of CALIB_WINDOW)."""
DEFAULT_SENSITIVITY = "rtn"
"""Whose int4 codes the sensitivities are measured with, whatever the method (see the module docstring)."""
CALIB_WINDOW = 512
"""Tokens per calibration window (fewer when the calibration text is shorter)."""


def calibration_text(source: str) -> tuple[str, str]:
    """The calibration text and its description: a named corpus's ``calib`` slice (never the ``eval`` slice that
    ``trident eval ppl`` measures), or a whole UTF-8 file."""
    from trident.compress.texts import CORPORA, read_source, slice_text

    text = read_source(source)
    which = "calib" if source in CORPORA else "all"
    return slice_text(text.text, which), f"{text.description}, slice {which}"


def run_mixed(args: argparse.Namespace, model_name: str, gptq=None) -> int:
    """``gptq``: the GPTQ settings (:class:`trident.quant.gptq_cli.GPTQSettings`) with --method gptq, else None."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trident.bench import report as bench_report
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.texts import encode_first
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config
    from trident.loader import load_checkpoint
    from trident.quant.format import QuantizedModules, save_quantized
    from trident.quant.gptq_cli import quantize_gptq
    from trident.quant.linear import eligible_modules, quantize_model
    from trident.quant.mixed import (
        MixedConfig,
        check_budget,
        choose_bits,
        decoder_layer_names,
        measure_sensitivities,
        prequantized,
        rtn_quantizer,
    )
    from trident.quant.rtn import QuantConfig, group_size_of

    if args.avg_bits is None or args.calib is None:
        raise TridentError("--bits mixed needs --avg-bits B (the average stored bits per weight, e.g. 5.0) and "
                           "--calib TEXT (a UTF-8 file, or shakespeare / kjv whose calib slice is used)")
    if args.calib_tokens < 2:
        raise TridentError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    sensitivity = args.sensitivity or DEFAULT_SENSITIVITY
    if sensitivity == "gptq" and gptq is None:
        raise TridentError("--sensitivity gptq measures with GPTQ's codes, which needs --method gptq; add it or use "
                           "--sensitivity rtn")
    symmetric = not args.asymmetric
    mixed = MixedConfig(average_bits=args.avg_bits, low=QuantConfig(bits=4, group_size=args.group_size,
                                                                     symmetric=symmetric),
                        high=QuantConfig(bits=8, symmetric=symmetric))
    out = new_output_folder(args.out)
    calib_text, calib_description = calibration_text(args.calib)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model_path(model_name))
    if checkpoint.quantization is not None:
        raise TridentError(f"{model_name} is already quantized; quantize the original model")
    if checkpoint.tokenizer is None:
        raise TridentError(f"{model_name} has no tokenizer; --bits mixed needs one to tokenize the --calib text")
    engine = LLMEngine(engine_config(checkpoint.path, dtype="float32", device="cpu"), checkpoint)
    model = engine.model
    names = eligible_modules(model, mixed.low)
    if not names:
        raise TridentError(f"{model_name} has no linear layers to quantize")
    shapes = []
    for name in names:  # refuse before any work: a shape that does not fit, a budget out of range
        layer = model.get_submodule(name)
        try:
            group_size_of(mixed.low, layer.in_features)
        except TridentError as e:
            raise TridentError(f"{name}: {e}") from None
        shapes.append((layer.out_features, layer.in_features))
    check_budget(shapes, mixed)
    ids = encode_first(checkpoint.tokenizer, calib_text, args.calib_tokens)
    if len(ids) < 2:
        raise TridentError(f"the calibration text {args.calib!r} gives {len(ids)} token; it needs at least 2")
    window = min(CALIB_WINDOW, len(ids), engine.max_model_len)
    ppl_config = PerplexityConfig(window=window)

    def calib_loss() -> float:
        return perplexity(engine, ids, ppl_config).nll

    t_measure = time.perf_counter()
    quantizer = rtn_quantizer
    codes_record: dict = {}
    if sensitivity == "gptq":  # every module's int4 GPTQ codes on the float model's inputs
        codes: dict = {}
        _, codes_record = quantize_gptq(model, checkpoint, mixed.low, gptq, console, install=codes.__setitem__,
                                        label="gptq int4 codes for the sensitivities")
        quantizer = prequantized(codes, mixed.low)
    with Progress(TextColumn(f"sensitivity ({sensitivity} int4 one module at a time)"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("", total=len(names))
        baseline, units = measure_sensitivities(model, names, mixed.low, calib_loss, quantizer=quantizer,
                                                layers=decoder_layer_names(model),
                                                progress=lambda name: bar.update(task, advance=1, description=name))
    measure_seconds = time.perf_counter() - t_measure
    plan = choose_bits(units, mixed)
    gptq_record: dict = {}
    if gptq is None:
        quant_report = quantize_model(model, mixed.low, module_configs=plan.module_configs)
    else:
        quant_report, gptq_record = quantize_gptq(model, checkpoint, mixed.low, gptq, console,
                                                  module_configs=plan.module_configs)
        gptq_record = {"gptq_calibration": gptq_record["calibration"], "gptq": gptq_record["gptq"]}
    mixed_loss = calib_loss()
    modules = QuantizedModules(mixed.low, tuple(quant_report.names), plan.module_configs, method=args.method)
    files = save_quantized(model, checkpoint, modules, out)
    seconds = time.perf_counter() - t0
    reports = {m.name: m for m in quant_report.modules}
    record = {"kind": "quantize", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": model_name, "source_format": checkpoint.format, "method": args.method, "bits": "mixed",
              "sensitivity": sensitivity, "out": out, "files": files, "seconds": seconds,
              "sensitivity_seconds": measure_seconds, **gptq_record,
              **({"sensitivity_codes": codes_record["gptq"]} if codes_record else {}),
              "calibration": {"text": args.calib, "description": calib_description, "tokens": len(ids),
                              "window": window, "loss": "mean NLL of the calibration tokens, nats"},
              "calib_nll_float": baseline, "calib_nll_mixed": mixed_loss,
              "calib_nll_predicted": baseline + sum(u.sensitivity for u in units if u.name not in plan.high_units),
              "params_quantized": quant_report.params_quantized,
              "quantized_weight_bytes_after": sum(m.bytes_after for m in quant_report.modules),
              "file_bytes_before": checkpoint.file_bytes,
              "file_bytes_after": os.path.getsize(os.path.join(out, "model.safetensors")),
              **plan.as_dict()}
    for unit in record["units"]:
        report = reports[unit["name"]]
        unit["relative_error"] = report.relative_error
        if gptq is not None:
            unit["output_error"], unit["rtn_output_error"] = report.output_error, report.rtn_output_error
    _print_table(console, model_name, plan, record)
    console.print(f"quantized model written to {out}; report written to "
                  f"{bench_report.write_json(record, args.json, 'quantize')}")
    return 0


def _print_table(console, model_name: str, plan, record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = plan.config
    groups = "per channel" if c.low.group_size is None else f"group {c.low.group_size}"
    gptq = record["method"] == "gptq"
    table = Table(title=f"trident quantize {model_name}: {record['method']} mixed int4 ({groups}) / int8 (per "
                  f"channel), {'symmetric' if c.low.symmetric else 'asymmetric'}, budget {c.average_bits:g} bits per "
                  f"weight, sensitivities with {record['sensitivity']} codes")
    columns = ("module", "shape", "sensitivity (nats)", "per int8 Mbit", "bits", "rel. error") + (
        ("output error", "rtn output error") if gptq else ())
    for name in columns:
        table.add_column(name, justify="left" if name == "module" else "right")
    for unit in record["units"]:
        outputs = (f"{unit['output_error']:.5f}", f"{unit['rtn_output_error']:.5f}") if gptq else ()
        table.add_row(unit["name"], f"{unit['out_features']}x{unit['in_features']}", f"{unit['sensitivity']:+.5f}",
                      f"{unit['sensitivity'] / unit['extra_bits'] * 1e6:+.5f}", str(unit["bits"]),
                      f"{unit['relative_error']:.5f}", *outputs)
    table.caption = (
        f"{record['num_high_units']} of {record['num_units']} modules int8 · average {record['average_bits']:.4f} "
        f"bits per weight (codes, scales, zero points; all int4 {record['min_average_bits']:.4f}, all int8 "
        f"{record['max_average_bits']:.4f}) · calibration NLL: float {record['calib_nll_float']:.5f}, mixed "
        f"{record['calib_nll_mixed']:.5f} (sum of sensitivities predicts {record['calib_nll_predicted']:.5f}) · "
        f"{record['calibration']['tokens']:,} tokens of {record['calibration']['description']} · sensitivities "
        f"{record['sensitivity_seconds']:.0f} s, total {record['seconds']:.0f} s")
    Console(width=max(console.width, 130)).print(table)
    console.print(f"average bits per weight: {record['average_bits']:.4f} (budget {c.average_bits:g})")
