"""Continuous batching: which sequences run in each engine step, and how much of each. Imports no torch.

Every step has a token budget (``max_num_batched_tokens``) and room for at most ``max_num_seqs`` running sequences
(or a lower ``running_limit``, set at run time). Running sequences come first, in arrival
order: a decoding sequence gets its one new token, a sequence still in prefill gets as much of the rest of its
prompt as the budget allows (chunked prefill). When the KV blocks a running sequence needs are not free, the running
sequence that arrived last is preempted by recompute (its blocks are released and it goes back to the waiting
queue), until the blocks fit or the sequence has preempted itself. Then, if nothing was preempted (and, with an
``admission_floor``, only in a step that starts with at most that many sequences running: admission in waves, so
that the sequences of a wave decode without other prompts' chunks beside them), waiting sequences
are admitted strictly first come, first served: each starts after the longest chain of its full blocks found in the
prefix cache. The samples of a request with n > 1 wait until the first one has computed the prompt's shareable
blocks, so they find them in the cache. A sequence that reaches the context length, or would no longer fit in the
whole cache, finishes with LENGTH.

The scheduler drives :class:`~trident.engine.block_manager.BlockManager` and talks to the model runner
only through :class:`~trident.engine.plan.StepPlan` and :class:`~trident.engine.plan.StepResult`.

Asynchronous scheduling: :meth:`Scheduler.schedule` may plan step k before :meth:`Scheduler.update` has
applied step k-1 (the engine overlaps planning with the device's work). Each sequence therefore counts
``num_scheduled_tokens`` (computed or in flight) beside ``num_computed_tokens`` (applied), and
``num_pending`` sampled tokens not yet known; a decode chunk of a sequence whose newest token is pending
carries :data:`~trident.engine.plan.PENDING_TOKEN`. A sequence whose pending token will certainly end it
(max_tokens or the context length) is not planned again. A sequence preempted while its chunk was in
flight still receives that chunk's token. Run synchronously (update right after each schedule), the two
counts agree between steps and nothing is ever pending at schedule time.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

from trident.config import CacheConfig, SchedulerConfig
from trident.engine.block_manager import BlockManager, cdiv
from trident.engine.plan import PENDING_TOKEN, ScheduledChunk, StepPlan, StepResult
from trident.engine.request import FinishReason, Sequence, SequenceStatus
from trident.errors import TridentError


class Scheduler:
    """Owns the waiting and running sequences and the block manager of the KV cache."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        if max_model_len <= 1:
            raise TridentError(f"max_model_len must be at least 2, got {max_model_len}")
        if config.max_num_batched_tokens is None:
            raise TridentError("the scheduler needs a resolved max_num_batched_tokens "
                               "(trident.engine.sizing.default_batched_tokens)")
        self.config = config
        self.block_size = cache.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.max_seq_len = min(max_model_len, num_blocks * cache.block_size + 1)
        """Most tokens a sequence may reach: the context length, or what the whole cache can hold (the
        last sampled token needs no KV slot). Reaching it finishes the sequence with LENGTH."""
        self.num_preemptions = 0
        self.running_limit = config.max_num_seqs
        """Most running sequences admission fills up to (``set_running_limit``): ``max_num_seqs`` unless lowered,
        e.g. by the server's adaptive mode to hold a time-per-token objective."""
        self.admission_floor: int | None = None
        """None: every step admits waiting sequences. A number (``set_admission_floor``): only a step that starts
        with at most this many sequences running does, so prompts join in waves and the steps between waves are
        decode steps only (a running sequence's time per token then has no prefill in it)."""
        self.waiting: deque[Sequence] = deque()
        """In arrival order (read only for callers)."""
        self.running: list[Sequence] = []
        """In arrival order (read only for callers)."""
        self._seqs: dict[int, Sequence] = {}
        """Unfinished sequences by seq_id."""
        self._requests: dict[str, list[Sequence]] = {}
        """Unfinished sequences by request_id."""
        self._rank: dict[int, int] = {}
        """seq_id -> arrival rank (order of add calls)."""
        self._next_rank = 0

    # ---------------------------------------------------------------------------------- state

    @property
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def prefix_cache_queried_tokens(self) -> int:
        return self.block_manager.stats.queried_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.block_manager.stats.hit_tokens

    # ------------------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        """Queue a new WAITING sequence. Raises TridentError if it could never run."""
        self.check(seq)
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} was already added")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} must be new (WAITING, nothing computed, no blocks)")
        self._rank[seq.seq_id] = self._next_rank
        self._next_rank += 1
        self._seqs[seq.seq_id] = seq
        self._requests.setdefault(seq.request_id, []).append(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise TridentError if the sequence could never run (what :meth:`add` checks; queues nothing)."""
        n = seq.num_tokens
        if n == 0:
            raise TridentError("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise TridentError(
                f"the prompt has {n} tokens but the context length (max_model_len) is {self.max_model_len}, "
                f"which must leave room for at least one new token; shorten the prompt or raise max_model_len"
            )
        bm = self.block_manager
        if cdiv(n, bm.block_size) > bm.num_blocks:
            raise TridentError(
                f"the prompt has {n} tokens but the whole KV cache holds {bm.num_blocks * bm.block_size} "
                f"({bm.num_blocks} blocks of {bm.block_size}); shorten the prompt or give the KV cache more "
                f"memory (CacheConfig.memory_budget_bytes or num_blocks)"
            )

    def finish(self, seq_id: int, reason: FinishReason) -> None:
        """End a sequence now and free its blocks. Does nothing if it is unknown or already finished."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq.status is _RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.monotonic()
        siblings = self._requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._requests[seq.request_id]
        del self._rank[seq_id]

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with ABORT; returns them."""
        seqs = list(self._requests.get(request_id, ()))
        for seq in seqs:
            self.finish(seq.seq_id, FinishReason.ABORT)
        return seqs

    # -------------------------------------------------------------------------------- a step

    def schedule(self) -> StepPlan:
        """Pick this step's chunks: running sequences first, then waiting ones, within the budget."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[int] = []
        running = self.running
        admits = self.admission_floor is None or len(running) <= self.admission_floor
        capacity = self.block_size
        i = 0
        # The hot loop of a decode step: every running sequence, so it reads plain attributes only and
        # calls the block manager only when the chunk reaches past the blocks the sequence holds.
        while i < len(running) and budget > 0:
            seq = running[i]
            start = seq.num_scheduled_tokens
            num_tokens = len(seq.token_ids) + seq.num_pending
            if seq.num_pending and self._pending_token_ends(seq, num_tokens):
                i += 1
                continue
            n = num_tokens - start
            if n > budget:
                n = budget
            if start + n > len(seq.block_table) * capacity and not self._make_room(seq, start + n, preempted):
                break  # it preempted itself, and every sequence after it is gone too
            chunks.append(self._chunk(seq, start, n, num_tokens))
            budget -= n
            i += 1
        if not preempted and admits:
            self._admit(chunks, budget)
        return StepPlan(chunks=tuple(chunks), preempted_seq_ids=tuple(preempted))

    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Apply the runner's answer to ``plan``; returns the sequences that got a token (finished too)."""
        updated: list[Sequence] = []
        seqs = self._seqs
        sampled = result.sampled
        bm = self.block_manager
        hashing = bm.enable_prefix_caching
        bs = self.block_size
        eos = self.eos_token_ids
        max_seq_len = self.max_seq_len
        now = time.monotonic()
        for chunk in plan.chunks:
            seq = seqs.get(chunk.seq_id)
            if seq is None:
                continue  # finished (aborted) since the plan was made
            if seq.status is _RUNNING:
                start = seq.num_computed_tokens
                if chunk.start_pos != start:
                    raise RuntimeError(f"stale chunk for sequence {seq.seq_id}: starts at {chunk.start_pos}, "
                                       f"but {start} tokens are computed")
                computed = start + len(chunk.token_ids)
                seq.num_computed_tokens = computed
                # Every full computed block already has its hash (this runs after each change of
                # num_computed_tokens), so only a chunk that fills a block has anything to hash.
                if hashing and computed // bs > start // bs:
                    bm.mark_computed(seq)
            # else preempted while the step was in flight (asynchronous scheduling): its blocks are gone and
            # it will be recomputed, but the token it sampled is as good as any.
            if not chunk.sample:
                continue
            seq.num_pending -= 1
            token = sampled[seq.seq_id]
            token_id = token.token_id
            tokens = seq.token_ids
            tokens.append(token_id)
            params = seq.params
            if params.logprobs is not None:
                seq.logprobs.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            updated.append(seq)
            # Why the sequence ends after its newest token, if it does.
            num_tokens = len(tokens)
            num_output = num_tokens - seq.num_prompt_tokens
            if num_output >= params.min_tokens and (
                (token_id in eos and not params.ignore_eos) or token_id in params.stop_token_ids
            ):
                self.finish(seq.seq_id, FinishReason.STOP)
            elif (params.max_tokens is not None and num_output >= params.max_tokens) or num_tokens >= max_seq_len:
                self.finish(seq.seq_id, FinishReason.LENGTH)
        return updated

    # ----------------------------------------------------------------------------- internals

    def _pending_token_ends(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence's pending token (``num_tokens`` counts it) will end it by length, so that
        planning one more step for it would be wasted (and could reach past the context)."""
        max_tokens = seq.params.max_tokens
        return num_tokens >= self.max_seq_len or (
            max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens)

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[int]) -> bool:
        """Allocate blocks for the first ``num_tokens`` tokens of a running sequence, preempting the
        last-arrived running sequences as needed. False if ``seq`` itself had to be preempted."""
        while not self.block_manager.allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def set_running_limit(self, limit: int) -> int:
        """Admit waiting sequences only while fewer than ``limit`` run (clamped to 1..max_num_seqs; sequences
        already running above it keep running). Returns the limit set."""
        self.running_limit = max(1, min(int(limit), self.config.max_num_seqs))
        return self.running_limit

    def set_admission_floor(self, floor: int | None) -> int | None:
        """Admit waiting sequences only in steps that start with at most ``floor`` running (clamped to
        0..max_num_seqs - 1), or in every step (None). Returns the floor set."""
        self.admission_floor = None if floor is None else max(0, min(int(floor), self.config.max_num_seqs - 1))
        return self.admission_floor

    def _preempt(self, seq: Sequence) -> None:
        """Release the sequence's blocks and queue it again to be recomputed (its tokens are kept)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_scheduled_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        rank = self._rank[seq.seq_id]
        later = (j for j, s in enumerate(self.waiting) if self._rank[s.seq_id] > rank)
        self.waiting.insert(next(later, len(self.waiting)), seq)

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        """Admit waiting sequences in arrival order until one does not fit (nothing passes it)."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.running_limit:
            seq = self.waiting[0]
            if seq.num_pending or self._waits_for_sibling(seq):
                break  # (a token still in flight from before its preemption: admitted once it has arrived)
            cached = bm.find_cached_prefix(seq, seq.num_tokens - 1)  # always compute the last token
            num_cached = len(cached) * bm.block_size
            remaining = seq.num_tokens - num_cached
            if self.admission_floor is not None and chunks and remaining > budget:
                break  # a wave takes whole prompts (a part would leave the rest beside the wave's decoding)
            if self.config.enable_chunked_prefill:
                n = min(remaining, budget)
            elif remaining <= budget or not chunks:
                n = remaining  # a prompt over the budget may run alone
            else:
                break
            if not bm.allocate(seq, num_cached + n, cached):
                break
            self.waiting.popleft()
            if bm.enable_prefix_caching:
                bm.stats.record(seq.num_tokens, num_cached)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: self._rank[s.seq_id])
            chunks.append(self._chunk(seq, num_cached, n, seq.num_tokens))
            budget -= n

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """With n > 1 and prefix caching, a sample waits while a running sibling still computes the
        prompt's shareable full blocks, so it then finds them in the cache instead of computing them."""
        if seq.params.n == 1 or not self.block_manager.enable_prefix_caching:
            return False
        bs = self.block_size
        shareable = (seq.num_prompt_tokens - 1) // bs * bs  # a hit always leaves the last token
        return any(s.status is SequenceStatus.RUNNING and s.num_computed_tokens < shareable
                   for s in self._requests[seq.request_id] if s is not seq)

    @staticmethod
    def _chunk(seq: Sequence, start: int, n: int, num_tokens: int) -> ScheduledChunk:
        """The chunk of ``n`` tokens of ``seq`` from position ``start`` (``num_tokens``: its length, pending
        tokens included), counted as scheduled."""
        tokens = seq.token_ids
        sample = start + n == num_tokens
        seq.num_scheduled_tokens = start + n
        if sample:
            seq.num_pending += 1
        params = seq.params
        if sample and params.needs_penalties:
            prompt, output = tuple(seq.prompt_token_ids), tuple(tokens[seq.num_prompt_tokens:])
        else:
            prompt = output = ()
        return ScheduledChunk(  # positional: the keyword form costs twice as much, once per sequence per step
            seq.seq_id,
            (tokens[start] if start < len(tokens) else PENDING_TOKEN,) if n == 1 else tuple(tokens[start:start + n]),
            start,
            tuple(seq.block_table),
            sample,
            params,
            seq.sample_index,
            num_tokens - seq.num_prompt_tokens,
            prompt,
            output,
        )


_RUNNING = SequenceStatus.RUNNING  # a module constant: enum attribute look-ups are slow on Python 3.11
