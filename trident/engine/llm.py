"""LLM: the offline API. ``LLM(model).generate(prompts, SamplingParams)`` batches every prompt
continuously and returns one RequestOutput per prompt, in order."""

from __future__ import annotations

from collections.abc import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from trident.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.engine import LLMEngine
from trident.engine.request import SamplingParams
from trident.engine.results import RequestOutput
from trident.errors import TridentError
from trident.moe.stats import MoeStats
from trident.progress import progress_bar

Prompt = str | list[int]


class LLM:
    """Load a model (a GGUF file, a Hugging Face folder, or None for the embedded SmolLM2) and generate.

    Keyword arguments are EngineConfig fields (device, dtype, max_model_len, num_threads, seed,
    attention_backend, experts_backend) plus
    the cache and scheduler fields (block_size, num_blocks, memory_budget_bytes, enable_prefix_caching,
    max_num_seqs, max_num_batched_tokens, enable_chunked_prefill).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.engine = LLMEngine(engine_config(model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, *, use_progress: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise TridentError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
        except TridentError:
            for request_id in ids:
                engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with progress_bar(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True, disable=not use_progress) as progress:
            task = progress.add_task("generate", total=len(ids))
            while len(finished) < len(ids):
                for out in engine.step(only_finished=True):  # no per-step outputs: only the final ones
                    finished[out.request_id] = out
                    progress.advance(task)
        return [finished[i] for i in ids]

    def moe_stats(self) -> MoeStats | None:
        """Expert load statistics of an MoE model (see LLMEngine.moe_stats); None for a dense model."""
        return self.engine.moe_stats()

    def chat(self, conversations: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             **kwargs) -> list[RequestOutput]:
        """Generate replies to chat conversations (lists of {"role", "content"} messages)."""
        if self.tokenizer is None:
            raise TridentError("this model has no tokenizer, so it cannot chat")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, params, **kwargs)


_CACHE_FIELDS = set(CacheConfig.__dataclass_fields__)
_SCHEDULER_FIELDS = set(SchedulerConfig.__dataclass_fields__)
_ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__) - {"model", "cache", "scheduler"}


def engine_config(model: str | None, **kwargs) -> EngineConfig:
    """EngineConfig from flat keyword arguments; an unknown keyword is an error naming the valid ones."""
    unknown = set(kwargs) - _CACHE_FIELDS - _SCHEDULER_FIELDS - _ENGINE_FIELDS
    if unknown:
        valid = ", ".join(sorted(_CACHE_FIELDS | _SCHEDULER_FIELDS | _ENGINE_FIELDS))
        raise TridentError(f"unknown engine option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return EngineConfig(
        model=model or "",
        cache=CacheConfig(**{k: v for k, v in kwargs.items() if k in _CACHE_FIELDS}),
        scheduler=SchedulerConfig(**{k: v for k, v in kwargs.items() if k in _SCHEDULER_FIELDS}),
        **{k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS},
    )
