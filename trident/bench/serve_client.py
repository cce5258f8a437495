"""One streamed request of `trident bench serve`: POST /completions with stream=true, SSE parsed here,
timings taken per content chunk. Every failure becomes a record, never an exception."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from trident.bench.serve_workload import PlannedRequest


@dataclass
class RequestRecord:
    """What one request did. Times are milliseconds, except ``start_s`` (seconds after the bench began)."""

    index: int
    input_len: int
    output_len: int
    """Requested output tokens (max_tokens)."""
    start_s: float = 0.0
    success: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    """As the server counted them (usage)."""
    output_tokens: int = 0
    """From the final usage; the number of content chunks when the server sent no usage."""
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    tpot_ms: float | None = None
    """(e2e - ttft) / (output_tokens - 1); None with fewer than two output tokens."""
    itl_ms: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks."""


def completion_body(model: str, req: PlannedRequest) -> dict:
    """The JSON body: greedy, streamed with usage, ignore_eos so that exactly output_len tokens come."""
    return {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def send_request(client: httpx.AsyncClient, base_url: str, model: str, req: PlannedRequest,
                       api_key: str | None, timeout_s: float, bench_start: float) -> RequestRecord:
    """Send ``req`` and time it; an HTTP error, a broken stream or running past ``timeout_s`` fails it."""
    record = RequestRecord(index=req.index, input_len=req.input_len, output_len=req.output_len)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    record.start_s = start - bench_start
    try:
        await asyncio.wait_for(_stream(client, f"{base_url.rstrip('/')}/completions", completion_body(model, req),
                                       headers, record, start), timeout=timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout_s:g} s"
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    record.success = record.error is None
    return record


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict, record: RequestRecord,
                  start: float) -> None:
    chunk_times: list[float] = []
    usage_tokens: int | None = None
    done = False
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            record.error = f"HTTP {response.status_code}: {text}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                record.error = f"server error in stream: {event['error']}"
                return
            if any(c.get("text") for c in event.get("choices") or ()):
                chunk_times.append(time.perf_counter())
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
                record.prompt_tokens = event["usage"].get("prompt_tokens")
    end = time.perf_counter()
    if not done:
        record.error = "stream ended without [DONE]"
        return
    if not chunk_times:
        record.error = "no content received"
        return
    _fill_timings(record, start, chunk_times, end, usage_tokens)


def _fill_timings(record: RequestRecord, start: float, chunk_times: list[float], end: float,
                  usage_tokens: int | None) -> None:
    record.output_tokens = usage_tokens if usage_tokens is not None else len(chunk_times)
    record.ttft_ms = (chunk_times[0] - start) * 1e3
    record.e2e_ms = (end - start) * 1e3
    record.itl_ms = [(b - a) * 1e3 for a, b in zip(chunk_times, chunk_times[1:])]
    if record.output_tokens > 1:
        record.tpot_ms = (record.e2e_ms - record.ttft_ms) / (record.output_tokens - 1)
