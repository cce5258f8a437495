"""Time the fused MoE experts kernels against the torch experts backend on a CUDA device.

``python -m trident.kernels.bench_moe_experts [--json FILE] [--tokens 1 8 64 512] [--no-sweep]
[--weights int8 int4]``: one MoE layer of
Qwen3-30B-A3B (128 experts, top-8, hidden 2048, expert intermediate 768, bfloat16), each token count: the torch
reference backend (TorchExperts: per active expert a gathered matmul pair; it reads the expert counts on the host,
so it runs eagerly and is timed by triton.testing.do_bench), the fused backend with moe_tiles' tiles (captured in a
CUDA graph and timed by its replays, as a decode step runs), and, with the sweep, the fused kernels with each tile
variant of VARIANTS. Calls rotate over ROUTINGS random uniform routings (random router logits, softmax top-k,
renormalised), so that consecutive calls touch different experts and read them from memory rather than the L2.

GB/s counts the bytes of the experts each call touches (the distinct experts of its routing, gate|up and down,
averaged over the rotations); the expected bytes under uniform routing (trident/bench/roofline.py's
E (1 - (1 - k/E)^T) experts) and the time that takes at the H200's 4.3 TB/s are printed beside. Every output is
checked against the torch backend in float32 on the same routing before it is timed; a variant that fails is
recorded with the reason, and the sweep goes on.

``--weights int8`` (``int4``, or both: ``--weights int8 int4``, one table each) also times the same layer with its
experts quantized to int8 per output channel (int4 in groups of INT4_GROUP; trident/moe/quant.py): the fused kernels
on the codes with moe_tiles' tiles and, with the sweep, each of INT8_VARIANTS (INT4_VARIANTS), checked against the
torch backend in float32 on the dequantized weights. Their GB/s count the bytes a quantized call reads: the touched
experts' codes and scales. At one token the CUDA kernels of trident/native/moe_gemv_cuda.cu (what a batch-1 decode
step runs, where nvcc built them and they take the format) are timed too, and with int4 at the token counts it takes
(2 to moe_batched_cuda.MAX_TOKENS) the batched CUDA kernels of trident/native/moe_batched_cuda.cu (column "batched"),
so that one run compares int8 Triton, int4 Triton and int4 batched CUDA per layer; ``--batched-variants
MOEB_BLOCK_M=16,GU_ROWS=128 ...`` times builds of those kernels with other compile-time tiles beside it.

``--dry-run`` runs the same code on a tiny float16 layer with wall-clock timing, to check the script without a GPU
(on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from trident.bench.roofline import expected_active_experts
from trident.kernels.bench_gemv import TimeUs, _checked_us, bench_device, cell, graph_us, wall_us, write_results
from trident.kernels.moe_experts import GemmTiles, MoeTiles, fused_experts, moe_tiles
from trident.moe.experts import TorchExperts

LAYER = ("qwen3-30b-a3b", 128, 8, 2048, 768)
"""(model, experts, top-k, hidden, expert intermediate)."""
TOKENS = (1, 8, 64, 512)
ROUTINGS = 8
"""Routings rotated over (128 experts x 9.4 MB: the 8 experts of one batch-1 routing are 75 MB, beyond the L2)."""
DTYPE = torch.bfloat16
HBM_BYTES_S = 4.3e12
"""The H200's measured device copy bandwidth (TARGETS.md), for the bound printed beside each row."""
VARIANTS = (
    MoeTiles(16, GemmTiles(16, 256, 4, 4), GemmTiles(32, 128, 4, 4)),
    MoeTiles(16, GemmTiles(16, 256, 4, 4), GemmTiles(64, 64, 4, 4)),
    MoeTiles(16, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 3)),
    MoeTiles(16, GemmTiles(16, 512, 4, 3), GemmTiles(32, 256, 4, 3)),
    MoeTiles(16, GemmTiles(16, 128, 2, 5), GemmTiles(16, 256, 2, 4)),
    MoeTiles(32, GemmTiles(64, 64, 4, 3), GemmTiles(64, 64, 4, 3)),
    MoeTiles(64, GemmTiles(64, 64, 4, 3), GemmTiles(128, 64, 4, 3)),
    MoeTiles(64, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 3)),
    MoeTiles(128, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 3)),
)
"""Tiles swept at every token count (block_m 16 to 128; moe_tiles' choices among them)."""
INT8_VARIANTS = (
    MoeTiles(16, GemmTiles(32, 256, 4, 4), GemmTiles(64, 256, 4, 3)),
    MoeTiles(16, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 3)),
    MoeTiles(16, GemmTiles(16, 512, 4, 3), GemmTiles(32, 256, 4, 4)),
    MoeTiles(16, GemmTiles(64, 256, 4, 3), GemmTiles(64, 256, 4, 4)),
    MoeTiles(16, GemmTiles(32, 256, 8, 4), GemmTiles(128, 128, 4, 3)),
    MoeTiles(64, GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3)),
    MoeTiles(64, GemmTiles(64, 64, 4, 3), GemmTiles(128, 64, 4, 3)),
    MoeTiles(128, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 3)),
    MoeTiles(128, GemmTiles(128, 128, 8, 3), GemmTiles(128, 128, 8, 3)),
)
"""int8 tiles swept with --weights int8: bfloat16's (moe_tiles' choices, which int8 takes too), K doubled (half
the bytes per tile leave room), and wider or deeper ones."""
INT4_GROUP = 128
"""--weights int4: the group length along K (a K tile lies inside one group: at most 128 deep)."""
INT4_VARIANTS = (
    MoeTiles(16, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 3)),
    MoeTiles(16, GemmTiles(64, 128, 4, 4), GemmTiles(64, 128, 4, 4)),
    MoeTiles(16, GemmTiles(16, 128, 2, 5), GemmTiles(32, 128, 2, 5)),
    MoeTiles(16, GemmTiles(32, 128, 4, 6), GemmTiles(128, 128, 4, 4)),
    MoeTiles(16, GemmTiles(128, 128, 8, 3), GemmTiles(128, 128, 8, 3)),
    MoeTiles(64, GemmTiles(64, 64, 4, 3), GemmTiles(128, 64, 4, 3)),
    MoeTiles(64, GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 8, 3)),
    MoeTiles(128, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 3)),
    MoeTiles(128, GemmTiles(128, 128, 8, 3), GemmTiles(128, 128, 8, 3)),
)
"""int4 tiles swept with --weights int4: moe_tiles' choices (K cut to the group), wider columns and more stages (a
quarter of bfloat16's bytes per tile), and 128-deep K tiles for the larger row blocks."""
DRY_LAYER = ("dry", 8, 2, 64, 48)
DRY_TOKENS = (1, 20)
DRY_VARIANTS = (MoeTiles(16, GemmTiles(16, 64, 4, 2), GemmTiles(32, 32, 4, 2)),
                MoeTiles(32, GemmTiles(24, 64, 4, 2), GemmTiles(32, 32, 4, 2)))
"""The dry run's second variant cannot compile (tl.arange needs a power of two): the failure path runs too."""
DRY_INT8_VARIANTS = (MoeTiles(16, GemmTiles(16, 64, 4, 2), GemmTiles(32, 32, 4, 2)),)
DRY_INT4_GROUP = 32
"""The dry layer's int4 groups (its expert intermediate is 48: per channel there; the hidden size 64 takes 32)."""
DRY_DTYPE = torch.float16
"""Triton 3.6's CPU interpreter multiplies bfloat16 tl.dot operands as raw bits; float16 it computes right."""


def tiles_name(tiles: MoeTiles) -> str:
    g, d = tiles.gate_up, tiles.down
    return (f"m{tiles.block_m}_gu{g.block_n}x{g.block_k}w{g.num_warps}s{g.num_stages}"
            f"_dn{d.block_n}x{d.block_k}w{d.num_warps}s{d.num_stages}")


def random_routings(num_tokens: int, num_experts: int, top_k: int, count: int, device: torch.device,
                    gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (weights float32 [T, k], expert ids [T, k]) of uniform routing: softmax top-k of random logits,
    renormalised."""
    routings = []
    for _ in range(count):
        probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen), dim=-1)
        weights, ids = probs.topk(top_k, dim=-1)
        routings.append(((weights / weights.sum(dim=-1, keepdim=True)).to(device), ids.to(device)))
    return routings


def eager_us(fn, rotations: int) -> float:
    """Per-call microseconds of eager calls cycling through the rotations (do_bench's median; CUDA only)."""
    calls = iter(range(1 << 62))
    return triton.testing.do_bench(lambda: fn(next(calls) % rotations), return_mode="median") * 1000


def bench_layer(layer: tuple, tokens: tuple[int, ...], variants: tuple[MoeTiles, ...], time_us: TimeUs,
                eager_time_us: TimeUs, device: torch.device, dtype: torch.dtype,
                quantized: tuple[tuple[int, int | None, tuple[MoeTiles, ...]], ...] = (),
                batched_variants: tuple[dict[str, int], ...] = ()) -> list[dict]:
    """One row per token count; each of ``quantized`` (bits, group size or None, tile variants) times the experts
    quantized to int8 / int4 too (the row's keys prefixed int8_ / int4_); ``batched_variants``: compile-time tiles of
    the batched int4 CUDA kernels to time beside their default build (moe_batched_cuda.variant)."""
    model, num_experts, top_k, hidden_size, inter = layer
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden_size, generator=gen) * hidden_size**-0.5).to(device, dtype)
    down = (torch.randn(num_experts, hidden_size, inter, generator=gen) * inter**-0.5).to(device, dtype)
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * dtype.itemsize
    gate_up32, down32 = gate_up.float(), down.float()
    reference = TorchExperts()
    formats = []  # (bits, variants, codes and scales of gate_up and down, their bytes an expert, dequantized)
    for bits, group_size, quantized_variants in quantized:
        from trident.moe.quant import dequantize_experts, quantize_experts

        q_gate_up = quantize_experts(gate_up, bits, group_size if hidden_size % (group_size or 1) == 0 else None)
        q_down = quantize_experts(down, bits, group_size if inter % (group_size or 1) == 0 else None)
        quantized_expert_bytes = sum(t[0].numel() * t.element_size() for t in (*q_gate_up, *q_down))
        formats.append((bits, quantized_variants, q_gate_up, q_down, quantized_expert_bytes,
                        (dequantize_experts(*q_gate_up), dequantize_experts(*q_down))))
    results = []
    for num_tokens in tokens:
        routings = random_routings(num_tokens, num_experts, top_k, ROUTINGS, device, gen)
        hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(device, dtype)
        weights0, ids0 = routings[0]
        expected = reference.forward(hidden.float(), weights0, ids0, gate_up32, down32, "silu")
        touched = sum(ids.unique().numel() for _, ids in routings) / len(routings) * expert_bytes
        expected_bytes = expected_active_experts(num_experts, top_k, num_tokens) * expert_bytes
        row = {"model": model, "experts": num_experts, "top_k": top_k, "hidden": hidden_size, "inter": inter,
               "tokens": num_tokens, "touched_bytes": touched, "expected_bytes": expected_bytes,
               "bound_us": expected_bytes / HBM_BYTES_S * 1e6,
               "ours_config": tiles_name(moe_tiles(num_tokens * top_k, num_experts, hidden_size, inter))}

        def fused(i, tiles=None, hidden=hidden, routings=routings):
            return fused_experts(hidden, *routings[i], gate_up, down, "silu", tiles=tiles)

        def torch_experts(i, hidden=hidden, routings=routings):
            return reference.forward(hidden, *routings[i], gate_up, down, "silu")

        row["torch_us"] = _checked_us(eager_time_us, torch_experts, ROUTINGS, expected)
        row["fused_us"] = _checked_us(time_us, fused, ROUTINGS, expected)
        row["variants_us"] = {tiles_name(v): _checked_us(time_us, lambda i, v=v: fused(i, v), ROUTINGS, expected)
                              for v in variants}
        timed = {v: us for v, us in row["variants_us"].items() if isinstance(us, float)}
        row["best_variant"] = min(timed, key=timed.get) if timed else None
        row["best_us"] = timed.get(row["best_variant"])
        for key in ("torch", "fused", "best"):
            us = row[f"{key}_us"]
            row[f"{key}_GBps"] = touched / us / 1e3 if isinstance(us, float) else None
        for bits, quantized_variants, q_gate_up, q_down, quantized_expert_bytes, (deq_gate_up, deq_down) in formats:
            row.update(_quantized_row(f"int{bits}", hidden, routings, q_gate_up, q_down, reference.forward(
                hidden.float(), weights0, ids0, deq_gate_up, deq_down, "silu"), quantized_variants, time_us,
                touched / expert_bytes * quantized_expert_bytes, batched_variants))
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def _quantized_row(q: str, hidden: torch.Tensor, routings: list, q_gate_up, q_down, expected: torch.Tensor,
                   variants: tuple[MoeTiles, ...], time_us: TimeUs, touched: float,
                   batched_variants: tuple[dict[str, int], ...] = ()) -> dict:
    """The quantized columns of a row (keys prefixed ``q``: int8 / int4): moe_tiles' tiles and each variant, GB/s over
    ``touched`` (codes + scales of the touched experts)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = q_gate_up.codes.shape
    top_k = routings[0][1].shape[1]
    scales = {"gate_up_scales": q_gate_up.scales, "down_scales": q_down.scales}

    def fused(i, tiles=None):
        return fused_experts(hidden, *routings[i], q_gate_up.codes, q_down.codes, "silu", tiles=tiles, **scales)

    row = {f"{q}_touched_bytes": touched,
           f"{q}_config": tiles_name(moe_tiles(num_tokens * top_k, num_experts, hidden_size, two_i // 2)),
           f"{q}_us": _checked_us(time_us, fused, ROUTINGS, expected),
           f"{q}_variants_us": {tiles_name(v): _checked_us(time_us, lambda i, v=v: fused(i, v), ROUTINGS, expected)
                                for v in variants}}
    timed = {v: us for v, us in row[f"{q}_variants_us"].items() if isinstance(us, float)}
    row[f"{q}_best_variant"] = min(timed, key=timed.get) if timed else None
    row[f"{q}_best_us"] = timed.get(row[f"{q}_best_variant"])
    row[f"{q}_cuda_us"] = row[f"{q}_batched_us"] = None
    from trident.native import moe_batched_cuda, moe_gemv_cuda

    weights0, ids0 = routings[0]
    if moe_gemv_cuda.takes(hidden, ids0, q_gate_up.codes, q_down.codes, *scales.values(), "silu"):
        row[f"{q}_cuda_us"] = _checked_us(time_us, lambda i: moe_gemv_cuda.experts(
            hidden, *routings[i], q_gate_up.codes, q_down.codes, "silu", *scales.values()), ROUTINGS, expected)
    row[f"{q}_batched_variants_us"] = {}
    if moe_batched_cuda.takes(hidden, ids0, q_gate_up.codes, q_down.codes, *scales.values(), "silu"):
        row[f"{q}_batched_us"] = _checked_us(time_us, lambda i: moe_batched_cuda.experts(
            hidden, *routings[i], q_gate_up.codes, q_down.codes, "silu", *scales.values()), ROUTINGS, expected)
        for defines in batched_variants:
            lib, why = moe_batched_cuda.variant(defines)
            row[f"{q}_batched_variants_us"][batched_name(defines)] = why if lib is None else _checked_us(
                time_us, lambda i, lib=lib: moe_batched_cuda.experts_stages(
                    hidden, *routings[i], q_gate_up.codes, q_down.codes, "silu", *scales.values(), lib=lib).out,
                ROUTINGS, expected)
    for key in (q, f"{q}_best", f"{q}_cuda", f"{q}_batched"):
        us = row[f"{key}_us"]
        row[f"{key}_GBps"] = touched / us / 1e3 if isinstance(us, float) else None
    return row


def parse_defines(text: str) -> dict[str, int]:
    """``KEY=VALUE,KEY=VALUE`` -> {KEY: VALUE} (integer values)."""
    defines = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        defines[key.strip()] = int(value)
    return defines


def batched_name(defines: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(defines.items()))


def print_quantized_table(rows: list[dict], q: str) -> None:
    """The quantized columns (``q``: int8 / int4) of the rows."""
    print(f"\n{q + ' experts':14} {'T':>4} {'touched MB':>10} {'bf16 us':>9} {q + ' us':>9} {q + ' GB/s':>10} "
          f"{'x bf16':>7}  {q + ' config':44} {'best variant':44} {'best us':>8} {'best GB/s':>9} {'CUDA us':>8} "
          f"{'CUDA GB/s':>9} {'batched us':>10} {'batched GB/s':>12}")
    for r in rows:
        speedup = (r["fused_us"] / r[f"{q}_us"] if isinstance(r["fused_us"], float)
                   and isinstance(r[f"{q}_us"], float) else None)
        print(f"{r['model']:14} {r['tokens']:>4} {r[f'{q}_touched_bytes'] / 1e6:>10.1f} "
              f"{cell(r['fused_us'], '.1f', 9)} {cell(r[f'{q}_us'], '.1f', 9)} {cell(r[f'{q}_GBps'], '.0f', 10)} "
              f"{cell(speedup, '.2f', 7)}  "
              f"{r[f'{q}_config']:44} {r[f'{q}_best_variant'] or '-':44} {cell(r[f'{q}_best_us'], '.1f', 8, '-')} "
              f"{cell(r[f'{q}_best_GBps'], '.0f', 9, '-')} {cell(r[f'{q}_cuda_us'], '.1f', 8, '-')} "
              f"{cell(r[f'{q}_cuda_GBps'], '.0f', 9, '-')} {cell(r[f'{q}_batched_us'], '.1f', 10, '-')} "
              f"{cell(r[f'{q}_batched_GBps'], '.0f', 12, '-')}")
    for r in rows:
        for name, us in r.get(f"{q}_batched_variants_us", {}).items():
            print(f"batched CUDA {name}: T={r['tokens']} " + (f"{us:.1f} us" if isinstance(us, float) else "-"))
    for r in rows:
        for what, us in [(q, r[f"{q}_us"]), ("CUDA", r[f"{q}_cuda_us"]), ("batched CUDA", r[f"{q}_batched_us"]),
                         *r[f"{q}_variants_us"].items(), *r.get(f"{q}_batched_variants_us", {}).items()]:
            if isinstance(us, str):
                print(f"failed: T={r['tokens']} {q} {what}: {us}")


def print_table(rows: list[dict], timing: str) -> None:
    print(f"\n{'layer':14} {'T':>4} {'touched MB':>10} {'bound us':>8} {'torch us':>9} {'fused us':>9} "
          f"{'fused GB/s':>10} {'x torch':>7}  {'best variant':44} {'best us':>8} {'best GB/s':>9}   ({timing})")
    for r in rows:
        speedup = (r["torch_us"] / r["fused_us"] if isinstance(r["torch_us"], float)
                   and isinstance(r["fused_us"], float) else None)
        print(f"{r['model']:14} {r['tokens']:>4} {r['touched_bytes'] / 1e6:>10.1f} {r['bound_us']:>8.1f} "
              f"{cell(r['torch_us'], '.1f', 9)} {cell(r['fused_us'], '.1f', 9)} {cell(r['fused_GBps'], '.0f', 10)} "
              f"{cell(speedup, '.2f', 7)}  {r['best_variant'] or '-':44} {cell(r['best_us'], '.1f', 8, '-')} "
              f"{cell(r['best_GBps'], '.0f', 9, '-')}")
    for r in rows:
        for what, us in [("torch", r["torch_us"]), ("fused", r["fused_us"]), *r["variants_us"].items()]:
            if isinstance(us, str):
                print(f"failed: T={r['tokens']} {what}: {us}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help=f"token counts (default {TOKENS})")
    parser.add_argument("--no-sweep", action="store_true", help="only moe_tiles' tiles and the torch backend")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wall clock: checks the script only")
    parser.add_argument("--weights", choices=["bf16", "int8", "int4"], nargs="+", default=["bf16"],
                        help="int8 / int4 (either or both): also time the experts quantized to int8 per channel / "
                        f"int4 in groups of {INT4_GROUP} (codes + scales), beside bf16")
    parser.add_argument("--batched-variants", nargs="+", default=[], metavar="KEY=VALUE,...",
                        help="with int4: also time the batched CUDA kernels built with these compile-time tiles "
                        "(e.g. MOEB_BLOCK_M=16,GU_ROWS=128; moe_batched_cuda.cu's #ifndef constants)")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.dry_run)
    if args.dry_run:
        layer, tokens, variants, time_us, eager, dtype = DRY_LAYER, DRY_TOKENS, DRY_VARIANTS, wall_us, wall_us, \
            DRY_DTYPE
    else:
        layer, tokens, variants, time_us, eager, dtype = LAYER, TOKENS, VARIANTS, graph_us, eager_us, DTYPE
    tokens = tuple(args.tokens) if args.tokens else tokens
    quantized = []
    for name in dict.fromkeys(w for w in args.weights if w != "bf16"):  # in the order given, once each
        bits = int(name[3:])
        group = None if bits == 8 else DRY_INT4_GROUP if args.dry_run else INT4_GROUP
        full = INT8_VARIANTS if bits == 8 else INT4_VARIANTS
        quantized.append((bits, group, () if args.no_sweep else DRY_INT8_VARIANTS if args.dry_run else full))
    batched_variants = tuple(parse_defines(text) for text in args.batched_variants)
    results = bench_layer(layer, tokens, () if args.no_sweep else variants, time_us, eager, device, dtype,
                          tuple(quantized), batched_variants)
    print_table(results, "wall clock, dry run" if args.dry_run else "fused: CUDA-graph replays; torch: eager")
    for bits, _, _ in quantized:
        print_quantized_table(results, f"int{bits}")
    if args.json:
        write_results(args.json, device, dtype, args.dry_run, results)


if __name__ == "__main__":
    main()
