"""`trident prune MODEL --sparsity S [--targets mlp,heads] [--method l1|wanda|taylor] [--calib TEXT] --out DIR
[--json FILE]`: structured pruning (trident/compress/prune.py) written as a Hugging Face folder (config.json with
the new sizes, model.safetensors, the tokenizer) that trident and transformers load; prints a per-layer table and
writes a JSON record (parameters before and after per layer, the kept channel and KV-group indices).

``--structure unstructured|2:4`` masks weights instead (trident/compress/sparsity.py, run by
trident/compress/sparsity_cli.py): same shapes, zeros written in, config.json marked ``trident_sparsity``."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

from trident.cli_args import model_path, new_output_folder
from trident.compress.prune import METHODS, NEEDS_CALIBRATION, TARGETS, PruneConfig
from trident.compress.sparsity import PATTERNS
from trident.errors import TridentError

DEFAULT_CALIB_SAMPLES = 16
DEFAULT_CALIB_SEQ_LEN = 512
"""16 x 512 = 8,192 calibration tokens: the norms of 576 or 1,536 features settle well before that, and one
forward pass over them takes seconds on the CPU for a 135M model."""

PRUNE_DESCRIPTION = (
    "Structured pruning of a dense Llama-form model (llama, mistral, qwen2, qwen3): removes whole MLP channels (a "
    "row of gate_proj and up_proj, a column of down_proj) and whole attention KV groups (a key/value head with the "
    "query heads that read it, so grouped-query attention stays consistent), the same number in every layer: "
    "--sparsity of each, rounded half up (MLP sizes to a multiple of 8 when the original is one; at least one "
    "group kept). The units kept are those of highest importance: --method l1 (sum of |W| over the unit's "
    "weights), wanda (sum of |W| times the L2 norm of its input feature over --calib's tokens: a named "
    "corpus's calib slice or a whole file) or taylor (|sum of W * dL/dW| over the unit's weights, L the mean NLL "
    "of --calib's tokens, gradients through transformers). Writes a Hugging Face folder with the new sizes and "
    "head_dim in config.json; compare with: trident eval ppl ORIGINAL OUT --text TEXT. --structure unstructured "
    "or 2:4 masks instead: in every decoder projection (q, k, v, o, gate, up, down) the lowest-scoring weights "
    "of each output row (unstructured: --sparsity of the row; 2:4: two of every four consecutive inputs) become "
    "zeros, by --method l1 (|W|) or wanda (|W| times its input's L2 norm over --calib); shapes stay, config.json "
    "gets trident_sparsity, and on CUDA --sparse-kernel runs a 2:4 folder's projections as semi-structured sparse "
    "matmuls."
)
STRUCTURES = ("structured", *PATTERNS)


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove whole MLP channels and attention KV groups (structured pruning) into a "
                       "smaller Hugging Face folder, or zero weights as unstructured / 2:4 masks (--structure)",
                       description=PRUNE_DESCRIPTION,
                       epilog="See docs/compression.md. Example: trident prune default --sparsity 0.2 --targets "
                       "mlp,heads --method wanda --calib shakespeare --out smollm2-p20")
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or 'default' (the embedded "
                   "model)")
    p.add_argument("--structure", default="structured", choices=STRUCTURES,
                   help="structured: remove whole MLP channels and KV groups (a smaller model); unstructured: zero "
                   "the lowest-scoring weights of every row; 2:4: zero two of every four consecutive weights of a "
                   "row (50%%; NVIDIA sparse tensor cores) (default structured)")
    p.add_argument("--sparsity", type=float, default=None, help="structured: fraction of MLP channels and KV groups "
                   "removed per layer, e.g. 0.2; unstructured: fraction of every row's weights zeroed; 2:4: 0.5 or "
                   "omitted")
    p.add_argument("--targets", type=_targets, default=None, metavar="LIST",
                   help=f"structured: what to prune, comma separated: {', '.join(TARGETS)} (default: both)")
    p.add_argument("--method", default="l1", choices=list(METHODS),
                   help="importance: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()) + " (default l1)")
    p.add_argument("--calib", default=None, metavar="TEXT", help="calibration text of --method wanda / taylor: "
                   "shakespeare "
                   "or kjv (their calib slice) or a UTF-8 file (whole)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, metavar="N",
                   help=f"calibration sequences (default {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN, metavar="L",
                   help=f"tokens per calibration sequence (default {DEFAULT_CALIB_SEQ_LEN})")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the report (default: bench-results/prune-TIME.json)")
    p.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    if args.structure != "structured":
        from trident.compress.sparsity_cli import run_mask_prune

        return run_mask_prune(args)
    if args.sparsity is None:
        raise TridentError("structured pruning needs --sparsity: the fraction of MLP channels and KV groups removed, "
                           "e.g. --sparsity 0.2")
    from rich.console import Console

    from trident.bench import report as bench_report
    from trident.compress.prune import Shape, layer_parameters, plan_pruning, pruned_tensors
    from trident.quant.gptq_config import CalibrationConfig

    config = PruneConfig(sparsity=args.sparsity, targets=tuple(args.targets or TARGETS), method=args.method)
    needs_calib = config.method in NEEDS_CALIBRATION
    if needs_calib and args.calib is None:
        raise TridentError(f"--method {config.method} scores by activations: add --calib TEXT (shakespeare, kjv or "
                           "a UTF-8 file)")
    if not needs_calib and args.calib is not None:
        raise TridentError(f"--method {config.method} reads the weights only; drop --calib or use --method wanda "
                           "or taylor")
    calib = CalibrationConfig(args.calib, samples=args.calib_samples, seq_len=args.calib_seq_len) if needs_calib \
        else None
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_float_checkpoint(args.model)
    shape = Shape.of(checkpoint.config)
    norms = products = calib_record = None
    if calib is not None:
        tokens = load_calibration_tokens(checkpoint, calib, args.model)
        calib_record = tokens.as_dict()
        if config.method == "wanda":
            norms = calibration_norms(checkpoint, tokens.token_ids, calib.batch_size, console)
        else:
            from trident.compress.taylor import weight_gradient_products

            with console.status("gradients of the calibration loss (transformers)"):
                products = weight_gradient_products(checkpoint.tensors, checkpoint.hf_config, tokens.token_ids,
                                                    batch_size=calib.batch_size)
    plan = plan_pruning(checkpoint.tensors, shape, config, norms, products)
    tensors = pruned_tensors(checkpoint.tensors, plan)
    files = save_pruned(checkpoint, plan, tensors, out)
    layers = [{"layer": layer.index, "params_before": layer_parameters(checkpoint.tensors, layer.index),
               "params_after": layer_parameters(tensors, layer.index), "kept_channels": layer.channels,
               "kept_groups": layer.groups} for layer in plan.layers]
    record = {"kind": "prune", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "source_format": checkpoint.format, "method": config.method, "targets": list(config.targets),
              "sparsity": config.sparsity, "out": out, "files": files, "seconds": time.perf_counter() - t0,
              "calibration": calib_record,
              "intermediate_size": [shape.intermediate_size, plan.intermediate_size],
              "num_attention_heads": [shape.num_heads, plan.num_heads],
              "num_key_value_heads": [shape.num_kv_heads, plan.num_kv_heads], "head_dim": shape.head_dim,
              "params_before": sum(t.numel() for t in checkpoint.tensors.values()),
              "params_after": sum(t.numel() for t in tensors.values()), "layers": layers}
    _print_table(console, record)
    console.print(f"pruned model written to {out}; report written to "
                  f"{bench_report.write_json(record, args.json, 'prune')}")
    return 0


def load_float_checkpoint(model_name: str):
    """The model to prune or mask; a quantized folder is refused (prune the original, then quantize)."""
    from trident.loader import load_checkpoint

    checkpoint = load_checkpoint(model_path(model_name))
    if checkpoint.quantization is not None:
        raise TridentError(f"{model_name} is quantized; prune the original model (then quantize the pruned folder)")
    return checkpoint


def load_calibration_tokens(checkpoint, calib, model_name: str):
    """--calib's tokens (trident.quant.calibrate.calibration_tokens) with the checkpoint's tokenizer."""
    from trident.quant.calibrate import calibration_tokens

    if checkpoint.tokenizer is None:
        raise TridentError(f"{model_name} has no tokenizer; --calib needs one to tokenize the text")
    return calibration_tokens(checkpoint.tokenizer, calib)


def calibration_norms(checkpoint, token_ids, batch_size: int, console):
    """Every decoder layer's projection-input L2 norms over ``token_ids``, the model run by trident in float32 on
    the CPU (trident.compress.prune.activation_norms)."""
    from trident.compress.prune import activation_norms
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config

    engine = LLMEngine(engine_config(checkpoint.path, dtype="float32", device="cpu"), checkpoint)
    with console.status("activation norms on the calibration tokens"):
        return activation_norms(engine.model, token_ids, batch_size=batch_size)


def save_pruned(checkpoint, plan, tensors: dict, out_dir: str) -> list[str]:
    """Write the pruned folder: config.json (:func:`trident.compress.prune.pruned_hf_config`), model.safetensors
    (every tensor under its Hugging Face name, source dtypes) and the source's tokenizer. Returns the files."""
    from trident.compress.prune import pruned_hf_config
    from trident.quant.format import write_hf_folder

    return write_hf_folder(out_dir, tensors, pruned_hf_config(checkpoint.hf_config, plan), checkpoint)


def _print_table(console, record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    inter, heads, kv = record["intermediate_size"], record["num_attention_heads"], record["num_key_value_heads"]
    table = Table(title=f"trident prune {record['model']}: {record['method']}, sparsity {record['sparsity']:g} of "
                  f"{', '.join(record['targets'])}")
    for name in ("layer", "params before", "params after", "kept", "MLP channels", "KV groups kept"):
        table.add_column(name, justify="right")
    for layer in record["layers"]:
        table.add_row(str(layer["layer"]), f"{layer['params_before']:,}", f"{layer['params_after']:,}",
                      f"{layer['params_after'] / layer['params_before']:.1%}", f"{inter[0]} -> {inter[1]}",
                      ",".join(map(str, layer["kept_groups"])))
    table.caption = (f"MLP {inter[0]} -> {inter[1]} channels, heads {heads[0]} -> {heads[1]}, KV heads {kv[0]} -> "
                     f"{kv[1]} (head_dim {record['head_dim']}) · parameters {record['params_before']:,} -> "
                     f"{record['params_after']:,} ({record['params_after'] / record['params_before']:.1%})")
    Console(width=max(console.width, 110)).print(table)
