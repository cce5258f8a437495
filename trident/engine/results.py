"""What generation returns to callers (LLM.generate, the CLI, the server). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from trident.engine.request import SampledToken


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's n samples, as it stands after a step."""

    index: int
    text: str
    """Text so far (final text once finished; stop strings removed)."""
    delta_text: str
    """Text added by this step (for streaming)."""
    token_ids: tuple[int, ...]
    finish_reason: str | None
    """None while running; "stop", "length" or "abort" once finished."""
    logprobs: tuple[SampledToken, ...] | None = None


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
    def token_ids(self) -> tuple[int, ...]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
