"""The GPTQ part of `trident quantize`: its flags (``--calib TEXT`` and the rest), their checks, and the calibrated
quantization of the built model behind a progress bar (trident/quant/calibrate.py does the work)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import NamedTuple

from trident.errors import TridentError
from trident.quant.gptq_config import CalibrationConfig, GPTQConfig

GPTQ_FLAGS = ("calib", "calib_samples", "calib_seq_len", "damp", "act_order")
"""The argparse destinations that only --method gptq takes."""


class GPTQSettings(NamedTuple):
    calibration: CalibrationConfig
    gptq: GPTQConfig


def add_gptq_arguments(p: argparse.ArgumentParser) -> None:
    from trident.compress.texts import CORPORA

    calib, gptq = CalibrationConfig(text=""), GPTQConfig()
    g = p.add_argument_group("calibration and GPTQ (--method gptq; --calib also for --bits mixed and --method "
                             "smoothquant, with --calib-samples / --calib-seq-len)")
    g.add_argument("--calib", default=None, metavar="FILE|" + "|".join(CORPORA),
                   help="calibration text: a named corpus (its calib slice, the first 10%%, which `trident eval ppl` "
                   "never evaluates on) or a UTF-8 file (taken whole); required with --method gptq, --method "
                   "smoothquant and --bits mixed")
    g.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help=f"calibration sequences (default {calib.samples}; smoothquant 16)")
    g.add_argument("--calib-seq-len", type=int, default=None, metavar="L",
                   help=f"tokens per calibration sequence (default {calib.seq_len})")
    g.add_argument("--damp", type=float, default=None,
                   help=f"dampening added to the Hessian's diagonal, relative to its mean (default {gptq.damp})")
    g.add_argument("--act-order", action="store_true", default=None,
                   help="quantize the inputs by decreasing activation energy (groups stay in natural order, their "
                   "scales from the original weight)")


def gptq_settings_of(args: argparse.Namespace) -> GPTQSettings | None:
    """The GPTQ settings of ``args`` (None for --method rtn); a GPTQ flag without --method gptq, or gptq
    without --calib, is a TridentError."""
    given = [f"--{name.replace('_', '-')}" for name in GPTQ_FLAGS if getattr(args, name) is not None]
    if args.method != "gptq":
        if given:
            raise TridentError(f"{', '.join(given)} only apply to --method gptq (round to nearest needs no "
                               "calibration); add --method gptq or drop them")
        return None
    if args.calib is None:
        raise TridentError("--method gptq needs calibration text: add --calib shakespeare (or kjv, or a UTF-8 file)")
    calib = CalibrationConfig(args.calib, **{k: v for k, v in (("samples", args.calib_samples),
                                                             ("seq_len", args.calib_seq_len)) if v is not None})
    gptq = GPTQConfig(**{k: v for k, v in (("damp", args.damp), ("act_order", args.act_order)) if v is not None})
    return GPTQSettings(calib, gptq)


def quantize_gptq(model, checkpoint, config, settings: GPTQSettings, console, *, module_configs=None, install=None,
                  label: str = "gptq") -> tuple[object, dict]:
    """Calibrate and quantize ``model`` in place; -> (QuantReport, the record's ``calibration`` and ``gptq``).
    ``module_configs`` and ``install`` go to :func:`trident.quant.calibrate.gptq_model`; ``label`` names the
    progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trident.quant.calibrate import calibration_tokens, gptq_model

    calibration = settings.calibration
    tokens = calibration_tokens(checkpoint.tokenizer, calibration)
    console.log(f"calibrating on {tokens.token_ids.shape[0]} x {tokens.token_ids.shape[1]} tokens of "
                f"{tokens.description} ({tokens.slice} slice, fingerprint {tokens.fingerprint})")
    t0 = time.perf_counter()
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        report = gptq_model(model, config, settings.gptq, tokens.token_ids, batch_size=calibration.batch_size,
                            progress=lambda done, total, what: bar.update(task, completed=done, total=total,
                                                                          description=what),
                            module_configs=module_configs, install=install)
    seconds = time.perf_counter() - t0
    retried = [m.name for m in report.modules if m.damp != settings.gptq.damp]
    if retried:
        console.log(f"[yellow]damping raised for {len(retried)} modules ({', '.join(retried[:3])}...)")
    modules = report.modules
    return report, {"calibration": {**tokens.as_dict(), "batch_size": calibration.batch_size},
                    "gptq": {**asdict(settings.gptq), "seconds": seconds,
                             "mean_output_error": sum(m.output_error for m in modules) / len(modules),
                             "mean_rtn_output_error": sum(m.rtn_output_error for m in modules) / len(modules)}}
