"""Scheduler driven by a fake model runner: invariants on random workloads, batch invariance, prefix
caching, chunked prefill, FCFS admission, preemption, errors and finish reasons."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.config import CacheConfig, SchedulerConfig
from trident.engine.block_manager import cdiv
from trident.engine.plan import ScheduledChunk, StepPlan, StepResult
from trident.engine.request import FinishReason, SampledToken, SamplingParams, Sequence, SequenceStatus
from trident.engine.scheduler import Scheduler
from trident.errors import TridentError

VOCAB = 24
EOS = 0
KV_SEED = 12345


# ------------------------------------------------------------------------------- the fake model

def kv_value(previous: int, token: int) -> int:
    """The fake 'key/value' at a position: a digest of the whole token prefix up to it."""
    return hash((previous, token))


def next_token(value: int, sample_index: int) -> int:
    return hash((value, sample_index, 99)) % VOCAB


def oracle_tokens(prompt: list[int], sample_index: int, num_out: int) -> list[int]:
    """What the fake model generates for a prompt, computed without any cache."""
    value = KV_SEED
    for token in prompt:
        value = kv_value(value, token)
    out = []
    for _ in range(num_out):
        out.append(next_token(value, sample_index))
        value = kv_value(value, out[-1])
    return out


class FakeRunner:
    """Stands in for the model runner over a fake paged KV cache.

    Each slot holds a digest of the token prefix up to its position. A chunk reads the previous
    position through its block table and writes its own positions, and a sampled token depends on
    the last digest, so a wrongly shared, lost or overwritten block changes the generated tokens.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.block_manager = scheduler.block_manager
        self.kv: dict[tuple[int, int], int] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        bs = self.block_manager.block_size
        sampled = {}
        for chunk in plan.chunks:
            value = KV_SEED
            if chunk.start_pos:
                p = chunk.start_pos - 1
                value = self.kv[(chunk.block_table[p // bs], p % bs)]
            for j, token in enumerate(chunk.token_ids):
                p = chunk.start_pos + j
                block = chunk.block_table[p // bs]
                assert self.block_manager.ref_count(block) == 1, "a chunk writes into a shared block"
                value = kv_value(value, token)
                self.kv[(block, p % bs)] = value
            if chunk.sample:
                sampled[chunk.seq_id] = SampledToken(next_token(value, chunk.sample_index), logprob=-0.5)
        return StepResult(sampled=sampled)


class ScriptedRunner:
    """Samples the given tokens in order, per sequence, regardless of the input."""

    def __init__(self, scripts: dict[int, list[int]]) -> None:
        self.scripts = {k: list(v) for k, v in scripts.items()}

    def execute(self, plan: StepPlan) -> StepResult:
        return StepResult(sampled={c.seq_id: SampledToken(self.scripts[c.seq_id].pop(0), logprob=-1.0)
                                   for c in plan.chunks if c.sample})


# ------------------------------------------------------------------------------------ helpers

def make_scheduler(*, block_size: int = 4, num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64,
                   chunked: bool = True, prefix: bool = True, max_model_len: int = 256) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        enable_chunked_prefill=chunked),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        num_blocks=num_blocks, max_model_len=max_model_len, eos_token_ids=(EOS,),
    )


_ids = iter(range(10**9))


def make_request(request_id: str, prompt: list[int], params: SamplingParams | None = None) -> list[Sequence]:
    params = params or SamplingParams(max_tokens=8, ignore_eos=True)
    return [Sequence(seq_id=next(_ids), request_id=request_id, sample_index=i, prompt_token_ids=list(prompt),
                     params=params) for i in range(params.n)]


def add(scheduler: Scheduler, request_id: str, prompt: list[int],
        params: SamplingParams | None = None) -> list[Sequence]:
    seqs = make_request(request_id, prompt, params)
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def step(scheduler: Scheduler, runner: FakeRunner | ScriptedRunner) -> StepPlan:
    plan = scheduler.schedule()
    scheduler.update(plan, runner.execute(plan))
    return plan


def run_to_end(scheduler: Scheduler, runner: FakeRunner | ScriptedRunner,
               max_steps: int = 5000) -> list[StepPlan]:
    plans = []
    while scheduler.has_unfinished:
        assert len(plans) < max_steps, "no progress"
        plans.append(step(scheduler, runner))
    return plans


def chunk_of(plan: StepPlan, seq: Sequence) -> ScheduledChunk | None:
    return next((c for c in plan.chunks if c.seq_id == seq.seq_id), None)


def tokens(n: int, start: int = 1) -> list[int]:
    """n distinct non-EOS tokens."""
    return [start + (i % (VOCAB - 1)) for i in range(n)]


# -------------------------------------------------------------------- invariant checks per step

def check_state(s: Scheduler, chunks: dict[int, ScheduledChunk], max_num_seqs: int) -> None:
    """Block ownership and accounting over every unfinished sequence."""
    bm, bs = s.block_manager, s.block_size
    assert s.num_running <= max_num_seqs
    assert not {x.seq_id for x in s.waiting} & {x.seq_id for x in s.running}
    for seq in s.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    owners: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in s.running:
        assert seq.status is SequenceStatus.RUNNING
        chunk = chunks.get(seq.seq_id)
        covered = seq.num_computed_tokens + (chunk.num_tokens if chunk else 0)
        assert len(seq.block_table) == cdiv(covered, bs), "block table covers more or less than needed"
        assert len(set(seq.block_table)) == len(seq.block_table)
        for i, block in enumerate(seq.block_table):
            owners.setdefault(block, []).append((seq, i))
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == len(owners.get(block, ()))
    assert bm.num_free_blocks == bm.num_blocks - len(owners)
    for block, users in owners.items():
        if len(users) == 1:
            continue
        first, index = users[0]
        prefix = first.token_ids[:(index + 1) * bs]
        assert bm.block_hash(block) is not None, "a block without a hash is shared"
        for seq, i in users:
            assert i == index, "a shared block sits at different positions"
            assert seq.num_computed_tokens >= (i + 1) * bs, "a shared block is not a full computed prefix"
            assert seq.token_ids[:(i + 1) * bs] == prefix, "sequences with different prefixes share a block"


def check_plan(s: Scheduler, plan: StepPlan, waiting_before: list[Sequence], config: SchedulerConfig) -> None:
    assert plan.num_tokens <= config.max_num_batched_tokens or (
        not config.enable_chunked_prefill and len(plan.chunks) == 1)
    assert len(plan.chunks) <= config.max_num_seqs
    assert len({c.seq_id for c in plan.chunks}) == len(plan.chunks)
    assert not plan.is_empty or not s.has_unfinished, "nothing scheduled while work is left"
    running = {x.seq_id: x for x in s.running}
    for c in plan.chunks:
        seq = running[c.seq_id]
        end = c.start_pos + c.num_tokens
        assert c.num_tokens >= 1 and c.start_pos == seq.num_computed_tokens
        assert list(c.token_ids) == seq.token_ids[c.start_pos:end]
        assert c.sample == (end == seq.num_tokens)
        assert c.block_table == tuple(seq.block_table)
        assert c.sample_index == seq.sample_index and c.num_output_tokens == seq.num_output_tokens
        if seq.num_computed_tokens == seq.num_tokens - 1:
            assert c.num_tokens == 1
        if c.sample and seq.params.needs_penalties:
            assert list(c.prompt_token_ids) == seq.prompt_token_ids
            assert list(c.output_token_ids) == seq.output_token_ids
        else:
            assert c.prompt_token_ids == () and c.output_token_ids == ()
    waiting_now = {x.seq_id for x in s.waiting}
    for seq_id in plan.preempted_seq_ids:
        assert seq_id in waiting_now
    admitted = [x for x in waiting_before if x.seq_id in running]
    assert admitted == waiting_before[:len(admitted)], "a waiting sequence was passed over (not FCFS)"
    if plan.preempted_seq_ids:
        assert not admitted


# ------------------------------------------------------------------------------ random workloads

@dataclass
class Req:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_step: int = 0
    abort_step: int | None = None
    abort_during_step: bool = False
    """Abort after the runner executed the plan and before update (the client left mid-step)."""


@dataclass
class Workload:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    budget: int
    chunked: bool
    prefix: bool
    max_model_len: int
    requests: list[Req] = field(default_factory=list)

    def scheduler(self) -> Scheduler:
        return make_scheduler(block_size=self.block_size, num_blocks=self.num_blocks,
                              max_num_seqs=self.max_num_seqs, budget=self.budget, chunked=self.chunked,
                              prefix=self.prefix, max_model_len=self.max_model_len)


def run_workload(w: Workload) -> tuple[Scheduler, dict[str, list[Sequence]]]:
    """Run the workload step by step, checking every plan and the block state around it."""
    s = w.scheduler()
    runner = FakeRunner(s)
    config = s.config
    seqs: dict[str, list[Sequence]] = {}
    step_no = 0
    last_arrival = max((r.arrival_step for r in w.requests), default=0)
    while step_no <= last_arrival or s.has_unfinished:
        assert step_no < 5000, "no progress"
        for r in w.requests:
            if r.arrival_step == step_no:
                new = make_request(r.request_id, r.prompt, r.params)
                too_long = len(r.prompt) >= w.max_model_len
                too_big = cdiv(len(r.prompt), w.block_size) > w.num_blocks
                if too_long or too_big:
                    with pytest.raises(TridentError, match="max_model_len" if too_long else "KV cache"):
                        s.add(new[0])
                    continue
                for seq in new:
                    s.add(seq)
                seqs[r.request_id] = new
        for r in w.requests:
            if r.abort_step == step_no and not r.abort_during_step:
                s.abort_request(r.request_id)
        waiting_before = list(s.waiting)
        plan = s.schedule()
        chunks = {c.seq_id: c for c in plan.chunks}
        check_plan(s, plan, waiting_before, config)
        check_state(s, chunks, config.max_num_seqs)
        result = runner.execute(plan)
        for r in w.requests:
            if r.abort_step == step_no and r.abort_during_step:
                s.abort_request(r.request_id)
        live = {c.seq_id for c in plan.chunks if c.sample and c.seq_id in {x.seq_id for x in s.running}}
        updated = s.update(plan, result)
        assert {x.seq_id for x in updated} == live
        for seq in updated:
            assert seq.token_ids[-1] == result.sampled[seq.seq_id].token_id
        check_state(s, {}, config.max_num_seqs)
        step_no += 1
    bm = s.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert s.num_waiting == s.num_running == 0
    return s, seqs


def run_alone(w: Workload, r: Req) -> list[Sequence]:
    """The same request on a scheduler of the same configuration with nothing else to do."""
    s = w.scheduler()
    seqs = add(s, r.request_id, r.prompt, r.params)
    run_to_end(s, FakeRunner(s))
    return seqs


def check_results(w: Workload, seqs: dict[str, list[Sequence]]) -> None:
    """Batch invariance: every sequence generates what it generates alone (aborted ones: a prefix)."""
    for r in w.requests:
        if r.request_id not in seqs:
            continue
        alone = run_alone(w, r)
        for seq, ref in zip(seqs[r.request_id], alone, strict=True):
            assert ref.output_token_ids == oracle_tokens(r.prompt, ref.sample_index, ref.num_output_tokens)
            assert seq.is_finished and seq.finish_time is not None and seq.block_table == []
            assert (seq.first_token_time is not None) == (seq.num_output_tokens > 0)
            assert len(seq.logprobs) == (seq.num_output_tokens if r.params.logprobs is not None else 0)
            if seq.finish_reason is FinishReason.ABORT:
                assert seq.token_ids == ref.token_ids[:seq.num_tokens]
            else:
                assert seq.token_ids == ref.token_ids and seq.finish_reason == ref.finish_reason


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    block_size = draw(st.integers(1, 5))
    w = Workload(
        block_size=block_size,
        num_blocks=draw(st.integers(2, 24)),
        max_num_seqs=draw(st.integers(1, 6)),
        budget=draw(st.integers(1, 40)),
        chunked=draw(st.booleans()),
        prefix=draw(st.integers(0, 3)) > 0,
        max_model_len=draw(st.integers(4, 48)),
    )
    bases = [draw(st.lists(st.integers(1, VOCAB - 1), max_size=14)) for _ in range(2)]
    for i in range(draw(st.integers(1, 7))):
        base = draw(st.sampled_from(bases))
        suffix = draw(st.lists(st.integers(0, VOCAB - 1), max_size=8))
        prompt = base[:draw(st.integers(0, len(base)))] + suffix
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 10)))
        params = SamplingParams(
            n=draw(st.integers(1, 3)),
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, min(2, max_tokens or 2))),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.lists(st.integers(1, VOCAB - 1), max_size=2))),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
            logprobs=draw(st.sampled_from([None, 0])),
        )
        w.requests.append(Req(
            request_id=f"req{i}",
            prompt=prompt or [1],
            params=params,
            arrival_step=draw(st.integers(0, 12)),
            abort_step=draw(st.one_of(st.none(), st.none(), st.integers(0, 30))),
            abort_during_step=draw(st.booleans()),
        ))
    return w


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_random_workloads_keep_invariants_and_batch_invariance(w: Workload) -> None:
    _, seqs = run_workload(w)
    check_results(w, seqs)


def test_a_crowded_workload_preempts_hits_the_cache_and_stays_correct() -> None:
    """A fixed busy workload on a small cache, so preemption and prefix hits surely happen."""
    rng = random.Random(7)
    system = tokens(12, start=3)
    w = Workload(block_size=4, num_blocks=16, max_num_seqs=6, budget=24, chunked=True, prefix=True,
                 max_model_len=64)
    for i in range(16):
        suffix = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
        prompt = system[:rng.choice([0, 8, 12])] + suffix
        params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randrange(4, 20), ignore_eos=True)
        w.requests.append(Req(f"req{i}", prompt, params, arrival_step=rng.randrange(0, 10),
                              abort_step=rng.choice([None, None, None, rng.randrange(0, 20)])))
    s, seqs = run_workload(w)
    check_results(w, seqs)
    assert s.num_preemptions > 0
    assert 0 < s.prefix_cache_hit_tokens < s.prefix_cache_queried_tokens
    assert any(x.num_preemptions for group in seqs.values() for x in group)


# --------------------------------------------------------------------------------- prefix cache

@pytest.mark.parametrize("first_finished", [False, True])
def test_a_shared_system_prompt_is_computed_once(first_finished: bool) -> None:
    bs = 4
    s = make_scheduler(block_size=bs)
    runner = FakeRunner(s)
    system = tokens(3 * bs)
    (a,) = add(s, "a", system + [20, 21], SamplingParams(max_tokens=2, ignore_eos=True))
    step(s, runner)
    system_blocks = tuple(a.block_table[:3])
    if first_finished:
        run_to_end(s, runner)
        assert s.block_manager.num_evictable_blocks == 3  # the system prompt's blocks stay cached
    (b,) = add(s, "b", system + [22, 23, 1], SamplingParams(max_tokens=3, ignore_eos=True))
    plan = step(s, runner)
    assert b.num_cached_tokens == 3 * bs
    chunk = chunk_of(plan, b)
    assert chunk.start_pos == 3 * bs and chunk.token_ids == (22, 23, 1)
    assert chunk.block_table[:3] == system_blocks
    assert s.prefix_cache_queried_tokens == a.num_prompt_tokens + b.num_prompt_tokens
    assert s.prefix_cache_hit_tokens == 3 * bs
    run_to_end(s, runner)
    assert b.output_token_ids == oracle_tokens(b.prompt_token_ids, 0, 3)
    assert a.num_cached_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = make_scheduler(block_size=4)
    runner = FakeRunner(s)
    prompt = tokens(8)
    add(s, "a", prompt, SamplingParams(max_tokens=1))
    run_to_end(s, runner)
    (b,) = add(s, "b", prompt, SamplingParams(max_tokens=1))
    plan = step(s, runner)
    assert b.num_cached_tokens == 4  # the second block holds the last token, so it is recomputed
    assert chunk_of(plan, b).token_ids == tuple(prompt[4:])


def test_no_prefix_caching_means_no_hits_and_no_counts() -> None:
    s = make_scheduler(block_size=2, prefix=False)
    runner = FakeRunner(s)
    add(s, "a", tokens(8))
    run_to_end(s, runner)
    (b,) = add(s, "b", tokens(8))
    run_to_end(s, runner)
    assert b.num_cached_tokens == 0
    assert s.prefix_cache_queried_tokens == s.prefix_cache_hit_tokens == 0


def test_a_preempted_sequence_reuses_its_own_cached_blocks() -> None:
    # 5 blocks of 4: two 8-token prompts take 4; the first decode step needs 2 more blocks.
    s = make_scheduler(block_size=4, num_blocks=5)
    runner = FakeRunner(s)
    (a,) = add(s, "a", tokens(8, start=1), SamplingParams(max_tokens=3, ignore_eos=True))
    (b,) = add(s, "b", tokens(8, start=10), SamplingParams(max_tokens=4, ignore_eos=True))
    step(s, runner)
    b_blocks = list(b.block_table)
    plan = step(s, runner)
    assert plan.preempted_seq_ids == (b.seq_id,)  # b arrived last: it gives way (here: to itself)
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and s.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_output_tokens == 1
    hits_before = s.prefix_cache_hit_tokens
    plan = step(s, runner)  # a finishes; b does not fit yet
    assert chunk_of(plan, b) is None and a.finish_reason is FinishReason.LENGTH
    plan = step(s, runner)
    chunk = chunk_of(plan, b)
    assert chunk.start_pos == 8 and chunk.token_ids == (b.token_ids[8],)  # only the generated token
    assert b.block_table[:2] == b_blocks[:2]
    assert s.prefix_cache_hit_tokens == hits_before + 8
    assert b.num_cached_tokens == 0  # recorded at the first admission only
    run_to_end(s, runner)
    assert b.output_token_ids == oracle_tokens(b.prompt_token_ids, 0, 4)


def test_siblings_wait_for_the_first_sample_to_compute_the_prompt() -> None:
    bs = 4
    s = make_scheduler(block_size=bs, budget=4)
    runner = FakeRunner(s)
    prompt = tokens(10)  # 2 full blocks can be shared; the block with the last token cannot
    siblings = add(s, "multi", prompt, SamplingParams(n=3, max_tokens=5, ignore_eos=True))
    (later,) = add(s, "later", [5, 6])
    first, second, third = siblings
    for _ in range(2):  # 4 prompt tokens a step: the shared blocks are done after 2 steps
        assert [c.seq_id for c in step(s, runner).chunks] == [first.seq_id]
    plan = step(s, runner)
    assert [c.seq_id for c in plan.chunks] == [first.seq_id, second.seq_id]
    assert second.num_cached_tokens == 8 and chunk_of(plan, second).token_ids == tuple(prompt[8:])
    plan = step(s, runner)
    assert [c.seq_id for c in plan.chunks] == [first.seq_id, second.seq_id, third.seq_id]
    assert third.num_cached_tokens == 8 and chunk_of(plan, third).token_ids == tuple(prompt[8:])
    assert later.status is SequenceStatus.WAITING  # FCFS: not before the siblings
    assert s.prefix_cache_hit_tokens == 16
    run_to_end(s, runner)
    outputs = [x.output_token_ids for x in siblings]
    assert outputs == [oracle_tokens(prompt, i, 5) for i in range(3)]
    assert len({tuple(o) for o in outputs}) == 3


def test_siblings_hold_back_later_requests_but_not_each_other() -> None:
    s = make_scheduler(block_size=4, budget=64)
    runner = FakeRunner(s)
    siblings = add(s, "multi", tokens(10), SamplingParams(n=3, max_tokens=2, ignore_eos=True))
    (later,) = add(s, "later", [5, 6])
    assert [c.seq_id for c in step(s, runner).chunks] == [siblings[0].seq_id]
    plan = step(s, runner)
    assert [c.seq_id for c in plan.chunks] == [x.seq_id for x in siblings] + [later.seq_id]
    assert [x.num_cached_tokens for x in siblings] == [0, 8, 8]


def test_siblings_are_not_held_back_without_prefix_caching() -> None:
    s = make_scheduler(block_size=4, prefix=False)
    siblings = add(s, "multi", tokens(10), SamplingParams(n=3, max_tokens=2))
    plan = step(s, FakeRunner(s))
    assert [c.seq_id for c in plan.chunks] == [x.seq_id for x in siblings]


# ------------------------------------------------------------------------------ chunked prefill

def test_chunked_prefill_splits_a_long_prompt_while_decodes_go_on() -> None:
    s = make_scheduler(block_size=4, budget=8)
    runner = FakeRunner(s)
    (a,) = add(s, "a", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
    (b,) = add(s, "b", tokens(30, start=4), SamplingParams(max_tokens=2, ignore_eos=True))
    sizes = []
    while b.num_output_tokens == 0:
        plan = step(s, runner)
        assert plan.num_tokens <= 8
        assert chunk_of(plan, a).sample  # a makes a token every step
        c = chunk_of(plan, b)
        sizes.append(c.num_tokens)
        assert c.sample == (sum(sizes) == 30)
    assert sizes == [5, 7, 7, 7, 4]
    assert a.num_output_tokens == 5
    run_to_end(s, runner)
    assert b.output_token_ids == oracle_tokens(b.prompt_token_ids, 0, 2)
    assert a.output_token_ids == oracle_tokens(a.prompt_token_ids, 0, 20)


def test_without_chunked_prefill_a_long_prompt_runs_alone_when_over_the_budget() -> None:
    s = make_scheduler(block_size=4, budget=8, chunked=False)
    runner = FakeRunner(s)
    (a,) = add(s, "a", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    step(s, runner)
    (b,) = add(s, "b", tokens(12), SamplingParams(max_tokens=2, ignore_eos=True))
    (c,) = add(s, "c", [7])
    plans = run_to_end(s, runner)
    first = {x.seq_id: next(i for i, p in enumerate(plans) if chunk_of(p, x)) for x in (b, c)}
    b_plan = plans[first[b.seq_id]]
    assert [ch.seq_id for ch in b_plan.chunks] == [b.seq_id] and b_plan.num_tokens == 12
    assert all(chunk_of(p, a) is None for p in plans[first[b.seq_id]:])  # a had finished before
    assert first[c.seq_id] > first[b.seq_id]
    assert all(p.num_tokens <= 8 for i, p in enumerate(plans) if i != first[b.seq_id])


# -------------------------------------------------------------------------------------- FCFS

@pytest.mark.parametrize("blocker", ["budget", "cache", "max_num_seqs"])
def test_a_later_short_request_never_starts_before_an_earlier_waiting_one(blocker: str) -> None:
    kwargs = {
        "budget": dict(budget=8, chunked=False),
        "cache": dict(block_size=4, num_blocks=6),
        "max_num_seqs": dict(max_num_seqs=1),
    }[blocker]
    s = make_scheduler(**kwargs)
    runner = FakeRunner(s)
    (a,) = add(s, "a", tokens(12), SamplingParams(max_tokens=6, ignore_eos=True))
    step(s, runner)
    (b,) = add(s, "b", tokens(16, start=5), SamplingParams(max_tokens=2, ignore_eos=True))
    (c,) = add(s, "c", [9], SamplingParams(max_tokens=2, ignore_eos=True))
    plan = step(s, runner)
    assert chunk_of(plan, b) is None and chunk_of(plan, c) is None  # b does not fit; c must not pass it
    b_started = c_started = None
    for i, plan in enumerate(run_to_end(s, runner)):
        if b_started is None and chunk_of(plan, b):
            b_started = i
        if c_started is None and chunk_of(plan, c):
            c_started = i
    assert b_started is not None and c_started is not None and b_started <= c_started
    assert all(x.finish_reason is FinishReason.LENGTH for x in (a, b, c))


def test_preempted_sequences_go_back_to_the_front_in_arrival_order() -> None:
    s = make_scheduler(block_size=2, num_blocks=6, budget=64)
    runner = FakeRunner(s)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b, c = (add(s, name, tokens(4, start=3 * i + 1), params)[0] for i, name in enumerate("abc"))
    (d,) = add(s, "d", [1], params)
    step(s, runner)  # a, b, c take 2 blocks each: the cache is full, d waits
    assert d.status is SequenceStatus.WAITING
    plan = step(s, runner)  # a needs a block: c, the last to arrive, gives way; b takes the other
    assert plan.preempted_seq_ids == (c.seq_id,)
    assert [x.seq_id for x in s.waiting] == [c.seq_id, d.seq_id]
    assert step(s, runner).preempted_seq_ids == ()
    plan = step(s, runner)  # a needs a block again: now b gives way and goes before c
    assert plan.preempted_seq_ids == (b.seq_id,)
    assert [x.seq_id for x in s.waiting] == [b.seq_id, c.seq_id, d.seq_id]
    assert s.num_preemptions == 2 and b.num_preemptions == c.num_preemptions == 1
    run_to_end(s, runner)
    for x in (a, b, c, d):
        assert x.output_token_ids == oracle_tokens(x.prompt_token_ids, 0, 8)


# ------------------------------------------------------------------------------------ errors

def test_a_prompt_as_long_as_the_context_is_refused() -> None:
    s = make_scheduler(max_model_len=16)
    with pytest.raises(TridentError, match=r"16 tokens.*max_model_len\) is 16.*shorten the prompt"):
        add(s, "a", tokens(16))
    add(s, "b", tokens(15))  # one below is fine
    assert s.num_waiting == 1


def test_a_prompt_larger_than_the_whole_cache_is_refused() -> None:
    s = make_scheduler(block_size=4, num_blocks=3)
    with pytest.raises(TridentError, match=r"13 tokens.*holds 12 \(3 blocks of 4\).*KV cache more memory"):
        add(s, "a", tokens(13))
    assert not s.has_unfinished
    add(s, "b", tokens(12))
    assert s.num_waiting == 1


def test_check_validates_without_queueing() -> None:
    s = make_scheduler(max_model_len=8)
    (ok,) = make_request("a", [1, 2])
    s.check(ok)
    assert not s.has_unfinished
    with pytest.raises(TridentError, match="max_model_len"):
        s.check(make_request("b", tokens(8))[0])


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(TridentError, match="empty"):
        add(make_scheduler(), "a", [])


def test_adding_the_same_sequence_twice_is_a_bug() -> None:
    s = make_scheduler()
    (a,) = add(s, "a", [1, 2])
    with pytest.raises(ValueError):
        s.add(a)


# ----------------------------------------------------------------------------- finish reasons

def finish_with(script: list[int], params: SamplingParams, *, prompt_len: int = 3, max_model_len: int = 256,
                num_blocks: int = 64, block_size: int = 4) -> Sequence:
    s = make_scheduler(max_model_len=max_model_len, num_blocks=num_blocks, block_size=block_size)
    (seq,) = make_request("r", tokens(prompt_len), params)
    s.add(seq)
    updates = []
    for plan in run_to_end(s, ScriptedRunner({seq.seq_id: script})):
        updates.extend(plan.chunks)
    assert seq.is_finished and seq.finish_time is not None and seq.first_token_time is not None
    assert s.block_manager.num_free_blocks == num_blocks
    return seq


def test_eos_stops_and_is_kept() -> None:
    seq = finish_with([5, 6, EOS, 7], SamplingParams(max_tokens=10))
    assert seq.output_token_ids == [5, 6, EOS] and seq.finish_reason is FinishReason.STOP


def test_ignore_eos_runs_to_max_tokens() -> None:
    seq = finish_with([EOS] * 4, SamplingParams(max_tokens=4, ignore_eos=True))
    assert seq.output_token_ids == [EOS] * 4 and seq.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    seq = finish_with([5, EOS, 9, 7], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(9,)))
    assert seq.output_token_ids == [5, EOS, 9] and seq.finish_reason is FinishReason.STOP


def test_min_tokens_holds_back_eos_and_stop_ids() -> None:
    seq = finish_with([EOS, 9, EOS, 5], SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(9,)))
    assert seq.output_token_ids == [EOS, 9, EOS] and seq.finish_reason is FinishReason.STOP


def test_max_tokens_finishes_with_length() -> None:
    seq = finish_with([5, 6, 7, 8], SamplingParams(max_tokens=3))
    assert seq.output_token_ids == [5, 6, 7] and seq.finish_reason is FinishReason.LENGTH


def test_a_stop_token_on_the_last_allowed_token_is_a_stop() -> None:
    seq = finish_with([5, EOS], SamplingParams(max_tokens=2))
    assert seq.finish_reason is FinishReason.STOP


def test_the_context_length_finishes_with_length() -> None:
    seq = finish_with([5] * 10, SamplingParams(max_tokens=None), prompt_len=5, max_model_len=8)
    assert seq.num_tokens == 8 and seq.finish_reason is FinishReason.LENGTH


def test_a_sequence_stops_where_the_whole_cache_is_full() -> None:
    # 3 blocks of 2 hold 6 positions; the 7th token needs no slot, an 8th would need a 7th slot.
    seq = finish_with([5] * 10, SamplingParams(max_tokens=None), prompt_len=3, num_blocks=3, block_size=2)
    assert seq.num_tokens == 7 and seq.finish_reason is FinishReason.LENGTH


def test_logprobs_and_first_token_time() -> None:
    s = make_scheduler()
    (with_lp,) = add(s, "a", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2))
    (without,) = add(s, "b", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    run_to_end(s, FakeRunner(s))
    assert [t.token_id for t in with_lp.logprobs] == with_lp.output_token_ids
    assert all(t.logprob == -0.5 for t in with_lp.logprobs)
    assert without.logprobs == []
    assert with_lp.arrival_time <= with_lp.first_token_time <= with_lp.finish_time


def test_penalty_history_is_sent_only_with_sampling_chunks() -> None:
    s = make_scheduler(budget=4)
    runner = FakeRunner(s)
    (seq,) = add(s, "a", tokens(6), SamplingParams(max_tokens=3, repetition_penalty=1.2))
    first = step(s, runner).chunks[0]
    assert not first.sample and first.prompt_token_ids == () and first.output_token_ids == ()
    second = step(s, runner).chunks[0]
    assert second.sample and second.prompt_token_ids == tuple(tokens(6)) and second.output_token_ids == ()
    third = step(s, runner).chunks[0]
    assert third.output_token_ids == tuple(seq.output_token_ids[:1]) and third.num_output_tokens == 1


# ----------------------------------------------------------------------------- finish / abort

def test_finish_and_abort_free_blocks_and_are_idempotent() -> None:
    s = make_scheduler(block_size=2, budget=4)
    runner = FakeRunner(s)
    a, b = add(s, "a", tokens(6), SamplingParams(n=2, max_tokens=5))
    (c,) = add(s, "c", tokens(3))
    step(s, runner)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert {x.seq_id for x in s.abort_request("a")} == {a.seq_id, b.seq_id}
    assert a.finish_reason is b.finish_reason is FinishReason.ABORT and a.block_table == []
    assert s.abort_request("a") == [] and s.abort_request("nobody") == []
    s.finish(a.seq_id, FinishReason.STOP)  # already finished: nothing changes
    assert a.finish_reason is FinishReason.ABORT
    plan = s.schedule()
    result = runner.execute(plan)
    s.finish(c.seq_id, FinishReason.STOP)  # e.g. a stop string found while the step ran
    assert s.update(plan, result) == []
    assert c.finish_reason is FinishReason.STOP and not s.has_unfinished
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert Counter(x.status for x in (a, b, c)) == {SequenceStatus.FINISHED: 3}


# ------------------------------------------------------------------------- the decode fast path

def test_decode_steps_call_the_block_manager_only_when_a_block_fills() -> None:
    """The per-sequence decode loop leaves the block manager alone until a chunk crosses a block end:
    then a new block is allocated before the step and the filled block gets its hash after it."""
    bs = 4
    s = make_scheduler(block_size=bs)
    runner = FakeRunner(s)
    (a,) = add(s, "a", tokens(6), SamplingParams(max_tokens=12, ignore_eos=True))
    step(s, runner)  # the prompt: 2 blocks
    bm = s.block_manager
    calls: list[tuple[str, int]] = []
    allocate, mark_computed = bm.allocate, bm.mark_computed
    bm.allocate = lambda seq, n, cached=(): calls.append(("allocate", n)) or allocate(seq, n, cached)
    bm.mark_computed = lambda seq: calls.append(("mark_computed", seq.num_computed_tokens)) or mark_computed(seq)
    while not a.is_finished:
        step(s, runner)
    # positions 6..16 computed one at a time: blocks start at 8, 12 and 16; blocks end at 8, 12 and 16
    assert calls == [("mark_computed", 8), ("allocate", 9), ("mark_computed", 12), ("allocate", 13),
                     ("mark_computed", 16), ("allocate", 17)]


def test_blocks_filled_by_decoding_are_found_in_the_prefix_cache() -> None:
    bs = 4
    s = make_scheduler(block_size=bs)
    runner = FakeRunner(s)
    (a,) = add(s, "a", tokens(6), SamplingParams(max_tokens=7, ignore_eos=True))
    run_to_end(s, runner)  # 13 tokens: 3 full blocks, the last 2 filled while decoding
    assert a.num_tokens == 13 and s.block_manager.num_evictable_blocks == 3
    (b,) = add(s, "b", a.token_ids[:12] + [5], SamplingParams(max_tokens=2, ignore_eos=True))
    plan = step(s, runner)
    assert b.num_cached_tokens == 12 and chunk_of(plan, b).token_ids == (5,)
    run_to_end(s, runner)
    assert b.output_token_ids == oracle_tokens(b.prompt_token_ids, 0, 2)


def test_scheduled_chunks_are_immutable_records() -> None:
    s = make_scheduler()
    add(s, "a", [1, 2, 3])
    (chunk,) = s.schedule().chunks
    with pytest.raises(AttributeError):
        chunk.start_pos = 1  # type: ignore[misc]
    assert chunk._replace(start_pos=1).start_pos == 1 and chunk.start_pos == 0
    assert chunk.token_ids == (1, 2, 3) and chunk.num_tokens == 3 and chunk.sample


def test_running_limit_holds_admission_and_never_preempts() -> None:
    s = make_scheduler(max_num_seqs=8)
    runner = FakeRunner(s)
    first = [add(s, f"old{i}", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))[0] for i in range(6)]
    step(s, runner)
    assert len(s.running) == 6
    assert s.set_running_limit(0) == 1 and s.set_running_limit(99) == 8 and s.set_running_limit(2) == 2
    later = [add(s, f"new{i}", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))[0] for i in range(3)]
    step(s, runner)
    assert len(s.running) == 6 and len(s.waiting) == 3  # the six keep running; nobody new joins above the limit
    most_new = 0
    while s.has_unfinished:
        step(s, runner)
        old = sum(seq in s.running for seq in first)
        new = sum(seq in s.running for seq in later)
        assert new == 0 or old + new <= 2
        most_new = max(most_new, new)
    assert s.num_preemptions == 0 and most_new == 2


def test_admission_floor_admits_in_waves() -> None:
    """With a floor of 0, requests that arrive while sequences run wait until none runs, then join together: no
    step has a decoding sequence beside another sequence's prompt. Tokens as the cache-free oracle gives them."""
    s = make_scheduler(max_num_seqs=8, budget=64)
    runner = FakeRunner(s)
    assert s.set_admission_floor(-3) == 0 and s.set_admission_floor(99) == 7 and s.set_admission_floor(None) is None
    assert s.set_admission_floor(0) == 0
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    first = [add(s, f"a{i}", [10 * i + j for j in range(1, 7)], params)[0] for i in range(2)]
    plans = [step(s, runner)]  # an idle batch: both join
    assert {c.seq_id for c in plans[0].chunks} == {seq.seq_id for seq in first}
    later = [add(s, f"b{i}", [50 + 10 * i + j for j in range(1, 9)], params)[0] for i in range(3)]
    while s.has_unfinished:
        plans.append(step(s, runner))
        if any(seq in s.running for seq in first):
            assert all(seq.status is SequenceStatus.WAITING for seq in later)
    joined = [i for i, p in enumerate(plans) if {c.seq_id for c in p.chunks} & {seq.seq_id for seq in later}]
    assert {c.seq_id for c in plans[joined[0]].chunks} == {seq.seq_id for seq in later}  # together, alone
    for plan in plans:  # a step either prefills prompts (from their start) or decodes, never both
        starts = [c.start_pos == 0 for c in plan.chunks]
        assert all(starts) or not any(starts)
    for seq in first + later:
        assert seq.output_token_ids == oracle_tokens(seq.prompt_token_ids, 0, 5)
    s.set_admission_floor(None)
    again = add(s, "c", [7, 8, 9], params)[0]
    add(s, "d", [4, 5, 6], params)
    step(s, runner)
    late = add(s, "e", [1, 2, 3], params)[0]
    step(s, runner)
    assert again.status is SequenceStatus.RUNNING and late.status is SequenceStatus.RUNNING  # joins at once again
