"""Where the nano workload's time goes on CUDA: every engine step timed on the host (schedule / launch /
update / rest) and on the GPU (CUDA events around each launch), grouped into graph-replayed decode steps and
eager (prefill or mixed) steps. Run on the GPU machine: python scripts/nano_trace.py [OUT_JSON] [--sync]
(--sync: without asynchronous scheduling)."""
import json
import sys
import time
from collections import defaultdict

import torch

from trident.bench.random_weights import random_checkpoint
from trident.bench.shapes import resolve_shape
from trident.bench.trident_side import _params, warm_up
from trident.bench.workloads import nano_workload
from trident.engine.engine import LLMEngine
from trident.engine.llm import engine_config
from trident.engine.sizing import kv_bytes_per_block
from trident.quant.kv import kv_cache_format

shape = resolve_shape("qwen3-0.6b")
ck = random_checkpoint(shape, device="cuda", dtype=torch.bfloat16)
wl = nano_workload(256, None, None, ck.config.vocab_size)
blocks = sum(-(-(p + o) // 16) for p, o in zip(wl.prompt_lens, wl.output_lens)) + 4
kv = sys.argv[sys.argv.index("--kv") + 1] if "--kv" in sys.argv else "auto"
eng = LLMEngine(engine_config("", device="cuda", dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=16384,
                              memory_budget_bytes=blocks * kv_bytes_per_block(ck.config, 16,
                                                                             kv_cache_format(kv, torch.bfloat16)),
                              async_scheduling="--sync" not in sys.argv, kv_cache_dtype=kv), ck)
warm_up(eng, 256)
torch.cuda.synchronize()

timers = defaultdict(float)
steps = []
runner, sched = eng.runner, eng.scheduler
orig_execute, orig_schedule, orig_update = runner.launch, sched.schedule, sched.update


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        timers[name] = time.perf_counter() - t
        return out
    return wrapper


def execute(plan):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = runner.graphs.replays
    start.record()
    t = time.perf_counter()
    out = orig_execute(plan)
    timers["execute"] = time.perf_counter() - t
    end.record()
    graph = runner.graphs.replays > replays
    steps.append({"graph": graph, "chunks": len(plan.chunks), "tokens": plan.num_tokens,
                  "events": (start, end), "replay_events": pending_replay.pop() if graph else None})
    return out


runner.launch = execute
orig_run = runner.graphs.run


def graph_run(*a):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = orig_run(*a)
    end.record()
    pending_replay.append((start, end))
    return out


pending_replay = []
runner.graphs.run = graph_run
sched.schedule = timed("schedule", orig_schedule)
sched.update = timed("update", orig_update)

t0 = time.perf_counter()
for prompt, n in zip(wl.prompts, wl.output_lens):
    eng.add_request(list(prompt), _params(n))
tokens = 0
while eng.has_unfinished():
    t = time.perf_counter()
    for out in eng.step(only_finished=True):
        tokens += len(out.outputs[0].token_ids)
    wall = time.perf_counter() - t
    s = steps[-1]
    s.update(wall=wall, schedule=timers["schedule"], execute=timers["execute"], update=timers["update"])
elapsed = time.perf_counter() - t0
torch.cuda.synchronize()
for s in steps:
    a, b = s.pop("events")
    s["gpu"] = a.elapsed_time(b) / 1000
    r = s.pop("replay_events")
    s["replay"] = r[0].elapsed_time(r[1]) / 1000 if r else 0.0

groups = defaultdict(lambda: defaultdict(float))
for s in steps:
    if s["graph"]:
        c = s["chunks"]
        key = next(f"decode b<={b}" for b in (8, 64, 160, 256, 10**9) if c <= b)
    else:
        key = "eager (prefill/mixed)"
    g = groups[key]
    g["steps"] += 1
    g["tokens_out"] += s["chunks"] if s["graph"] else 0
    for k in ("wall", "gpu", "replay", "schedule", "execute", "update"):
        g[k] += s[k]
print(f"nano: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:,.0f} tok/s, {len(steps)} steps")
print(f"{'group':24} {'steps':>6} {'wall s':>7} {'gpu s':>7} {'replay':>7} {'sched':>7} {'exec':>7} {'update':>7} "
      f"{'wall/step ms':>12} {'gpu/step ms':>11}")
for k, g in sorted(groups.items()):
    n = g["steps"]
    print(f"{k:24} {n:6.0f} {g['wall']:7.3f} {g['gpu']:7.3f} {g['replay']:7.3f} {g['schedule']:7.3f} "
          f"{g['execute']:7.3f} "
          f"{g['update']:7.3f} {g['wall'] / n * 1000:12.3f} {g['gpu'] / n * 1000:11.3f}")
if len(sys.argv) > 1 and sys.argv[1].endswith(".json"):
    with open(sys.argv[1], "w") as f:
        json.dump({"elapsed": elapsed, "tokens": tokens, "steps": steps}, f)
