"""`trident` command line: info, generate, chat, bench, serve, eval, quantize, upcycle, prune, distill, share, advise.

Errors a user can cause (TridentError) are printed as one line, without a stack trace, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping

from trident.config import KV_CACHE_DTYPES
from trident.distributed.cli_args import add_parallel_args
from trident.errors import TridentError

API_KEY_ENV = "TRIDENT_API_KEY"
"""Where ``trident serve`` takes its API key from when --api-key is not given."""
ADMIN_KEY_ENV = "TRIDENT_ADMIN_KEY"
"""Where ``trident serve`` takes its admin key from when --admin-key is not given."""

MODEL_HELP = "a .gguf file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)"


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="attention kernels (auto: triton on CUDA when it imports, else the torch reference)")
    g.add_argument("--experts-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="an MoE model's routed experts (auto: the fused triton kernels for a bfloat16/float16 model "
                   "on CUDA, else the torch reference, which runs decode steps without CUDA graphs)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32)")
    g.add_argument("--gguf-weights", default="auto", choices=["auto", "native", "dequantize"],
                   help="a GGUF file's Q4_0/Q4_1/Q8_0 layer weights: native (kept as int4/int8 codes, run by the "
                   "quantized kernels), dequantize (converted to --dtype), auto (native on the CPU with a 16-bit "
                   "--dtype)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                   "at most 8192 on the CPU)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences batched at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step (default: 512 on the CPU, 8192 on CUDA)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step through the general forward: no CUDA graphs (captured at start-up on CUDA "
                   "otherwise), no lean CPU decode step")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false", default=None,
                   help="plan each step only after the previous one's tokens are back (by default on CUDA the next "
                   "step is planned and launched while the GPU runs the current one)")
    g.add_argument("--sparse-kernel", action="store_true",
                   help="for a folder written by trident prune --structure 2:4, on CUDA in bfloat16/float16: run the "
                   "decoder projections as 2:4 semi-structured sparse matmuls (torch's cuSPARSELt / CUTLASS kernels); "
                   "layers torch refuses stay dense with a log line (default: dense matmuls on the masked weights)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="how the KV cache stores keys and values: auto (the compute dtype), a float dtype, or int8 / "
                   "fp8: quantized on write with one float32 scale per token and KV head, dequantized inside "
                   "attention; about half a bfloat16 cache's bytes, so about twice the blocks for the same memory "
                   "(fp8 on CUDA needs compute capability 8.9+; see docs/compression.md)")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="bytes for the KV cache, e.g. 512MiB or 2GiB (default: 1GiB on the CPU; on CUDA what is "
                   "left of 90%% of the GPU's memory after the weights and an activation reserve; never more than "
                   "--max-num-seqs full-length sequences need)")


def _limit_args(p: argparse.ArgumentParser) -> None:
    from trident.serve.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUED_REQUESTS

    g = p.add_argument_group("limits and safety")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (/health and "
                   f"/metrics stay open); if absent, the environment variable {API_KEY_ENV} is used when set "
                   "(default: no key)")
    g.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                   help="waiting requests beyond the running batch before new ones get 429 with Retry-After "
                   f"(default: {DEFAULT_MAX_QUEUED_REQUESTS})")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a request running longer, answering 408 (default: no limit)")
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"refuse larger request bodies with 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    g.add_argument("--admin-key", default=None, help="enable the admin API (/admin/models, load, unload) for "
                   f"'Authorization: Bearer KEY'; if absent, {ADMIN_KEY_ENV} is used when set (default: the "
                   "admin API is off)")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests (CORS) from this origin, e.g. https://app.example.com "
                   "(repeatable; default: CORS off)")
    g.add_argument("--adaptive", action="store_true",
                   help="hold --slo-tpot-ms: while a model's time per output token (the 90th percentile of its "
                   "recent requests, or its steps now) is above it, it admits requests in waves (only when at most "
                   "one sequence runs), then in strict waves (only when none runs), then lowers its running limit "
                   "(raised again below 70%% of it); every step admits again after 10 s idle (decisions logged and "
                   "counted on /metrics; docs/serving.md)")
    g.add_argument("--slo-tpot-ms", type=float, default=None, metavar="MS",
                   help="the time per output token --adaptive holds, milliseconds")
    g.add_argument("--slo-ttft-ms", type=float, default=None, metavar="MS",
                   help="with --adaptive: a time-to-first-token objective, milliseconds: while a model's recent "
                   "90th percentile is above it and requests wait, new ones go to its --adaptive-fallback")
    g.add_argument("--adaptive-fallback", action="append", default=[], metavar="MODEL=FALLBACK",
                   help="with --adaptive: while MODEL is overloaded (admitting in waves or limited, requests "
                   "waiting), send its new requests to the served model FALLBACK (a lower-precision variant, say) "
                   "if loaded; they come back once MODEL has room (repeatable)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (default: greedy)")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _params(args: argparse.Namespace):
    from trident.engine.request import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def _engine_config(args: argparse.Namespace, model: str | None):
    from trident.engine.llm import engine_config
    from trident.serve.model_spec import parse_size

    extra = {}
    if args.kv_cache_memory is not None:
        extra["memory_budget_bytes"] = parse_size(args.kv_cache_memory, "--kv-cache-memory")
    return engine_config(
        model, device=args.device, dtype=args.dtype, num_threads=args.threads,
        attention_backend=args.attention_backend, experts_backend=args.experts_backend,
        max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, gguf_weights=args.gguf_weights,
        kv_cache_dtype=args.kv_cache_dtype, sparse_kernel=args.sparse_kernel, **extra,
    )


def _engine(args: argparse.Namespace):
    from trident.engine.engine import LLMEngine

    return LLMEngine(_engine_config(args, args.model))


def _stream(engine, prompt_ids: list[int], params, out=sys.stdout) -> tuple[str, dict]:
    """Generate one reply, printing text as it comes; return the text and timing figures."""
    t0 = time.perf_counter()
    request_id = engine.add_request(prompt_ids, params)
    first = None
    text = ""
    try:
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id != request_id:
                    continue
                delta = o.outputs[0].delta_text
                if first is None and o.outputs[0].token_ids:
                    first = time.perf_counter()
                if delta:
                    out.write(delta)
                    out.flush()
                if o.finished:
                    text = o.outputs[0].text
                    tokens = len(o.outputs[0].token_ids)
                    reason = o.outputs[0].finish_reason
    except KeyboardInterrupt:
        engine.abort(request_id)
        raise
    end = time.perf_counter()
    first = first or end
    decode_s = end - first
    return text, {
        "prompt_tokens": len(prompt_ids), "tokens": tokens, "finish_reason": reason,
        "ttft_s": first - t0, "prefill_tok_s": len(prompt_ids) / max(first - t0, 1e-9),
        "decode_tok_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else float("nan"),
    }


def _stats_line(s: dict) -> str:
    return (f"[{s['prompt_tokens']} prompt tokens, {s['tokens']} generated ({s['finish_reason']}); "
            f"time to first token {s['ttft_s'] * 1000:.0f} ms ({s['prefill_tok_s']:.0f} tok/s prefill); "
            f"decode {s['decode_tok_s']:.1f} tok/s]")


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console

    from trident.loader import load_checkpoint
    from trident.loader.info import describe

    Console().print(describe(load_checkpoint(args.model)))
    return 0


def _text_engine(args: argparse.Namespace, command: str):
    """Engine, sampling parameters and tokenizer for a command that works on text."""
    params = _params(args)  # validate before loading anything
    engine = _engine(args)
    if engine.tokenizer is None:
        raise TridentError(f"this model has no tokenizer; trident {command} needs one")
    return engine, params, engine.tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    if args.tensor_parallel != 1 or args.expert_parallel:
        return _generate_tensor_parallel(args)
    engine, params, tok = _text_engine(args, "generate")
    return _generate(engine, params, tok, args)


def _generate_tensor_parallel(args: argparse.Namespace) -> int:
    """``trident generate --tensor-parallel N``: N ranks (trident/distributed/launch.py), rank 0 printing as
    ``generate`` does. Started by torchrun (one process per rank, on one host or several), this process is one rank;
    otherwise it spawns the N ranks on this host. A GGUF file's weights are dequantized unless --gguf-weights says
    otherwise (its quantized token embeddings are not split yet); CPU ranks of a host share its cores unless --threads
    says otherwise."""
    import dataclasses

    from trident.distributed.config import ParallelConfig
    from trident.distributed.launch import launch_ranks, threads_per_rank
    from trident.distributed.shard import check_shardable
    from trident.loader.describe import describe_model

    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel, expert_parallel=args.expert_parallel)
    params = _params(args)  # validate before loading anything
    if args.gguf_weights == "auto":
        args.gguf_weights = "dequantize"
    config = _engine_config(args, args.model)
    if config.device == "cpu" and config.num_threads is None:
        config = dataclasses.replace(config, num_threads=threads_per_rank(parallel.tensor_parallel_size))
    described = describe_model(args.model, config.gguf_weights == "native")  # one error before any rank starts
    check_shardable(described.config, parallel.tensor_parallel_size, parallel.expert_parallel,
                    described.quantization)
    return launch_ranks(parallel, config.device, _generate_rank, (config, params, args))


def _generate_rank(local_rank: int, parallel_config, config, params, args: argparse.Namespace) -> int:
    """One rank of ``generate --tensor-parallel`` (``local_rank``: its index on its host; spawned, hence a
    module-level function)."""
    from trident.distributed.launch import report_errors, run_rank

    def drive(engine) -> int:
        if engine.tokenizer is None:
            raise TridentError("this model has no tokenizer; trident generate needs one")
        return _generate(engine, params, engine.tokenizer, args)

    return report_errors(parallel_config.rank, lambda: run_rank(parallel_config, config, drive, local_rank=local_rank))


def _generate(engine, params, tok, args: argparse.Namespace) -> int:
    """Stream one reply to the prompt, then the speed line."""
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = tok.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
        sys.stdout.write(args.prompt)
    print(f"[loaded in {engine.load_seconds:.2f} s; {engine.kv_cache_summary()}; {engine.decode_summary()}]",
          file=sys.stderr)
    _, stats = _stream(engine, prompt_ids, params)
    print()
    print(_stats_line(stats), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine, params, tok = _text_engine(args, "chat")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = []
    print(f"[loaded in {engine.load_seconds:.2f} s; {engine.kv_cache_summary()}; {engine.decode_summary()}] type a "
          "message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = tok.encode_chat(system + messages)
        try:
            reply, stats = _stream(engine, prompt_ids, params)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        except TridentError as e:  # e.g. the conversation outgrew the context: say so and go on
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        print(_stats_line(stats), file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})


def cmd_bench(args: argparse.Namespace) -> int:
    from trident.bench.run import run_bench

    return run_bench(args)


def serve_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ):
    """The ServeConfig of ``trident serve``'s flags (the API key falls back to $TRIDENT_API_KEY)."""
    from trident.serve.config import ServeConfig

    api_key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV) or None
    admin_key = args.admin_key if args.admin_key is not None else environ.get(ADMIN_KEY_ENV) or None
    adaptive = None
    if args.adaptive:
        from trident.serve.adaptive import AdaptiveConfig

        if args.slo_tpot_ms is None:
            raise TridentError("--adaptive needs --slo-tpot-ms, the time per output token to hold")
        adaptive = AdaptiveConfig(tpot_ms=args.slo_tpot_ms, ttft_ms=args.slo_ttft_ms)
    elif args.slo_tpot_ms is not None or args.slo_ttft_ms is not None:
        raise TridentError("--slo-tpot-ms and --slo-ttft-ms go with --adaptive")
    return ServeConfig(api_key=api_key, max_queued_requests=args.max_queued_requests,
                       request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                       allowed_origins=tuple(args.allowed_origin), admin_key=admin_key, adaptive=adaptive)


def serve_pool_config(args: argparse.Namespace):
    """The PoolConfig of ``trident serve``'s model arguments (validated; nothing loaded)."""
    from trident.serve.server import pool_config

    return pool_config(_engine_config(args, None), paths=args.models, named=args.named_models,
                       aliases=args.alias, config_file=args.config, memory_budget=args.memory_budget,
                       served_model_name=args.served_model_name, fallbacks=args.adaptive_fallback)


def cmd_serve(args: argparse.Namespace) -> int:
    from trident.serve.pool import ModelPool
    from trident.serve.server import serve

    config = serve_config(args)  # validate everything before loading anything
    if args.tensor_parallel != 1 or args.expert_parallel:
        return _serve_tensor_parallel(args, config)
    pool = ModelPool(serve_pool_config(args), config)
    serve(pool, host=args.host, port=args.port, log_level=args.log_level, config=config,
          base_engine=_engine_config(args, None))
    return 0


def _serve_tensor_parallel(args: argparse.Namespace, config) -> int:
    """``trident serve --tensor-parallel N``: one model split over N ranks, rank 0 serving
    (trident/distributed/serve.py). A GGUF file's weights are dequantized unless --gguf-weights says otherwise
    (its quantized token embeddings are not split yet)."""
    from trident.distributed.config import ParallelConfig
    from trident.distributed.serve import ServedModel, check_serve_options, serve_tensor_parallel

    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel, expert_parallel=args.expert_parallel)
    if args.gguf_weights == "auto":
        args.gguf_weights = "dequantize"
    pool_config = serve_pool_config(args)
    check_serve_options(args, pool_config, config)
    spec = pool_config.models[0]
    served = ServedModel(engine=spec.engine, name=spec.name, aliases=dict(pool_config.aliases), serve_config=config,
                         host=args.host, port=args.port, log_level=args.log_level)
    return serve_tensor_parallel(parallel, served)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trident", description="LLM inference engine and compression toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a model's architecture, parameters, dtypes, context and memory")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming, and print tok/s")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_parallel_args(p, "the model", ": attention heads, MLP and expert features, vocabulary",
                      "; the rest stays tensor-parallel")
    _sampling_args(p, max_tokens=128)
    _engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p, max_tokens=512)
    _engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve one or several models over an OpenAI-compatible HTTP API",
                       description="Serve models over an OpenAI-compatible HTTP API, with /metrics (Prometheus), "
                       "/dashboard and an optional admin API. Several models: repeat --model NAME=PATH or use "
                       "--config; each request's \"model\" picks one (or an alias of one). Under "
                       "--memory-budget, a request for a model that is not loaded unloads the least recently "
                       "used idle ones to make room.")
    p.add_argument("models", nargs="*", metavar="MODEL", help=MODEL_HELP + "; served under its file name")
    p.add_argument("--model", dest="named_models", action="append", default=[], metavar="NAME=PATH",
                   help="serve the model at PATH as NAME (repeatable; PATH 'default' is the embedded model)")
    p.add_argument("--alias", action="append", default=[], metavar="ALIAS=NAME",
                   help="another name for a served model, e.g. chat-fast=chat-int8 (repeatable)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a .toml or .json file listing models ([[models]] name, path, dtype, max_model_len, "
                   "kv_cache_memory, max_num_seqs, max_queued_requests, aliases, preload), aliases and "
                   "memory_budget; see docs/serving.md")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="bytes the loaded models (weights + KV caches) may hold together, e.g. 8GiB; the least "
                   "recently used idle model is unloaded to make room (default: no limit)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as \"model\" for a single MODEL (default: its file or folder name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_parallel_args(p, "the one served model", "; rank 0 serves HTTP and schedules, the others follow its steps; "
                      "under torchrun each process is one rank (several hosts); not with several models, "
                      "--memory-budget or the admin API", "; /metrics reports every expert's load")
    _limit_args(p)
    _engine_args(p)
    p.set_defaults(func=cmd_serve)

    from trident.bench.run import add_bench_parser

    add_bench_parser(sub, MODEL_HELP, _engine_args)

    from trident.compress.eval_cli import add_eval_parser

    add_eval_parser(sub, _engine_args, _engine_config)

    from trident.quant.quantize_cli import add_quantize_parser

    add_quantize_parser(sub)

    from trident.compress.upcycle_cli import add_upcycle_parser

    add_upcycle_parser(sub)

    from trident.compress.prune_cli import add_prune_parser

    add_prune_parser(sub)

    from trident.compress.distill_cli import add_distill_parser

    add_distill_parser(sub)

    from trident.compress.share_cli import add_share_parser

    add_share_parser(sub)

    from trident.advise.cli import add_advise_parser

    add_advise_parser(sub, MODEL_HELP, _engine_args, _engine_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TridentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
