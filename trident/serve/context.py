"""What every route needs about the model a request goes to: its engine, its name, its limits, request checks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from trident.engine.request import SamplingParams
from trident.serve.async_engine import AsyncEngine, RequestStream
from trident.serve.errors import ApiError


@dataclass(frozen=True)
class ServeContext:
    """One loaded model, as the routes see it (made by the ModelPool)."""

    engine: AsyncEngine
    served_model_name: str
    """The model's name in responses and on /metrics (an alias a request used resolves to it)."""
    max_queued_requests: int
    request_timeout_s: float | None = None

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Hand a checked request to the engine under the model's queue limit and the server's time limit
        (QueueFullError when the queue is full; the stream raises RequestTimeoutError past the limit)."""
        return await self.engine.submit(prompt_ids, params, request_id, max_waiting=self.max_queued_requests,
                                        timeout_s=self.request_timeout_s)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, *, prompt_param: str,
                     max_tokens_param: str) -> None:
        """400 if the prompt plus max_tokens cannot fit in the model's context."""
        limit = self.engine.max_model_len
        if num_prompt_tokens >= limit:
            raise ApiError(400, f"the prompt has {num_prompt_tokens} tokens but this model's context length is "
                           f"{limit} (and at least one token must be generated); shorten the prompt",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise ApiError(400, f"this model's context length is {limit} tokens, but {num_prompt_tokens} prompt "
                           f"tokens plus {max_tokens_param}={max_tokens} need {num_prompt_tokens + max_tokens}; "
                           f"lower {max_tokens_param} or shorten the prompt", param=max_tokens_param,
                           code="context_length_exceeded")

    def tokenizer(self):
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so it only takes prompts as token ids")
        return tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
