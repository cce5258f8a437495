"""POST /v1/completions: a text (or token-id) prompt in, one or n completions out, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.responses import Response

from trident.engine.results import CompletionOutput
from trident.serve.async_engine import RequestStream
from trident.serve.context import ServeContext, new_id
from trident.serve.errors import ApiError, error_response
from trident.serve.logprobs import completion_logprobs
from trident.serve.metrics_middleware import mark_submitted
from trident.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from trident.serve.streaming import ChoiceStep, final_output, sse_events, usage


def _prompt_ids(ctx: ServeContext, prompt: str | list) -> list[int]:
    """Token ids of the one prompt a request may carry (a string, ids, or a one-element list of either)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"this server takes one prompt per request, got {len(prompt)}; send them as "
                           "separate requests (they are batched together anyway)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return ctx.tokenizer().encode(prompt)
    return list(prompt)


async def create_completion(ctx: ServeContext, body: CompletionRequest, request: Request) -> Response:
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    params = body.sampling_params(body.max_tokens, body.logprobs)
    prompt_ids = _prompt_ids(ctx, body.prompt)
    ctx.check_length(len(prompt_ids), body.max_tokens, prompt_param="prompt", max_tokens_param="max_tokens")
    if body.logprobs and ctx.engine.tokenizer is None:
        raise ApiError(400, "logprobs need a tokenizer to name the tokens", param="logprobs")
    request_id = new_id("cmpl")
    stream = await ctx.submit(prompt_ids, params, request_id)
    mark_submitted(request)
    if body.stream:
        return StreamingResponse(_events(ctx, body, stream), media_type="text/event-stream")
    out = await final_output(stream, request)
    if out is None:
        return error_response(499, "the client closed the connection")
    choices = [_choice(ctx, body, c) for c in out.outputs]
    return Response(CompletionResponse(id=request_id, model=ctx.served_model_name, choices=choices,
                                       usage=usage(out)).model_dump_json(), media_type="application/json")


def _choice(ctx: ServeContext, body: CompletionRequest, c: CompletionOutput) -> CompletionChoice:
    logprobs = None
    if body.logprobs is not None and c.logprobs is not None:
        logprobs = completion_logprobs(ctx.engine.tokenizer, c.logprobs, body.logprobs)
    return CompletionChoice(index=c.index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason)


def _events(ctx: ServeContext, body: CompletionRequest, stream: RequestStream) -> AsyncIterator[str]:
    """SSE chunks of a streamed completion."""

    def chunk(steps: list[tuple[int, ChoiceStep]], use: Usage | None) -> CompletionResponse:
        choices = []
        for index, step in steps:
            logprobs = None
            if body.logprobs is not None and step.logprobs is not None:
                logprobs = completion_logprobs(ctx.engine.tokenizer, step.logprobs, body.logprobs, step.text_offset)
            choices.append(CompletionChoice(index=index, text=step.text, logprobs=logprobs,
                                            finish_reason=step.finish_reason))
        return CompletionResponse(id=stream.request_id, model=ctx.served_model_name, choices=choices, usage=use)

    return sse_events(stream, chunk, body.include_usage)
