"""AsyncEngine: one LLMEngine shared by many asyncio callers (HTTP requests) through one stepping task.

Every request gets its own queue of RequestOutputs. A single background task steps the engine while
any request is unfinished, so requests that arrive while others run join the same batch (continuous
batching). The blocking ``engine.step()`` runs in a worker thread (asyncio's default executor, or the one
given: a tensor-parallel engine steps on one thread of its own, trident/distributed/serve.py), so the event
loop keeps serving other clients meanwhile; an ``asyncio.Lock`` makes sure that ``add_request``, ``abort``
and ``step`` never overlap (the LLMEngine is not thread-safe).

Observers (``add_observer``; the server's metrics) hear once about every accepted request's end and
about the engine's figures after each step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from trident.engine.engine import EngineStats, LLMEngine
from trident.engine.request import SamplingParams
from trident.engine.results import RequestOutput
from trident.errors import TridentError

logger = logging.getLogger("trident.serve")


class QueueFullError(TridentError):
    """The engine already holds as many waiting requests as allowed; nothing was queued (retry later)."""


class RequestTimeoutError(TridentError):
    """A request ran past its time limit; it has been aborted and its KV blocks are freed."""


class EngineObserver(Protocol):
    """Told about every request leaving the AsyncEngine and about the engine's figures (e.g. metrics)."""

    def request_done(self, status: str, last: RequestOutput | None) -> None:
        """Called exactly once per accepted request: ``status`` is the finish reason when it finished
        ("stop", "length"), "abort" when its listener left first, "error" when the engine failed;
        ``last`` is its final output, or the latest one delivered (None if none was)."""

    def engine_stats(self, stats: EngineStats) -> None:
        """Called after each engine step and when the loop goes idle."""


@dataclass(frozen=True)
class AsyncEngineStats:
    """Counters of the async layer (the engine's own figures come from ``engine.stats()``)."""

    num_requests: int
    """Requests accepted so far."""
    num_aborted: int
    """Requests aborted before they finished (client gone or cancelled)."""
    num_streams: int
    """Requests whose outputs someone is still waiting for."""


class RequestStream:
    """The outputs of one request, as an async iterator; ``close()`` aborts it if it has not finished.

    Each item is the request's full state after a step (text so far, ``delta_text`` of that step); the
    last one has ``finished=True``. With a ``deadline`` (``time.monotonic()`` seconds), waiting past it
    aborts the request and raises :class:`RequestTimeoutError`.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, queue: asyncio.Queue,
                 deadline: float | None = None, timeout_s: float | None = None) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue = queue
        self._deadline = deadline
        self._timeout_s = timeout_s
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._next_item()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def _next_item(self) -> RequestOutput | BaseException:
        if self._deadline is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), max(self._deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self.finished = True
            self._owner._abort(self.request_id, status="error")
            raise RequestTimeoutError(f"the request ran longer than the server's time limit of "
                                      f"{self._timeout_s:g} s and was aborted; ask for fewer tokens or retry "
                                      "when the server is less busy") from None

    def close(self) -> None:
        """Stop listening; an unfinished request is aborted (its KV blocks are freed before the next step)."""
        if not self.finished:
            self.finished = True
            self._owner._abort(self.request_id)


class AsyncEngine:
    """Drives one :class:`LLMEngine` from asyncio; see the module docstring."""

    def __init__(self, engine: LLMEngine, executor: Executor | None = None) -> None:
        self.engine = engine
        self._executor = executor
        """Where ``engine.step`` runs (None: asyncio's default executor, any of its threads)."""
        self._lock = asyncio.Lock()
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_aborts: set[str] = set()
        self._loop_task: asyncio.Task | None = None
        self._loop_running = False
        self._num_requests = 0
        self._num_aborted = 0
        self._last_outputs: dict[str, RequestOutput] = {}
        """request_id -> latest output delivered, for requests still in ``_queues``."""
        self._observers: list[EngineObserver] = []

    def add_observer(self, observer: EngineObserver) -> None:
        """Report every request's end and the engine's figures to ``observer`` from now on."""
        self._observers.append(observer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                     max_waiting: int | None = None, timeout_s: float | None = None) -> RequestStream:
        """Queue a request and return its output stream. Raises TridentError (nothing queued) on bad input,
        :class:`QueueFullError` when the engine already holds ``max_waiting`` waiting requests. With
        ``timeout_s``, the stream aborts the request once it has run that long (from now)."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        async with self._lock:
            if max_waiting is not None and self.engine.stats().num_waiting >= max_waiting:
                raise QueueFullError(f"the server is busy: {max_waiting} requests are already waiting; retry later")
            self.engine.add_request(prompt, params, request_id)
            self._queues[request_id] = queue
            self._num_requests += 1
            if not self._loop_running:
                self._loop_running = True
                self._loop_task = asyncio.create_task(self._run(), name="trident-engine-loop")
        return RequestStream(self, request_id, queue, deadline=deadline, timeout_s=timeout_s)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving the loop early (or being cancelled) aborts it."""
        stream = await self.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def stats(self) -> AsyncEngineStats:
        return AsyncEngineStats(num_requests=self._num_requests, num_aborted=self._num_aborted,
                                num_streams=len(self._queues))

    async def wait_idle(self) -> None:
        """Return once the stepping task has nothing left to do (for shutdown and tests)."""
        while self._loop_running and self._loop_task is not None:
            await asyncio.shield(self._loop_task)

    # -- internals --------------------------------------------------------------------------------
    def _abort(self, request_id: str, status: str = "abort") -> None:
        """Forget the request's queue now; the engine abort happens under the lock, before the next step.
        Observers hear ``status``: "abort" (listener gone) or "error" (timed out)."""
        if self._queues.pop(request_id, None) is not None:
            self._pending_aborts.add(request_id)
            self._num_aborted += 1
            self._notify_done(request_id, status, self._last_outputs.pop(request_id, None))

    def _apply_aborts(self) -> None:
        for request_id in self._pending_aborts:
            self.engine.abort(request_id)
        self._pending_aborts.clear()

    async def _run(self) -> None:
        """Step the engine until no request is left; deliver each step's outputs to their queues."""
        while True:
            async with self._lock:
                self._apply_aborts()
                if not self.engine.has_unfinished():
                    self._loop_running = False
                    self._notify_stats()
                    return
                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.step)
                except asyncio.CancelledError:  # shutdown: the step thread may still run, so leave the engine be
                    self._loop_running = False
                    self._fail_queues(RuntimeError("the server is shutting down"))
                    raise
                except Exception as e:  # an engine failure fails every waiting request instead of hanging it
                    for request_id in list(self._queues):
                        self.engine.abort(request_id)
                    self._fail_queues(e)
                    continue
                self._notify_stats()
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait(out)
                if out.finished:
                    del self._queues[out.request_id]
                    self._last_outputs.pop(out.request_id, None)
                    self._notify_done(out.request_id, _finish_status(out), out)
                else:
                    self._last_outputs[out.request_id] = out

    def _fail_queues(self, error: Exception) -> None:
        queues, self._queues = self._queues, {}
        for request_id, queue in queues.items():
            queue.put_nowait(error)
            self._notify_done(request_id, "error", self._last_outputs.pop(request_id, None))

    def _notify_done(self, request_id: str, status: str, last: RequestOutput | None) -> None:
        for observer in self._observers:
            try:
                observer.request_done(status, last)
            except Exception:  # an observer must never stall the engine loop
                logger.exception("observer failed on the end of %s", request_id)

    def _notify_stats(self) -> None:
        if not self._observers:
            return
        stats = self.engine.stats()
        for observer in self._observers:
            try:
                observer.engine_stats(stats)
            except Exception:  # an observer must never stall the engine loop
                logger.exception("observer failed on engine stats")


def _finish_status(output: RequestOutput) -> str:
    """One status for a finished request: "abort" if any sample was aborted, else "length" if any ran
    out of tokens, else "stop"."""
    reasons = {c.finish_reason for c in output.outputs}
    for status in ("abort", "length"):
        if status in reasons:
            return status
    return "stop"
