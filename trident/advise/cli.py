"""`trident advise`: the parser of both modes. ``--fit`` estimates memory from a config (trident/advise/fit_cli.py);
without it, the selection matrix measures variants of the models on this machine against an SLO
(trident/advise/matrix_cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trident.advise.measure import KV_CACHE_DTYPES, WEIGHTS
from trident.advise.slo import SCENARIOS
from trident.config import EngineConfig
from trident.errors import TridentError

DESCRIPTION = """Which model, weights and KV cache meet a target on this machine.

Without --fit: build variants of each MODEL (weights as stored, in float, or quantized to int8 / int4 in memory;
KV caches of --kv-cache-dtypes), measure each here with the bench harness (perplexity on a text, batch-1 TTFT,
throughput and TPOT at each --batch cap; results cached in $TRIDENT_CACHE_DIR/advise), estimate its memory at the
SLO's context, and print the matrix (a row per variant and batch cap) with what meets the SLO (--scenario, or
explicit limits), the recommendation and the commands that serve it.

With --fit: estimate, before loading anything, the memory one engine needs for --max-num-seqs sequences of
--max-model-len tokens (weights as held, KV cache, activations, runtime) against what this device has free. Exit
status 0 when it fits, 1 when it does not."""


def add_advise_parser(sub: argparse._SubParsersAction, model_help: str,
                      engine_args: Callable[[argparse.ArgumentParser], None],
                      engine_config: Callable[[argparse.Namespace, str | None], EngineConfig]) -> None:
    p = sub.add_parser("advise", help="which model, weights and KV cache meet a target here (a measured matrix, or "
                       "--fit: will it fit in memory)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help=model_help + " (several for the matrix)")
    m = p.add_argument_group("the measured matrix")
    m.add_argument("--scenario", default=None, choices=list(SCENARIOS),
                   help="a named SLO: realtime (TTFT <= 200 ms, TPOT <= 50 ms, perplexity <= +10%%, fastest), "
                   "long-context (32K tokens, best quality), high-throughput (most tok/s within +10%% perplexity), "
                   "edge (least memory within +10%%); the limits below replace the scenario's")
    m.add_argument("--ttft-ms", type=float, default=None, help="time to the first token of one request, at most")
    m.add_argument("--tpot-ms", type=float, default=None, help="time per output token with the batch full, at most")
    m.add_argument("--min-throughput", type=float, default=None, help="output tokens a second with the batch full")
    m.add_argument("--min-context", type=int, default=None, help="tokens a sequence must hold; the memory "
                   "estimate is made at it")
    m.add_argument("--max-memory", default=None, metavar="SIZE", help="the memory estimate at most, e.g. 2GiB")
    m.add_argument("--max-perplexity-change", type=float, default=None, metavar="FRACTION",
                   help="perplexity at most this much above the first variant's (0.05: +5%%)")
    m.add_argument("--objective", default=None, choices=["quality", "latency", "throughput", "memory"],
                   help="what ranks the variants that meet the limits (default: the scenario's, else quality)")
    m.add_argument("--variants", default="stored,int8,int4", metavar="W,W,...",
                   help=f"weights to build from each model, of {', '.join(WEIGHTS)} (default: stored,int8,int4; "
                   "int8/int4 apply to models stored in float or GGUF)")
    m.add_argument("--kv-cache-dtypes", default="auto", metavar="D,D,...",
                   help=f"KV caches to try with each, of {', '.join(KV_CACHE_DTYPES)} (default: auto)")
    m.add_argument("--batch", default="1,8", metavar="B,B,...", help="batch caps: sequences at once in each "
                   "throughput run, a matrix row each, the --max-num-seqs advised (default: 1,8)")
    m.add_argument("--text", default="shakespeare", help="perplexity text: shakespeare, kjv or a UTF-8 file")
    m.add_argument("--perplexity-tokens", type=int, default=2048, help="tokens of the text scored (default 2,048)")
    m.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the latency and batch runs")
    m.add_argument("--output-len", type=int, default=32, help="tokens generated in them")
    m.add_argument("--no-cache", action="store_true", help="measure again even where a cached result exists")
    m.add_argument("--plot", default=None, metavar="PNG", help="write the quality / throughput Pareto plot")
    f = p.add_argument_group("--fit")
    f.add_argument("--fit", action="store_true", help="estimate whether one MODEL fits, loading nothing")
    f.add_argument("--shape", default=None, help="instead of MODEL: a named architecture (as `trident bench "
                   "--shape`: qwen3-0.6b, llama3-8b, qwen3-30b-a3b, ...) or a config.json path; no weights needed")
    f.add_argument("--weights", default=None, choices=["float", "int8", "int4", "w8a8"],
                   help="estimate the model's float weights as `trident quantize` would store them (int8 per "
                   "channel, int4 in groups of --group-size; default: as the model is stored)")
    f.add_argument("--group-size", type=int, default=None, help="int4/int8 group size with --weights (0: per "
                   "channel; default: 128 for int4, per channel for int8)")
    f.add_argument("--contexts", default=None, metavar="N,N,...",
                   help="contexts of the 'most sequences' table (default: 2048,8192,32768,131072 up to the "
                   "model's, and --max-model-len)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    engine_args(p)
    p.set_defaults(func=lambda args: cmd_advise(args, engine_config))


FIT_ONLY = ("shape", "weights", "group_size", "contexts")
MATRIX_ONLY = ("scenario", "ttft_ms", "tpot_ms", "min_throughput", "min_context", "max_memory", "max_perplexity_change",
               "objective", "plot")


def cmd_advise(args: argparse.Namespace, engine_config: Callable[[argparse.Namespace, str | None], EngineConfig]
               ) -> int:
    misplaced = [name for name in (MATRIX_ONLY if args.fit else FIT_ONLY) if getattr(args, name) is not None]
    if misplaced:
        flags = ", ".join("--" + name.replace("_", "-") for name in misplaced)
        raise TridentError(f"{flags} {'do not go' if args.fit else 'go only'} with --fit")
    if args.fit:
        from trident.advise.fit_cli import run_fit

        return run_fit(args, engine_config(args, args.models[0] if args.models else None))
    from trident.advise.matrix_cli import run_matrix

    return run_matrix(args)
