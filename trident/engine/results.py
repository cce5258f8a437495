"""What generation returns to callers (LLM.generate, the CLI, the server). Imports no torch.

An output is a value: nothing in it changes after it was handed out, although the engine goes on
generating. Token ids and logprobs come as :class:`Snapshot` views of the sequence's append-only lists,
so an output costs the same to build at the 1st token as at the 10,000th (a tuple copy per step would
make streaming a request quadratic in its length).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from trident.engine.request import SampledToken

T = TypeVar("T")


class Snapshot(SequenceABC, Generic[T]):
    """Items ``[start, stop)`` of a list that only ever grows at its end, read in place.

    Made in O(1), it behaves as the tuple of those items would: ``len``, indexing, iteration; a slice
    is a tuple; it equals, and hashes like, the tuple with the same items (and another snapshot with
    them), but not a list (as a tuple does not); ``+`` gives a tuple. Items appended to the list later
    are not part of it. The list's owner must never change or remove items below ``stop``.
    """

    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: list[T], start: int = 0, stop: int | None = None) -> None:
        stop = len(items) if stop is None else stop
        if not 0 <= start <= stop <= len(items):
            raise ValueError(f"snapshot bounds [{start}, {stop}) do not fit a list of {len(items)} items")
        self._items = items
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...
    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._stop - self._start)
            if step == 1:
                return tuple(self._items[self._start + start:self._start + max(start, stop)])
            return tuple(self._items[self._start:self._stop][index])
        n = self._stop - self._start
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("snapshot index out of range")
        return self._items[self._start + i]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._start, self._stop)

    def _tuple(self) -> tuple[T, ...]:
        return tuple(self._items[self._start:self._stop])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Snapshot):
            return len(self) == len(other) and self._tuple() == other._tuple()
        if isinstance(other, tuple):
            return len(self) == len(other) and self._tuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __add__(self, other: object) -> tuple:
        if isinstance(other, (tuple, Snapshot)):
            return self._tuple() + tuple(other)
        return NotImplemented

    def __radd__(self, other: object) -> tuple:
        if isinstance(other, tuple):
            return other + self._tuple()
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._tuple())

    def __reduce__(self) -> tuple:
        items = list(self)
        return Snapshot, (items, 0, len(items))


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's n samples, as it stands after a step."""

    index: int
    text: str
    """Text so far (final text once finished; stop strings removed)."""
    delta_text: str
    """Text added since the previous output of this request was handed out (for streaming): with
    ``LLMEngine.step()`` that is this step's text; when only finished requests are reported, all of it."""
    token_ids: Snapshot[int]
    """The generated token ids (tuple-like, see :class:`Snapshot`)."""
    finish_reason: str | None
    """None while running; "stop", "length" or "abort" once finished."""
    logprobs: Snapshot[SampledToken] | None = None
    """The sampled tokens with their log-probabilities, when asked for (tuple-like)."""


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(frozen=True)
class RequestOutput:
    """A request as it stands after an engine step: a value that later steps never change.

    ``LLMEngine.step()`` returns one for every request that progressed in the step; with
    ``step(only_finished=True)`` (LLM.generate) only the final one (``finished=True``) of each request.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    num_cached_tokens: int
    """Prompt tokens served from the prefix cache."""
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, over the longest sample; None before the end or with fewer than
        two tokens."""
        m = self.metrics
        longest = max((len(c.token_ids) for c in self.outputs), default=0)
        if longest < 2 or m.finish_time is None or m.first_token_time is None:
            return None
        return (m.finish_time - m.first_token_time) / (longest - 1)

    @property
    def token_ids(self) -> Snapshot[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
