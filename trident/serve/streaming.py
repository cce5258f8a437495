"""Pieces both generation routes share: SSE framing, usage, per-choice stream progress, and waiting
for a request's final output while watching for the client going away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.requests import Request

from trident.engine.request import SampledToken
from trident.engine.results import CompletionOutput, RequestOutput
from trident.serve.async_engine import RequestStream, RequestTimeoutError
from trident.serve.protocol import ErrorInfo, ErrorResponse, PromptTokensDetails, Usage

logger = logging.getLogger("trident.serve")
DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.5
"""How often a non-streaming request checks whether its client is still there."""


def sse(event: BaseModel) -> str:
    """One server-sent event carrying the model as JSON (fields that are None are left out)."""
    return f"data: {event.model_dump_json(exclude_none=True)}\n\n"


def usage(out: RequestOutput) -> Usage:
    """Token counts of a request: its prompt, all its samples' generated tokens, cached prompt tokens."""
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens))


@dataclass(frozen=True)
class ChoiceStep:
    """What one choice gained in one engine step."""

    text: str
    logprobs: tuple[SampledToken, ...] | None
    finish_reason: str | None
    text_offset: int
    """Characters of this choice sent before this step."""


class ChoiceTracker:
    """Remembers, per choice, how many tokens and characters were sent and whether it finished."""

    def __init__(self) -> None:
        self._tokens: dict[int, int] = {}
        self._chars: dict[int, int] = {}
        self._done: set[int] = set()

    def advance(self, c: CompletionOutput) -> ChoiceStep | None:
        """The choice's news since the last call, or None when there is nothing to send."""
        if c.index in self._done:
            return None
        sent = self._tokens.get(c.index, 0)
        self._tokens[c.index] = len(c.token_ids)
        new_logprobs = c.logprobs[sent:] if c.logprobs is not None else None
        offset = self._chars.get(c.index, 0)
        self._chars[c.index] = offset + len(c.delta_text)
        if c.finish_reason is not None:
            self._done.add(c.index)
        if not c.delta_text and c.finish_reason is None and not new_logprobs:
            return None
        return ChoiceStep(text=c.delta_text, logprobs=new_logprobs, finish_reason=c.finish_reason,
                          text_offset=offset)


ChunkBuilder = Callable[[list[tuple[int, ChoiceStep]], Usage | None], BaseModel]
"""Builds one route's chunk from (choice index, news) pairs, or the closing usage-only chunk (no pairs)."""


async def sse_events(stream: RequestStream, build_chunk: ChunkBuilder, include_usage: bool,
                     first: BaseModel | None = None) -> AsyncIterator[str]:
    """The SSE body of a streamed generation: an optional first chunk, a chunk per engine step that brought
    news, the usage chunk when asked for, then [DONE]. A failure (or timeout) after the response has begun
    ends the stream with an error event. Closing the iterator (client gone) aborts the request."""
    tracker = ChoiceTracker()
    last = None
    try:
        if first is not None:
            yield sse(first)
        async for out in stream:
            last = out
            steps = [(c.index, step) for c in out.outputs if (step := tracker.advance(c)) is not None]
            if steps:
                yield sse(build_chunk(steps, None))
        if include_usage and last is not None:
            yield sse(build_chunk([], usage(last)))
        yield DONE
    except Exception as e:
        yield error_event(e)
        yield DONE
    finally:
        stream.close()


async def _last(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None and last.finished
    return last


async def final_output(stream: RequestStream, request: Request) -> RequestOutput | None:
    """The request's finished output; None if the client disconnected first (the request is aborted)."""
    task = asyncio.ensure_future(_last(stream))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
        stream.close()


def error_event(error: Exception) -> str:
    """The SSE event a stream ends with when the engine fails, or the request times out, after the response
    has begun."""
    if isinstance(error, RequestTimeoutError):
        logger.info("stream timed out: %s", error)
        body = ErrorResponse(error=ErrorInfo(message=str(error), type="timeout_error", code="request_timeout"))
        return f"data: {body.model_dump_json()}\n\n"
    logger.error("generation failed mid-stream: %s", error)
    body = ErrorResponse(error=ErrorInfo(message="generation failed; see the server log", type="server_error"))
    return f"data: {body.model_dump_json()}\n\n"
