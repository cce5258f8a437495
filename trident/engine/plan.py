"""What the scheduler asks of the model runner for one step, and what comes back. Imports no torch.

The scheduler and the runner talk only through these plain, immutable records, so either side can be
faked in a test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from trident.engine.request import SampledToken, SamplingParams

PENDING_TOKEN = -1
"""Stands in a chunk's ``token_ids`` for a token still being sampled on the device by the step before (with
asynchronous scheduling): the runner feeds the device's sampled token in its place."""


class ScheduledChunk(NamedTuple):
    """The tokens of one sequence to run through the model in this step.

    A typed NamedTuple rather than a frozen dataclass: one is built per running sequence per step, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs several times more. Build
    it by keyword in tests; ``chunk._replace(...)`` stands in for ``dataclasses.replace``.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    """Tokens to compute now: seq.token_ids[start_pos : start_pos + len(token_ids)], or (PENDING_TOKEN,) for a
    one-token chunk whose token the step in flight is still sampling."""
    start_pos: int
    """Position of token_ids[0]; the KV cache already holds positions [0, start_pos)."""
    block_table: tuple[int, ...]
    """Physical KV blocks covering positions [0, start_pos + len(token_ids))."""
    sample: bool
    """True when this chunk ends at the sequence's last token: a next token is sampled from it."""
    params: SamplingParams
    sample_index: int = 0
    """Which of the request's n samples this is (decorrelates seeded samples)."""
    num_output_tokens: int = 0
    """Tokens generated so far (with the seed, makes seeded sampling reproducible after preemption)."""
    prompt_token_ids: tuple[int, ...] = ()
    """Only filled when sampling needs the history (penalties)."""
    output_token_ids: tuple[int, ...] = ()
    """Only filled when sampling needs the history (penalties)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    """One engine step: the chunks to compute, in order (decodes and prefill chunks mixed)."""

    chunks: tuple[ScheduledChunk, ...]
    preempted_seq_ids: tuple[int, ...] = ()
    """Sequences whose blocks were taken back this step; they will be recomputed later."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def longest_decodes_first(self) -> StepPlan:
        """This plan with its one-token (decode) chunks in order of decreasing context, each prefill chunk kept
        in its place. Attention kernels hand out their blocks in row order, so the longest contexts start first
        and the last wave holds the short ones instead of one long straggler. The order of the chunks means
        nothing else: sampled tokens go back by sequence id."""
        chunks = self.chunks
        starts = [c.start_pos if len(c.token_ids) == 1 else -1 for c in chunks]  # -1: a prefill chunk
        decodes = [i for i, start in enumerate(starts) if start >= 0]
        if len(decodes) < 2:
            return self
        ordered = sorted(decodes, key=starts.__getitem__, reverse=True)  # stable: ties keep their order
        if ordered == decodes:
            return self
        new = list(chunks)
        for slot, i in zip(decodes, ordered):
            new[slot] = chunks[i]
        return replace(self, chunks=tuple(new))


@dataclass(frozen=True)
class StepResult:
    """The runner's answer: a sampled token for every chunk whose ``sample`` was set."""

    sampled: dict[int, SampledToken]
    """seq_id -> token."""
