"""`trident quantize MODEL --method rtn|gptq|smoothquant|w8a8 --bits 8|4|mixed [--group-size G] [--asymmetric]
[--expert-bits 8|4] [--calib TEXT ...] --out DIR [--json FILE]`: quantize a model's decoder-layer Linear weights
(round to nearest, or GPTQ calibrated on a text) and with --method rtn an MoE model's routed experts (to
--expert-bits, default --bits), write a folder trident loads (see trident/quant/format.py), and report each module's
relative error and the bytes before and after, as a table and a JSON record. ``--bits mixed --avg-bits B --calib
TEXT`` chooses int4 or int8 per module (trident/quant/mixed_cli.py); ``--method smoothquant|w8a8 --bits 8``
quantizes activations too (W8A8, trident/quant/w8a8_cli.py)."""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

from trident.cli_args import DEFAULT_MODEL, model_path, new_output_folder
from trident.compress.variants_cli import add_report_arguments
from trident.errors import TridentError
from trident.quant import GROUP_SIZES
from trident.quant.gptq_cli import GPTQ_FLAGS, add_gptq_arguments, gptq_settings_of, quantize_gptq
from trident.quant.head import HEAD_CHOICES
from trident.quant.w8a8_cli import W8A8_METHODS, run_w8a8

QUANTIZE_DESCRIPTION = (
    "Quantization of every Linear layer of the decoder layers (never the embeddings or the LM head): weights only "
    "(or weights and activations, W8A8: --method w8a8 / smoothquant, below) to int8 or int4, per output channel "
    "or in groups along the input dimension, symmetric or asymmetric: by rounding "
    "to nearest (--method rtn), or by GPTQ (--method gptq --calib TEXT), which quantizes the decoder layers one "
    "after the other on calibration text and spreads each weight's rounding error over the weights not yet "
    "quantized so that every layer's outputs move least (same codes layout, same folder). Writes a Hugging "
    "Face-style folder (config.json with quantization_config, model.safetensors, the "
    "tokenizer) that every trident command loads, and reports each module's relative Frobenius error "
    "||W - deq(W)|| / ||W|| (with GPTQ also the relative output error on the calibration inputs, its own and "
    "round-to-nearest's) and the bytes on disk. Compare quality with: trident eval ppl ORIGINAL OUT --text FILE. "
    "--bits mixed stores each module as int4 (--group-size, default per channel) or int8 (per channel): it "
    "measures how much the calibration loss rises with each module alone at int4 (--calib, its calib slice), "
    "then keeps at int8 the modules with the largest rise per extra bit while the average stored bits per weight "
    "(codes, scales and zero points over the weights) stay within --avg-bits; with --method gptq the "
    "chosen layout is quantized by GPTQ layer after layer (--sensitivity gptq: the rises measured with GPTQ's int4 "
    "codes). "
    "--method w8a8 --bits 8 quantizes the activations too (W8A8): weights int8 per output channel, and each "
    "Linear's input quantized to int8 per token at run time, multiplied as int8 x int8 with int32 sums (the GPU's "
    "int8 tensor cores; torch._int_mm on the CPU). --method smoothquant --bits 8 --calib TEXT first migrates the "
    "activations' outlier channels into the weights (SmoothQuant: for the Linear layers fed by an RMSNorm, input "
    "channel j is divided by s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) in the norm's weight and its weight "
    "column multiplied by it, alpha = --smooth-alpha, maxima over the calibration text; likewise down_proj's inputs "
    "through the up rows of gate_up_proj), then quantizes as w8a8. "
    "Mixture-of-experts models: --method rtn --bits 8 or 4 also quantizes the routed experts, symmetric, to "
    "--expert-bits (default --bits): int8 per output channel and expert (whatever --group-size), int4 per expert, "
    "output channel and --group-size group (run by the fused experts kernels on CUDA); e.g. --bits 8 --expert-bits "
    "4 --group-size 128 stores attention and dense projections as int8 and the experts (most of an MoE model's "
    "bytes) as int4, both in groups of 128 (--group-size applies to every int4 and int8 Linear layer and to int4 "
    "experts). Other methods and --bits mixed leave the experts in the source dtype."
)


def _bits(value: str) -> int | str:
    return value if value == "mixed" else int(value) if value.isdigit() else value


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights to int8/int4 (round-to-nearest or GPTQ), or "
                       "weights and activations to int8 (W8A8, SmoothQuant), into a folder",
                       description=QUANTIZE_DESCRIPTION,
                       epilog="See docs/compression.md. Examples: trident quantize default --bits 4 --group-size 64 "
                       "--out smollm2-rtn-int4; trident quantize default --method gptq --bits 4 --group-size 64 "
                       "--act-order --calib shakespeare --out smollm2-gptq-int4; trident quantize default --bits mixed "
                       "--avg-bits 5.0 --group-size 64 --calib shakespeare --out smollm2-mixed; trident quantize "
                       "default --method smoothquant --bits 8 --calib shakespeare --out smollm2-w8a8")
    p.add_argument("model", metavar="MODEL", help=f"a .gguf file, a Hugging Face folder, or '{DEFAULT_MODEL}' (the "
                   "embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", *W8A8_METHODS],
                   help="rtn: round to nearest (default); gptq: GPTQ error compensation, needs --calib; w8a8: int8 "
                   "weights and int8 per-token activations (--bits 8); smoothquant: w8a8 after SmoothQuant's scale "
                   "migration, needs --calib")
    p.add_argument("--bits", type=_bits, required=True, choices=[8, 4, "mixed"],
                   help="bits per weight: 8, 4, or mixed (int4 or int8 per module under --avg-bits)")
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help="inputs per scale along K (default: one scale per output channel); with --bits mixed, of "
                   "the int4 modules (int8 ones are per channel)")
    p.add_argument("--asymmetric", action="store_true",
                   help="min/max range with an integer zero point per group (default: symmetric, no zero point)")
    p.add_argument("--expert-bits", type=int, default=None, choices=[8, 4],
                   help="--method rtn on an MoE model: the routed experts' bits (default: --bits); int8 experts are "
                   "per output channel, int4 in --group-size groups (per channel without it); always symmetric. "
                   "E.g. --bits 8 --expert-bits 4: int8 attention and dense projections, int4 experts")
    m = p.add_argument_group("mixed bits (--bits mixed)")
    m.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="the most stored bits per weight on average over the quantized modules, scales and zero "
                   "points included (int4 group 64 symmetric is 4.5, int8 per channel about 8.06)")
    m.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens the sensitivities are measured on (default 1024, two windows of 512)")
    m.add_argument("--sensitivity", default=None, choices=["rtn", "gptq"],
                   help="whose int4 codes the sensitivities are measured with (default rtn, with either --method; gptq "
                   "needs --method gptq: each module's GPTQ codes on the float model's inputs)")
    p.add_argument("--lm-head", default="float", choices=HEAD_CHOICES,
                   help="int8: also quantize the LM head, int8 per output channel whatever --bits (a tied head: the "
                   "token embedding table, which lookups then read as int8 too); float keeps it in the source dtype "
                   "(default). --method rtn or gptq with --bits 4 or 8")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the report (default: bench-results/quantize-TIME.json)")
    add_gptq_arguments(p)
    add_report_arguments(p)
    s = p.add_argument_group("SmoothQuant (--method smoothquant)")
    s.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                   help="migration strength in [0, 1] (default 0.5): 1 moves the activations' channel ranges all "
                   "into the weights, 0 the weights' column ranges all into the activations")
    s.add_argument("--smooth-mlp-down", action=argparse.BooleanOptionalAction, default=None,
                   help="also migrate down_proj's inputs through the up rows of gate_up_proj (exact; default on)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize, then with --report measure the original and the folder side by side (its flags and text are
    checked first, so a mistake there stops nothing half-way)."""
    from trident.bench.report import default_json_path
    from trident.compress.variants_cli import QuantizeReport

    report = QuantizeReport.of(args)
    if report is not None:
        args.json = args.json or default_json_path("quantize")  # the report's JSON goes beside it
    code = _quantize(args)
    if report is not None:
        report.run(args.model, os.path.expanduser(args.out), args.json)
    return code


def _quantize(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trident.attention.registry import create_backend
    from trident.bench import report as bench_report
    from trident.loader import load_checkpoint
    from trident.models.build import build_model
    from trident.moe.quant import expert_quant_config, experts_config_of, experts_module_names, quantize_model_experts
    from trident.quant.format import QuantizedModules, save_quantized
    from trident.quant.linear import eligible_modules, quantize_model
    from trident.quant.rtn import QuantConfig, group_size_of

    if args.lm_head != "float" and (args.method in W8A8_METHODS or args.bits == "mixed"):
        raise TridentError("--lm-head int8 applies to --method rtn or gptq with --bits 4 or 8")
    if args.expert_bits is not None and (args.method != "rtn" or args.bits == "mixed"):
        raise TridentError(f"--expert-bits applies to --method rtn with --bits 4 or 8 only: --method {args.method}"
                           f"{' --bits mixed' if args.bits == 'mixed' else ''} leaves the routed experts in the "
                           "source dtype")
    if args.method in W8A8_METHODS:
        return run_w8a8(args)
    if args.smooth_alpha is not None or args.smooth_mlp_down is not None:
        raise TridentError("--smooth-alpha and --[no-]smooth-mlp-down apply to --method smoothquant only")
    if args.bits == "mixed":
        from trident.quant.mixed_cli import DEFAULT_CALIB_TOKENS, run_mixed

        gptq_only = [f"--{name.replace('_', '-')}" for name in GPTQ_FLAGS
                     if name != "calib" and getattr(args, name) is not None]
        if args.method == "rtn" and gptq_only:
            raise TridentError(f"{', '.join(gptq_only)} only apply to --method gptq (round to nearest needs no "
                               "calibration beyond the sensitivities' --calib); add --method gptq or drop them")
        args.calib_tokens = args.calib_tokens or DEFAULT_CALIB_TOKENS
        return run_mixed(args, args.model, gptq_settings_of(args) if args.method == "gptq" else None)
    given = [flag for flag, value in (("--avg-bits", args.avg_bits), ("--calib-tokens", args.calib_tokens),
                                      ("--sensitivity", args.sensitivity)) if value is not None]
    if given:
        raise TridentError(f"{', '.join(given)} only apply to --bits mixed")
    config = QuantConfig(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric)
    experts_config = None if args.expert_bits is None else experts_config_of(config, args.expert_bits,
                                                                             args.group_size)
    gptq_settings = gptq_settings_of(args)
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model_path(args.model))
    if checkpoint.quantization is not None:
        raise TridentError(f"{args.model} is already quantized ({checkpoint.quantization.config}); quantize the "
                           "original model")
    device = torch.device("cpu")
    model = build_model(checkpoint.config, checkpoint.tensors, dtype=torch.float32, device=device,
                        backend=create_backend("torch", device))
    names = eligible_modules(model, config)
    if not names:
        raise TridentError(f"{args.model} has no linear layers to quantize")
    experts = experts_module_names(model) if gptq_settings is None else []
    if args.expert_bits is not None and not experts:
        raise TridentError(f"--expert-bits sets the routed experts' bits; {args.model} is not a mixture-of-experts "
                           "model (no routed experts): drop it")
    for name in names:  # refuse before any work when a shape does not fit the group size
        try:
            group_size_of(config, model.get_submodule(name).in_features)
        except TridentError as e:
            raise TridentError(f"{name}: {e}") from None
    if experts:  # the experts' inputs too, in their format
        plan = QuantizedModules(config, tuple(names), experts=tuple(experts), experts_config=experts_config)
        experts_format = expert_quant_config(*plan.experts_format())
        for name in experts:
            module = model.get_submodule(name)
            for k in (module.gate_up_proj.shape[2], module.intermediate_size):
                try:
                    group_size_of(experts_format, k)
                except TridentError as e:
                    raise TridentError(f"{name} (routed experts): {e}") from None
    gptq_record = {}
    if gptq_settings is not None:
        quant_report, gptq_record = quantize_gptq(model, checkpoint, config, gptq_settings, console)
    else:
        with Progress(TextColumn("quantizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("quantize", total=len(names))
            quant_report = quantize_model(model, config, progress=lambda _: bar.advance(task))
    head = None
    if args.lm_head == "int8":
        from trident.quant.head import head_config, quantize_head

        head = quantize_head(model)
    modules = QuantizedModules(config, (*quant_report.names, *([head] if head else [])),
                               {head: head_config()} if head else {}, method=args.method, experts=tuple(experts),
                               experts_config=experts_config)
    if experts:  # int8 / int4 routed experts (trident/moe/quant.py), in the format the folder records
        quantize_model_experts(model, *modules.experts_format())
    files = save_quantized(model, checkpoint, modules, out)
    seconds = time.perf_counter() - t0
    source_bytes = _source_weight_bytes(checkpoint, model, set(modules.modules))
    out_bytes = os.path.getsize(os.path.join(out, "model.safetensors"))
    totals = {"params_quantized": quant_report.params_quantized,
              "quantized_weight_bytes_before": source_bytes,
              "quantized_weight_bytes_after": sum(m.bytes_after for m in quant_report.modules),
              "file_bytes_before": checkpoint.file_bytes, "file_bytes_after": out_bytes,
              "mean_relative_error": sum(m.relative_error for m in quant_report.modules) / len(quant_report.modules),
              "max_relative_error": max(m.relative_error for m in quant_report.modules),
              **_experts_totals(model, modules), **_head_totals(model, head)}
    _print_table(console, args, quant_report, totals)
    record = {"kind": "quantize", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "source_format": checkpoint.format, "method": args.method, "out": out,
              "files": files, "seconds": seconds, **totals, **gptq_record, **quant_report.as_dict()}
    console.print(f"quantized model written to {out}; report written to "
                  f"{bench_report.write_json(record, args.json, 'quantize')}")
    return 0


def _source_weight_bytes(checkpoint, model, quantized: set[str]) -> int:
    """Bytes the quantized modules' weights took in the source: stored tensor bytes for a folder; for a GGUF
    file (tensors dequantized on load) the ggml types' bits per weight."""
    from trident.quant.format import hf_module_of

    packed = getattr(model, "packed_modules", {})
    total = 0
    for name, tensor in checkpoint.tensors.items():
        if name.endswith(".weight") and hf_module_of(name, packed) in quantized:
            if checkpoint.format == "gguf":
                total += round(tensor.numel() * _GGML_BITS.get(checkpoint.tensor_types.get(name, "F32"), 32) / 8)
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def _experts_totals(model, modules) -> dict:
    """The quantized experts' part of the report (empty for none): the modules, their format (bits, group size
    along K: None per channel) and the bytes of their codes and scales."""
    if not modules.experts:
        return {}
    bits, group_size = modules.experts_format()
    return {"experts": list(modules.experts), "experts_bits": bits, "experts_group_size": group_size,
            "experts_bytes_after": sum(model.get_submodule(name).storage_bytes() for name in modules.experts)}


def _head_totals(model, head: str | None) -> dict:
    """The int8 LM head's part of the report (empty when it stays float): its module and bytes of codes and
    scales."""
    if head is None:
        return {}
    from trident.quant.embedding import QuantizedEmbedding

    module = model.get_submodule(head)
    return {"lm_head": head,
            "lm_head_bytes_after": (module.head if isinstance(module, QuantizedEmbedding) else module).storage_bytes()}


_GGML_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0,
              "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_K": 9.125}


def _print_table(console, args, quant_report, totals: dict) -> None:
    from rich.table import Table

    c = quant_report.config
    table = Table(title=f"trident quantize {args.model}: {args.method} int{c.bits}, {_groups(c.group_size)}, "
                  f"{'symmetric' if c.symmetric else 'asymmetric'}")
    gptq = args.method == "gptq"
    columns = ("module", "shape", "rel. error") + (("output error", "rtn output error") if gptq else ()) + (
        "bytes after",)
    for name in columns:
        table.add_column(name, justify="left" if name == "module" else "right")
    for m in quant_report.modules:
        outputs = (f"{m.output_error:.5f}", f"{m.rtn_output_error:.5f}") if gptq else ()
        table.add_row(m.name, f"{m.out_features}x{m.in_features}", f"{m.relative_error:.5f}", *outputs,
                      f"{m.bytes_after:,}")
    table.caption = (
        f"{totals['params_quantized']:,} parameters quantized · mean relative error "
        f"{totals['mean_relative_error']:.5f} (max {totals['max_relative_error']:.5f}) · quantized weights "
        f"{totals['quantized_weight_bytes_before']:,} -> {totals['quantized_weight_bytes_after']:,} bytes "
        "(scales and zero points counted) · weight files "
        f"{totals['file_bytes_before']:,} -> {totals['file_bytes_after']:,} bytes"
        + (f" · {len(totals['experts'])} experts modules as int{totals['experts_bits']} "
           f"{_groups(totals['experts_group_size'])}, symmetric ({totals['experts_bytes_after']:,} bytes of codes "
           "and scales)" if "experts" in totals else "")
        + (f" · LM head {totals['lm_head']} as int8 per channel ({totals['lm_head_bytes_after']:,} bytes)"
           if "lm_head" in totals else ""))
    console.print(table)


def _groups(group_size: int | None) -> str:
    return "per channel" if group_size is None else f"group {group_size}"
