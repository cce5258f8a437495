"""`trident bench offline|latency`: measure trident (and with --compare hf, Hugging Face transformers in
the same process on the same token ids), print a table and write JSON. `trident bench serve` drives a
running server instead (trident/bench/serve.py)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
from datetime import datetime, timezone

from rich.console import Console

from trident.bench.shapes import known_shapes
from trident.distributed.cli_args import add_parallel_args
from trident.errors import TridentError
from trident.quant.head import HEAD_CHOICES, listed_head

BENCH_EPILOG = (
    "Random weights: --shape NAME (one of: " + ", ".join(known_shapes()) + ") or --shape path/to/config.json "
    "builds the model on --device directly, in --dtype, from --weights-seed; --compare hf then runs the very same "
    "tensors in transformers. Offline, --max-num-seqs defaults to every request at once and the KV cache "
    "(--kv-cache-memory) to what every sequence needs at full length. The table shows each engine's fraction of "
    "the decode bandwidth roofline (weights + KV bytes per step over a copy bandwidth measured in the run; "
    "trident/bench/roofline.py). Example: trident bench offline --shape qwen3-0.6b --workload nano --device cuda "
    "--compare hf"
)


def add_bench_parser(sub, model_help: str, engine_args) -> None:
    p = sub.add_parser("bench", help="benchmark: latency (batch 1), offline (many requests batched) or "
                       "serve (online load against a running OpenAI-compatible server)", epilog=BENCH_EPILOG)
    p.add_argument("kind", choices=["latency", "offline", "serve"])
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--shape", default=None, metavar="NAME|CONFIG",
                   help="benchmark random weights of a named shape or of a config.json instead of a model file")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights of --shape (default 0)")
    p.add_argument("--weights", choices=["float", "int8", "int4", "w8a8"], default="float",
                   help="float: the weights in --dtype; int8 / int4: round-to-nearest quantize the decoder layers' "
                   "weights on the device before timing (int8 per channel symmetric, int4 symmetric in groups of "
                   "128; the LM head stays in --dtype unless --lm-head int8), run by the weight-only kernels on "
                   "CUDA, and an MoE model's routed experts too (to --expert-weights, default the same: int8 per "
                   "output channel and expert, int4 per expert, output channel and group; run by the fused experts "
                   "kernels); w8a8: int8 per "
                   "channel weights times int8 per-token activations (the int8 tensor-core kernels on CUDA, "
                   "no SmoothQuant migration; the experts stay in --dtype). --compare hf runs transformers on the "
                   "float weights the codes came from")
    p.add_argument("--group-size", type=int, choices=[0, 32, 64, 128], default=None,
                   help="with --weights int8|int4: the group length along K (0: per channel), of int4 experts too")
    p.add_argument("--expert-weights", choices=["int8", "int4"], default=None,
                   help="with --weights int8|int4 on an MoE model: the routed experts' format (default: as "
                   "--weights): int8 per output channel and expert, int4 in groups of --group-size (default 128); "
                   "e.g. --weights int8 --expert-weights int4 keeps attention and dense projections int8 and "
                   "stores the experts (most of the bytes) as int4")
    p.add_argument("--lm-head", default="float", choices=HEAD_CHOICES,
                   help="with --weights int8|int4: int8 also quantizes the LM head (int8 per output channel; a tied "
                   "head: the embedding table), as `trident quantize --lm-head int8` does; float keeps it in "
                   "--dtype (default)")
    p.add_argument("--workload", choices=["default", "nano", "moe64"], default="default",
                   help="offline workload: default (equal-length prompts), nano (nano-vllm's 256 random prompts "
                   "of 100-1024 tokens, outputs of 100-1024 tokens) or moe64 (TARGETS.md's MoE workload: the same "
                   "draws for 64 prompts of 100-512 tokens, outputs of 100-256); --num-prompts N takes the first N")
    p.add_argument("--compare", choices=["hf", "llama.cpp"], default=None,
                   help="also run a peer on the same workload in this process: hf = Hugging Face transformers "
                   "(offline: its continuous batching; latency: static-cache generate); llama.cpp = llama-cpp-python "
                   "on the same GGUF file (latency on the CPU; an optional install)")
    p.add_argument("--hf-compile", action="store_true",
                   help="latency: let transformers torch.compile its static-cache decode step (on accelerators)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens (latency 241, offline 128; nano: caps each prompt)")
    p.add_argument("--output-len", type=int, default=None,
                   help="generated tokens per request (default 128; nano: caps each output length)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests in the offline or serve workload (default 16; nano 256)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep the prefix cache on (off by default: repetitions would be served from it)")
    p.add_argument("--moe-report", action="store_true",
                   help="for a mixture-of-experts model: also report the expert load of trident's runs (per layer "
                   "imbalance and entropy balance term) and draw a heat map of each expert's share per layer, "
                   "written beside the JSON as a PNG")
    add_parallel_args(p, "trident's model (latency / offline)", "; rank 0 measures and reports, the others follow "
                      "its steps; under torchrun each process is one rank; not with --compare, --weights w8a8 or "
                      "--lm-head int8", "; attention and dense layers stay tensor-parallel")
    p.add_argument("--collective-timing", action="store_true",
                   help="with --tensor-parallel: also time rank 0's collectives (each between two device "
                   "synchronisations) and report the all-reduce share of the timed run; on CUDA with "
                   "--enforce-eager (CUDA graphs replay their collectives unseen); the syncs slow the run a little")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per engine, interleaved; medians reported")
    p.add_argument("--json", default=None, help="where to write results (default: bench-results/KIND-TIME.json)")
    engine_args(p)
    p.set_defaults(max_num_seqs=None)  # resolved per workload (trident/bench/subject.py)
    from trident.bench.serve import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.num_prompts is None:
        args.num_prompts = {"nano": 256, "moe64": 64}.get(args.workload, 16)
    for flag in ("num_prompts", "repeat", "prompt_len", "output_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise TridentError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    tensor_parallel = getattr(args, "tensor_parallel", 1)
    if getattr(args, "collective_timing", False) and tensor_parallel == 1:
        raise TridentError("--collective-timing times the collectives of --tensor-parallel N (N > 1)")
    if getattr(args, "expert_parallel", False) and tensor_parallel == 1:
        raise TridentError("--expert-parallel splits experts over the ranks of --tensor-parallel N (N > 1)")
    if args.kind == "serve":
        if tensor_parallel != 1:
            raise TridentError("`trident bench serve` drives a running server: start it with `trident serve "
                               "--tensor-parallel N` and leave --tensor-parallel out here")
        from trident.bench.serve import run_serve_bench

        return run_serve_bench(args)
    if args.compare == "llama.cpp" and (args.kind != "latency" or args.shape or args.device != "cpu"):
        raise TridentError("--compare llama.cpp runs `trident bench latency` on a GGUF file on the CPU (not --shape, "
                           "not offline, not CUDA)")
    if tensor_parallel != 1:
        from trident.distributed.bench import bench_tensor_parallel

        return bench_tensor_parallel(args)
    from trident.bench.subject import prepare

    return measure(args, prepare(args))


def measure(args: argparse.Namespace, subject, collectives=None) -> int:
    """Run trident (and the peer --compare asks for) on the prepared ``subject``, print the table, write the JSON.
    With tensor parallelism this is rank 0's part (the subject's engine is rank 0's; the others follow its steps);
    ``collectives``: its CollectiveTimer with --collective-timing."""
    from trident.bench import peer_offline, peers, report, trident_side

    console = Console()
    engine, workload = subject.engine, subject.workload
    tp = engine.parallel.size if engine.parallel is not None else 1
    if getattr(args, "moe_report", False):
        if engine.moe_stats() is None:
            raise TridentError(f"--moe-report needs a mixture-of-experts model; {subject.name} "
                               f"({engine.model_config.model_type}) has no experts")
        engine.reset_moe_stats()  # count the benchmark's requests only
    dtype_name = str(engine.dtype).removeprefix("torch.")
    label = dtype_name  # the rows' and title's: the dtype, and the weights' format when quantized
    if tp > 1:
        label += f", tensor parallel {tp}"
    quantization = subject.checkpoint.quantization
    if quantization is not None:
        c = quantization.config
        label += f", {_format_label(c.bits, c.group_size)} weights"
        if quantization.quant_method == "trident-w8a8":
            label += " x int8 per-token activations"
        if quantization.experts and quantization.experts_format() != (c.bits, c.group_size):
            label += f", {_format_label(*quantization.experts_format())} experts"
        if listed_head(quantization.modules) is not None:
            label += ", int8 LM head"
    bound = _roofline(engine, workload, args.kind)
    if args.kind == "latency":
        ours_fn = trident_side.run_latency

        def theirs_fn(model):
            return {**peers.hf_latency(model, workload, compile=args.hf_compile),
                    "method": peers.hf_latency_method(engine.device, args.hf_compile)}
    else:
        ours_fn = trident_side.run_offline

        def theirs_fn(model):
            return peer_offline.hf_offline(model, workload)

    model = peer_error = hf_load_s = None
    peer_name = f"hf-transformers ({dtype_name}{', float weights' if args.weights != 'float' else ''})"
    if args.compare == "hf":
        model, hf_load_s, peer_error = _load_peer(subject)
    elif args.compare == "llama.cpp":
        import time

        import torch

        from trident.bench.peer_llamacpp import llamacpp_latency, load_llamacpp

        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        model = load_llamacpp(subject.name, threads)
        hf_load_s = time.perf_counter() - t0
        peer_name = "llama.cpp (same GGUF file)"

        def theirs_fn(llm):
            return llamacpp_latency(llm, workload, threads)
    # Interleave the engines' repetitions so that drift of a shared machine hits both alike; report medians.
    ours_runs, theirs_runs = [], []
    for i in range(args.repeat):
        console.log(f"repetition {i + 1}/{args.repeat}: trident {args.kind}")
        method = f"paged {engine.kv_format.name} KV ({engine.attention_backend} attention)"
        ours_runs.append({**ours_fn(engine, workload, collectives), "method": method, "tensor_parallel": tp})
        if model is not None and peer_error is None:
            console.log(f"repetition {i + 1}/{args.repeat}: {peer_name} {args.kind}")
            try:
                theirs_runs.append(theirs_fn(model))
            except Exception as e:  # a peer's failure is reported in its row; trident's row stands
                peer_error = f"{type(e).__name__}: {e}"
    bound_tok_s = bound.tok_s if bound else None
    rows = [report.summarize(f"trident ({label})", subject.load_s, ours_runs, None, bound_tok_s, args.kind)]
    if args.compare is not None:
        rows.append(report.summarize(peer_name, hf_load_s, theirs_runs, peer_error, bound_tok_s, args.kind))
    captions = _captions(args, subject, dtype_name, bound)
    if collectives is not None:
        captions.append(_collectives_caption(rows[0], args.device))
    report.print_table(args.kind, f"trident bench {args.kind}: {subject.name}, {label}, {args.device}",
                       rows, captions)
    record = _record(args, subject, dtype_name, bound, rows)
    moe = engine.moe_stats() if getattr(args, "moe_report", False) else None
    if moe is not None:
        from trident.bench.moe_report import moe_caption, moe_record, moe_table

        record["moe"] = moe_record(moe)
        console.print(moe_table(moe, f"expert load: {subject.name}, trident's {args.repeat} repetition(s)"))
        console.print(moe_caption(moe))
    json_path = report.write_json(record, args.json, args.kind)
    console.print(f"results written to {json_path}")
    if moe is not None:
        from trident.bench.moe_report import write_heatmap

        png = os.path.splitext(json_path)[0] + "-moe.png"
        write_heatmap(png, moe, f"expert load (token share): {subject.name}")
        console.print(f"expert-load heat map written to {png}")
    return 0


def _collectives_caption(row: dict, device: str) -> str:
    """What the collectives took of rank 0's timed runs (medians), per kind."""
    first = row["runs"][0]["collectives"]
    kinds = ", ".join(f"{kind} {100 * statistics.median(r['collectives'][kind]['share'] for r in row['runs']):.1f}% "
                      f"({first[kind]['calls']} calls)" for kind in first)
    sync = "between device synchronisations, " if device.startswith("cuda") else ""
    return (f"tensor parallel: the all-reduces took {100 * row['all_reduce_share']:.1f}% of rank 0's timed run "
            f"(median; {sync}waiting for the other ranks included); all collectives: {kinds}")


def _roofline(engine, workload, kind: str):
    """The decode roofline of this workload on this engine's weights and KV dtype, at a bandwidth measured now
    (None for a latency run of a single token, which has no decode step)."""
    from trident.bench import roofline
    from trident.moe.quant import QuantizedFusedExperts
    from trident.quant.linear import QuantizedLinear

    bandwidth = roofline.copy_bandwidth(engine.device)
    # Quantized layers hold their codes, scales and zero points in buffers: counted as stored.
    stored = [(f"{name}.{kind}", t) for name, module in engine.model.named_modules()
              if isinstance(module, QuantizedLinear)
              for kind, t in zip(("qweight", "scales", "zeros"), module.quantized) if t is not None]
    stored += [(f"{name}.{kind}", t) for name, module in engine.model.named_modules()
               if isinstance(module, QuantizedFusedExperts) for kind, t in module.named_buffers()]
    weight_bytes = roofline.decode_weight_bytes(itertools.chain(engine.model.named_parameters(), stored),
                                                engine.model_config.tie_word_embeddings)
    # read as far as routed to (quantized experts: codes and scales)
    expert_bytes = roofline.routed_expert_bytes(itertools.chain(engine.model.named_parameters(), stored))
    kv_element = engine.kv_format.dtype.itemsize  # the codes of a quantized cache (its scales left out)
    prompt_lens, output_lens = workload.prompt_lens, workload.output_lens
    if kind == "latency":
        # The decode rate excludes the first token (prefill's): decode token t reads prompt + 1 + t cached tokens.
        if output_lens[0] < 2:
            return None
        prompt_lens, output_lens = (prompt_lens[0] + 1,), (output_lens[0] - 1,)
    return roofline.decode_roofline(engine.model_config, weight_bytes, kv_element, prompt_lens, output_lens,
                                    bandwidth, expert_bytes)


def _captions(args: argparse.Namespace, subject, dtype_name: str, bound) -> list[str]:
    from trident.bench import report

    workload = subject.workload
    source = f"shape {subject.name} (random weights, seed {args.weights_seed})" if subject.shape else subject.name
    captions = [f"{source} · {dtype_name} · {args.device} ({report.device_name(args.device)}) · workload "
                f"{workload.name}: {len(workload.prompts)} requests, {workload.output_tokens} output tokens"]
    kv_line = _kv_per_token(subject.engine)
    if kv_line["mha_equivalent"] is not None:
        captions.append(f"KV cache per token: {report.size(kv_line['cached'])} (multi-head latent attention: one "
                        f"latent per layer) against {report.size(kv_line['mha_equivalent'])} for the equivalent "
                        f"multi-head cache ({kv_line['mha_equivalent'] / kv_line['cached']:.1f}x)")
    if bound:
        captions.append(f"roofline: copy bandwidth {bound.bandwidth_bytes_s / 1e9:,.0f} GB/s, "
                        f"{report.size(round(bound.weight_bytes_per_step))} of weights per step"
                        f"{' on each rank (its shard)' if subject.engine.parallel else ''}"
                        f"{' (routed experts: expected share under uniform routing)' if bound.expert_bytes else ''}, "
                        f"mean batch {bound.mean_batch:.1f}, "
                        f"mean context {bound.mean_context:.0f} tokens -> {bound.tok_s:,.0f} tok/s")
    return captions


def _format_label(bits: int, group_size: int | None) -> str:
    """``int8 per channel``, ``int4 g128``: a quantized format in the rows' and title's words."""
    return f"int{bits} {'per channel' if group_size is None else f'g{group_size}'}"


def _expert_weights(quantization) -> str | None:
    """The record's ``expert_weights``: ``int8`` / ``int4`` when the routed experts are quantized, None otherwise
    (a dense model, or experts in the model dtype)."""
    return f"int{quantization.experts_format()[0]}" if quantization is not None and quantization.experts else None


def _quantization_record(quantization) -> dict | None:
    """The JSON record's ``quantization``: the layers' config, the quant_method, and the routed experts' format
    (None without quantized experts)."""
    if quantization is None:
        return None
    experts = None
    if quantization.experts:
        bits, group_size = quantization.experts_format()
        experts = {"bits": bits, "group_size": group_size, "modules": len(quantization.experts)}
    return {**dataclasses.asdict(quantization.config), "quant_method": quantization.quant_method,
            "experts": experts}


def _kv_per_token(engine) -> dict:
    """KV-cache bytes per token over all layers as the engine allocated them (its block bytes over the block size)
    and, for multi-head latent attention, what a plain multi-head cache of the same heads would take (None
    otherwise)."""
    element = engine.kv_format.dtype.itemsize
    return {"cached": engine.kv_block_bytes // engine.config.cache.block_size,
            "mha_equivalent": engine.model_config.mha_equivalent_kv_bytes_per_token(element)}


def _record(args: argparse.Namespace, subject, dtype_name: str, bound, rows: list[dict]) -> dict:
    from trident.bench import report

    engine = subject.engine
    record = {
        "kind": args.kind, "model": subject.name, "source": "shape" if subject.shape else "file",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": report.machine(args.device, args.threads),
        "device": args.device, "dtype": dtype_name, "weights": args.weights,
        "lm_head": ("float" if subject.checkpoint.quantization is None
                    or listed_head(subject.checkpoint.quantization.modules) is None else "int8"),
        "expert_weights": _expert_weights(subject.checkpoint.quantization),
        "quantization": _quantization_record(subject.checkpoint.quantization),
        "attention_backend": engine.attention_backend, "experts_backend": engine.experts_backend,
        "engine_options": subject.engine_options, "workload": subject.workload.summary(),
        "tensor_parallel_size": engine.parallel.size if engine.parallel is not None else 1,
        "expert_parallel": engine.parallel is not None and engine.parallel.expert_parallel,
        "collective_timing": bool(getattr(args, "collective_timing", False)),
        "roofline": bound.as_dict() if bound else None,
        "kv_bytes_per_token": _kv_per_token(engine),
        "results": rows,
    }
    if subject.shape:
        record["shape"] = {"name": subject.shape.name, "source": subject.shape.source,
                           "hf_config": subject.shape.hf_config, "weights_seed": args.weights_seed}
    return record


def _load_peer(subject):
    """(model, load seconds, error): transformers with the same weights (a shape) or the same file."""
    import time

    from trident.bench import peers

    engine = subject.engine
    t0 = time.perf_counter()
    try:
        if subject.shape:
            model = peers.load_hf_same_weights(subject.float_checkpoint or subject.checkpoint, engine.dtype,
                                               engine.device)
        else:
            model = peers.load_hf(subject.name, engine.dtype, engine.device)
    except Exception as e:  # reported in the peer's row
        return None, None, f"{type(e).__name__}: {e}"
    return model, time.perf_counter() - t0, None
