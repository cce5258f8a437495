"""`trident share MODEL --groups auto|RUNS|none [--num-shared K] [--criterion nll|cosine] [--merge first|mean]
[--share-norms] [--calib TEXT] [--eval TEXT] [--rss] --out DIR [--json FILE]`: cross-layer weight sharing
(trident/compress/share.py, share_choice.py) written as a Hugging Face-style folder whose shared layers have no
tensors of their own (trident/models/shared_layers.py); `trident share --expand SHARED --out DIR` writes the full
copy transformers loads. Prints the adjacent layers' similarity table and the parameters, size, memory and
perplexity before and after, and writes them as JSON."""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone

from trident.cli_args import model_path, new_output_folder
from trident.compress.share import MERGES
from trident.compress.share_choice import CRITERIA
from trident.errors import TridentError

DEFAULT_CALIB_TOKENS = 1024
"""Calibration tokens of ``--criterion nll`` (two windows of 512): each candidate costs one forward over them."""
DEFAULT_EVAL_TOKENS = 4096
"""Tokens of ``--eval``'s perplexity (windows of 512), the first of the text's eval slice."""
WINDOW = 512

SHARE_DESCRIPTION = (
    "Cross-layer weight sharing of a dense Llama-form model (llama, mistral, qwen2, qwen3): runs of adjacent "
    "decoder layers use one set of weight matrices (attention q/k/v/o and MLP gate/up/down; the norms too with "
    "--share-norms), stored once. --groups 4-5,10-12 names the runs; --groups auto --num-shared K picks K layers "
    "that give up their weights, greedily by --criterion nll (the rise of the calibration NLL when a layer joins "
    "its neighbour's group, measured by running the model on --calib) or cosine (weights only). The group's weights "
    "are its first layer's or the mean of its layers' (--merge). --groups none writes the model unshared in the same "
    "float format (the baseline to compare memory with). The folder loads in trident, the shared layers holding "
    "the very same tensors as their group's first; trident share --expand SHARED --out DIR writes a full copy for "
    "Hugging Face transformers."
)


def add_share_parser(sub) -> None:
    p = sub.add_parser("share", help="share weights between adjacent decoder layers (fewer unique parameters)",
                       description=SHARE_DESCRIPTION,
                       epilog="See docs/compression.md (Weight sharing). Example: trident share default --groups auto "
                       "--num-shared 4 --calib shakespeare --eval shakespeare --out smollm2-s4")
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face folder, or 'default' (the embedded "
                   "model); with --expand, a folder written by trident share")
    p.add_argument("--groups", default=None, metavar="RUNS",
                   help="auto (with --num-shared), runs of adjacent layers FIRST-LAST comma separated (e.g. "
                   "4-5,10-12), or none")
    p.add_argument("--num-shared", type=int, default=None, metavar="K",
                   help="with --groups auto: how many layers give up their own weights")
    p.add_argument("--criterion", default=None, choices=list(CRITERIA),
                   help="how --groups auto ranks joins: " + "; ".join(f"{k}: {v}" for k, v in CRITERIA.items())
                   + " (default nll)")
    p.add_argument("--merge", default="first", choices=list(MERGES),
                   help="a group's weights: " + "; ".join(f"{k}: {v}" for k, v in MERGES.items()) + " (default first)")
    p.add_argument("--share-norms", action="store_true", help="share the layers' RMSNorm weights too (default: "
                   "each layer keeps its own)")
    p.add_argument("--calib", default=None, metavar="TEXT", help="calibration text of --criterion nll: shakespeare "
                   "or kjv (their calib slice) or a UTF-8 file (whole)")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, metavar="N",
                   help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--eval", default=None, metavar="TEXT", help="also measure the perplexity of the original and of "
                   "the shared model on this text (shakespeare or kjv: their eval slice; or a UTF-8 file)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help=f"tokens of the --eval perplexity (default {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--rss", action="store_true", help="also measure the resident set size each model adds to a "
                   "fresh process (trident/compress/share_memory.py)")
    p.add_argument("--expand", action="store_true", help="MODEL is a shared folder: write it with every layer's "
                   "tensors (for Hugging Face transformers)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the report (default: bench-results/share-TIME.json)")
    p.set_defaults(func=run_share)


def _check_args(args: argparse.Namespace) -> None:
    if args.expand:
        given = [f for f, v in (("--groups", args.groups), ("--num-shared", args.num_shared),
                                ("--calib", args.calib), ("--eval", args.eval)) if v is not None]
        if given:
            raise TridentError(f"--expand copies a shared folder as it is; drop {', '.join(given)}")
        return
    if args.groups is None:
        raise TridentError("--groups is required: auto (with --num-shared K), runs like 4-5,10-12, or none")
    auto = args.groups.strip() == "auto"
    if auto and args.num_shared is None:
        raise TridentError("--groups auto needs --num-shared K (how many layers give up their weights)")
    if not auto and (args.num_shared is not None or args.criterion is not None):
        raise TridentError("--num-shared and --criterion apply to --groups auto only")
    criterion = args.criterion or "nll"
    if auto and criterion == "nll" and args.calib is None:
        raise TridentError("--criterion nll measures on calibration text: add --calib TEXT (shakespeare, kjv or a "
                           "UTF-8 file), or use --criterion cosine")
    if args.calib is not None and not (auto and criterion == "nll"):
        raise TridentError("--calib is read by --groups auto --criterion nll only; drop it")
    for flag, value in (("--calib-tokens", args.calib_tokens), ("--eval-tokens", args.eval_tokens)):
        if value < 2:
            raise TridentError(f"{flag} must be at least 2, got {value}")


def run_share(args: argparse.Namespace) -> int:
    from rich.console import Console

    from trident.bench import report as bench_report
    from trident.loader import load_checkpoint

    _check_args(args)
    out = new_output_folder(args.out)
    console = Console()
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model_path(args.model))
    if args.expand:
        files = write_expanded(checkpoint, out)
        console.print(f"expanded folder ({checkpoint.config.num_layers} layers with their own tensors) written to "
                      f"{out}: {', '.join(files)}")
        return 0
    if checkpoint.quantization is not None:
        raise TridentError(f"{args.model} is quantized; share the original model (then quantize the shared folder)")
    from trident.compress.share import ShareConfig, check_family, parse_groups

    check_family(checkpoint.hf_config)
    num_layers = checkpoint.config.num_layers
    choice = engine = None
    groups_text = args.groups.strip()
    if groups_text == "auto":
        choice, engine = _choose(args, checkpoint, console)
        groups = choice.groups
    elif groups_text == "none":
        groups = ()
    else:
        groups = parse_groups(groups_text, num_layers)
    config = ShareConfig(groups=groups, merge=args.merge, share_norms=args.share_norms)
    record = write_and_measure(args, checkpoint, config, out, engine, console)
    record.update(seconds=time.perf_counter() - t0, choice=_choice_record(choice, args))
    _print_tables(console, record)
    json_path = bench_report.write_json(record, args.json, "share")
    console.print(f"shared model written to {out}; report written to {json_path}")
    return 0


def _float_engine(checkpoint):
    from trident.engine.engine import LLMEngine
    from trident.engine.llm import engine_config

    return LLMEngine(engine_config(checkpoint.path, dtype="float32", device="cpu", enforce_eager=True,
                                   num_blocks=4 * -(-WINDOW // 16) + 4), checkpoint)


def _text_ids(tokenizer, source: str, which_named: str, max_tokens: int, flag: str) -> tuple[list[int], str]:
    from trident.compress.texts import CORPORA, encode_first, read_source, slice_text

    text = read_source(source)
    which = which_named if source in CORPORA else "all"
    ids = encode_first(tokenizer, slice_text(text.text, which), max_tokens)
    if len(ids) < 2:
        raise TridentError(f"{flag} {source!r} gives {len(ids)} token; it needs at least 2")
    return ids, f"{text.description}, slice {which}, {len(ids)} tokens"


def _choose(args, checkpoint, console):
    """(Choice, the float32 engine of the original or None) for --groups auto."""
    from trident.compress.eval import PerplexityConfig, perplexity
    from trident.compress.share import shared_modules
    from trident.compress.share_choice import choose_joins, cosine_cost, nll_cost
    from trident.models.shared_layers import trident_names

    criterion = args.criterion or "nll"
    num_layers = checkpoint.config.num_layers
    if criterion == "cosine":
        return choose_joins(num_layers, args.num_shared, cosine_cost(checkpoint.tensors, args.merge)), None
    if checkpoint.tokenizer is None:
        raise TridentError(f"{args.model} has no tokenizer; --calib needs one to tokenize the text")
    if not 1 <= args.num_shared <= num_layers - 1:
        raise TridentError(f"--num-shared must be between 1 and {num_layers - 1}, got {args.num_shared}")
    ids, args.calib_description = _text_ids(checkpoint.tokenizer, args.calib, "calib", args.calib_tokens, "--calib")
    engine = _float_engine(checkpoint)
    ppl_config = PerplexityConfig(window=min(WINDOW, len(ids), engine.max_model_len))
    modules = trident_names(shared_modules(checkpoint.tensors, args.share_norms))
    cost = nll_cost(lambda: perplexity(engine, ids, ppl_config).nll, engine.model, modules, args.merge)
    with console.status(f"measuring joins on {len(ids)} calibration tokens ({num_layers - 1} + about "
                        f"{2 * args.num_shared} forwards)"):
        return choose_joins(num_layers, args.num_shared, cost), engine


def write_and_measure(args, checkpoint, config, out: str, engine, console) -> dict:
    """Write the shared folder and measure the original and the shared model (parameters, disk, memory, and with
    --eval perplexity); returns the report record."""
    from trident.compress.share import layer_parameters, shared_tensors, unique_parameters
    from trident.compress.share_memory import engine_weight_bytes, rss_of_engine
    from trident.loader import load_checkpoint

    tensors, sharing = shared_tensors(checkpoint.tensors, config)
    files = save_shared(checkpoint, tensors, sharing if config.groups else None, out)
    num_layers = checkpoint.config.num_layers
    record = {"kind": "share", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "source_format": checkpoint.format, "out": out, "files": files,
              "groups": [list(g) for g in config.groups], "num_shared": config.num_shared, "merge": config.merge,
              "share_norms": config.share_norms, "shared_modules": list(sharing.modules),
              "mapping": {str(t): s for t, s in config.mapping.items()},
              "params_before": unique_parameters(checkpoint.tensors), "params_after": unique_parameters(tensors),
              "disk_bytes_before": checkpoint.file_bytes,
              "disk_bytes_after": os.path.getsize(os.path.join(out, "model.safetensors")),
              "layers": [{"layer": i, "params_before": layer_parameters(checkpoint.tensors, i),
                          "params_after": layer_parameters(tensors, i), "source": config.mapping.get(i)}
                         for i in range(num_layers)]}
    shared_checkpoint = load_checkpoint(out)
    engine = engine or _float_engine(checkpoint)
    shared_engine = _float_engine(shared_checkpoint)
    record["weights_bytes_before"] = engine_weight_bytes(engine)
    record["weights_bytes_after"] = engine_weight_bytes(shared_engine)
    record["engine_params_before"] = sum(p.numel() for p in engine.model.parameters())
    record["engine_params_after"] = sum(p.numel() for p in shared_engine.model.parameters())
    if args.eval is not None:
        from trident.compress.eval import PerplexityConfig, perplexity

        ids, description = _text_ids(engine.tokenizer, args.eval, "eval", args.eval_tokens, "--eval")
        ppl_config = PerplexityConfig(window=min(WINDOW, len(ids), engine.max_model_len))
        before = perplexity(engine, ids, ppl_config, progress=True, description="original: perplexity")
        after = perplexity(shared_engine, ids, ppl_config, progress=True, description="shared: perplexity")
        record["eval"] = {"text": description, "window": ppl_config.window, "fingerprint": before.fingerprint,
                          "scored_tokens": before.num_scored_tokens, "ppl_before": before.perplexity,
                          "ppl_after": after.perplexity, "nll_before": before.nll, "nll_after": after.nll}
    del engine, shared_engine
    if args.rss:
        with console.status("resident set size of each model in a fresh process"):
            record["rss_before"] = rss_of_engine(model_path(args.model))
            record["rss_after"] = rss_of_engine(out)
    return record


def save_shared(checkpoint, tensors: dict, sharing, out_dir: str) -> list[str]:
    """Write config.json (the source's, with the sharing keys when ``sharing``), model.safetensors (``tensors``,
    source dtypes) and the source's tokenizer; returns the files written."""
    from trident.compress.prune import ARCHITECTURES
    from trident.models.shared_layers import LAYERS_KEY, MODULES_KEY
    from trident.quant.format import write_hf_folder

    config = {k: v for k, v in checkpoint.hf_config.items() if k not in (LAYERS_KEY, MODULES_KEY)}
    config.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    if sharing is not None:
        config.update(sharing.as_hf())
    return write_hf_folder(out_dir, tensors, config, checkpoint)


def write_expanded(checkpoint, out_dir: str) -> list[str]:
    """Write a shared folder with every layer's tensors (each copy its own: safetensors cannot alias) and without
    the sharing keys, so that Hugging Face transformers loads it."""
    from trident.compress.share import expand_tensors

    sharing = checkpoint.config.shared_layers
    if sharing is None:
        raise TridentError(f"{checkpoint.path} shares no layers (no trident_shared_layers in config.json); nothing "
                           "to expand")
    tensors = expand_tensors(checkpoint.tensors, sharing, checkpoint.config.num_layers)
    seen: set[int] = set()
    unique = {}
    for name, t in tensors.items():
        unique[name] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    return save_shared(checkpoint, unique, None, out_dir)


def _choice_record(choice, args) -> dict | None:
    if choice is None:
        return None
    return {"criterion": args.criterion or "nll", "num_shared": args.num_shared,
            "calibration": getattr(args, "calib_description", None), "measurements": choice.measurements,
            "joins": [{"layer": j.layer, "group": list(j.group), "cost": j.cost} for j in choice.joins],
            "alone": {str(t): c for t, c in choice.alone.items()}}


def _print_tables(console, record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    wide = Console(width=max(console.width, 110))
    choice = record["choice"]
    if choice is not None:
        unit = "NLL rise, nats" if choice["criterion"] == "nll" else "1 - cosine"
        table = Table(title=f"joins of layer t into layer t-1's group, each alone against the original ({unit})")
        for name in ("layer t", "cost alone", "picked (order)"):
            table.add_column(name, justify="right")
        order = {j["layer"]: i + 1 for i, j in enumerate(choice["joins"])}
        for t, cost in choice["alone"].items():
            table.add_row(t, f"{cost:.5f}", str(order.get(int(t), "")))
        wide.print(table)
    mib = 2 ** 20
    table = Table(title=f"trident share {record['model']}: groups "
                  f"{', '.join(f'{a}-{b}' for a, b in record['groups']) or 'none'} ({record['merge']}, "
                  f"{'norms shared' if record['share_norms'] else 'own norms'})")
    for name in ("", "before", "after", "after / before"):
        table.add_column(name, justify="right")
    rows = [("unique parameters", record["params_before"], record["params_after"], "{:,}"),
            ("parameters the engine holds", record["engine_params_before"], record["engine_params_after"], "{:,}"),
            ("weights on disk, MiB", record["disk_bytes_before"] / mib, record["disk_bytes_after"] / mib, "{:.1f}"),
            ("weight storage in the engine (float32), MiB", record["weights_bytes_before"] / mib,
             record["weights_bytes_after"] / mib, "{:.1f}")]
    if "rss_before" in record:
        rows.append(("RSS added by loading + 4 tokens, MiB", record["rss_before"]["rss_added_bytes"] / mib,
                     record["rss_after"]["rss_added_bytes"] / mib, "{:.1f}"))
    if "eval" in record:
        rows.append(("perplexity", record["eval"]["ppl_before"], record["eval"]["ppl_after"], "{:.3f}"))
    for name, before, after, fmt in rows:
        table.add_row(name, fmt.format(before), fmt.format(after), f"{after / before:.3f}")
    if "eval" in record:
        table.caption = f"perplexity on {record['eval']['text']}, windows of {record['eval']['window']}"
    wide.print(table)
