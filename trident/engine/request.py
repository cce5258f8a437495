"""Requests, sampling parameters and sequences. Imports no torch.

A request (one prompt) owns ``n`` sequences (one per sample). Sequences are what the scheduler and
the block manager see; they share the prompt's KV blocks through the prefix cache.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from functools import cached_property

from trident.errors import TridentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated once, at construction."""

    n: int = 1
    """Number of independent samples (sequences) for the prompt."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (divide positive logits, multiply negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated."""
    seed: int | None = None
    """Per-request seed: the same seed, prompt and params give the same tokens."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """Stop conditions (EOS, stop ids, stop strings) are ignored until this many tokens exist."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first match (also across token boundaries)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (the token is kept in token_ids, not in the text)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (0 = only the token)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(_is_real(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_real(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(_is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(_is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

    # Derived flags are read for every sequence at every step: computed once (cached_property writes the
    # instance's __dict__ directly, so it works on a frozen dataclass and never takes part in == or hash).
    @cached_property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TridentError(f"invalid sampling parameters: {message}")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # aborted by the caller (e.g. client disconnected)


@dataclass(frozen=True)
class SampledToken:
    """One sampled token with its log-probability and top alternatives (when asked for)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False, slots=True)
class Sequence:
    """One sample of a request: its tokens, KV blocks and progress. Mutated only by the scheduler.

    ``token_ids`` and ``logprobs`` are append-only: nothing ever shortens or rewrites them (a preempted
    sequence keeps its tokens), so a view of their first items stays valid for good (the engine hands
    out outputs that way instead of copying them every step).
    """

    seq_id: int
    request_id: str
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    """Prompt followed by the generated tokens (append-only)."""
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the KV cache (steps whose results the scheduler has applied)."""
    num_scheduled_tokens: int = 0
    """``num_computed_tokens`` plus the tokens of steps launched but not yet applied (with asynchronous
    scheduling, the step in flight on the device); equal to it between synchronous steps."""
    num_pending: int = 0
    """Sampled tokens on their way: scheduled sampling chunks whose token is not yet in ``token_ids``."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at the first schedule (for usage and metrics)."""
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[SampledToken] = field(default_factory=list)
    """The sampled tokens, when ``params.logprobs`` asks for them (append-only)."""
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = field(init=False)
    """``len(prompt_token_ids)``, kept because it is read for every sequence at every step."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED


_FINISHED = SequenceStatus.FINISHED  # a module constant: enum attribute look-ups are slow on Python 3.11
