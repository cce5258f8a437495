"""POST /v1/chat/completions: messages rendered with the model's chat template, replies streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.responses import Response

from trident.serve.async_engine import RequestStream
from trident.serve.context import ServeContext, new_id
from trident.serve.errors import ApiError, error_response
from trident.serve.logprobs import chat_logprobs
from trident.serve.metrics_middleware import mark_submitted
from trident.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from trident.serve.streaming import ChoiceStep, final_output, sse_events, usage


def _num_logprobs(body: ChatCompletionRequest) -> int | None:
    """The engine's logprobs count: None unless ``logprobs`` is true; then ``top_logprobs`` (default 0)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    if not body.logprobs:
        return None
    return body.top_logprobs or 0


def _max_tokens(body: ChatCompletionRequest) -> tuple[int | None, str]:
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"


async def create_chat_completion(ctx: ServeContext, body: ChatCompletionRequest, request: Request) -> Response:
    max_tokens, max_tokens_param = _max_tokens(body)
    num_logprobs = _num_logprobs(body)
    params = body.sampling_params(max_tokens, num_logprobs)
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list) and any(part.type != "text" for part in message.content):
            raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
    prompt_ids = ctx.tokenizer().encode_chat([m.as_template_message() for m in body.messages])
    ctx.check_length(len(prompt_ids), max_tokens, prompt_param="messages", max_tokens_param=max_tokens_param)
    request_id = new_id("chatcmpl")
    stream = await ctx.submit(prompt_ids, params, request_id)
    mark_submitted(request)
    if body.stream:
        return StreamingResponse(_events(ctx, body, num_logprobs, stream), media_type="text/event-stream")
    out = await final_output(stream, request)
    if out is None:
        return error_response(499, "the client closed the connection")
    tokenizer = ctx.engine.tokenizer
    choices = [
        ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                   logprobs=chat_logprobs(tokenizer, c.logprobs, num_logprobs)
                   if num_logprobs is not None and c.logprobs is not None else None)
        for c in out.outputs
    ]
    response = ChatCompletionResponse(id=request_id, model=ctx.served_model_name, choices=choices, usage=usage(out))
    return Response(response.model_dump_json(), media_type="application/json")


def _events(ctx: ServeContext, body: ChatCompletionRequest, num_logprobs: int | None,
            stream: RequestStream) -> AsyncIterator[str]:
    """SSE chunks: a role chunk per choice, content deltas, a finish chunk per choice, [DONE]."""
    model = ctx.served_model_name

    def chunk(steps: list[tuple[int, ChoiceStep]], use: Usage | None) -> ChatCompletionChunk:
        choices = []
        for index, step in steps:
            logprobs = None
            if num_logprobs is not None and step.logprobs:
                logprobs = chat_logprobs(ctx.engine.tokenizer, step.logprobs, num_logprobs)
            choices.append(ChatChunkChoice(index=index, delta=ChatDelta(content=step.text or None),
                                           logprobs=logprobs, finish_reason=step.finish_reason))
        return ChatCompletionChunk(id=stream.request_id, model=model, choices=choices, usage=use)

    first = ChatCompletionChunk(id=stream.request_id, model=model, choices=[
        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(body.n)])
    return sse_events(stream, chunk, body.include_usage, first=first)
