"""LLMEngine: one model, a scheduler over a paged KV cache and a model runner, stepped by the caller.

``add_request`` queues a prompt, ``step`` runs one batched model step for everything running and
returns the requests that progressed; LLM.generate, the CLI and the server all drive it.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch

from trident.attention.registry import create_backend, resolve_backend_name
from trident.config import EngineConfig
from trident.engine.output import OutputProcessor
from trident.engine.request import FinishReason, SamplingParams, Sequence
from trident.engine.results import CompletionOutput, RequestMetrics, RequestOutput
from trident.engine.runner import ModelRunner
from trident.engine.sampler import Sampler
from trident.engine.scheduler import Scheduler
from trident.engine.sizing import kv_dtype_of, num_kv_blocks, resolve_dtype, resolve_max_model_len
from trident.errors import TridentError
from trident.loader import Checkpoint, load_checkpoint
from trident.models.build import build_model


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    delta: dict[int, str]


@dataclass(frozen=True)
class MemoryUsage:
    weights_bytes: int
    """Parameters and buffers (weights mapped from a file count too: they are resident once touched)."""
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int


class LLMEngine:
    """A single-model engine. Not thread-safe: one caller steps it."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
        t0 = time.perf_counter()
        self.config = config
        if config.num_threads is not None or config.device == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise TridentError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
        checkpoint = checkpoint or load_checkpoint(config.model or None)
        self.checkpoint = checkpoint
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.attention_backend = resolve_backend_name(config.attention_backend, self.device)
        """The attention backend in use (torch or triton), auto resolved."""
        backend = create_backend(self.attention_backend, self.device)
        self.model = build_model(self.model_config, checkpoint.tensors, dtype=self.dtype, device=self.device,
                                 backend=backend)
        self.max_model_len = resolve_max_model_len(self.model_config, config, self.device)
        cache = config.cache
        kv_dtype = kv_dtype_of(config, self.dtype)
        num_blocks = num_kv_blocks(self.model_config, config, self.max_model_len, kv_dtype)
        self.num_blocks = num_blocks
        self.runner = ModelRunner(self.model, backend=backend, num_blocks=num_blocks, block_size=cache.block_size,
                                  kv_dtype=kv_dtype, device=self.device,
                                  sampler=Sampler(seed=config.seed, device=self.device))
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else self.model_config.eos_token_ids
        self.eos_token_ids = eos
        self.scheduler = Scheduler(config.scheduler, cache, num_blocks, self.max_model_len, eos)
        self.outputs = OutputProcessor(self.tokenizer) if self.tokenizer else None
        self._requests: dict[str, _Request] = {}
        self._seq_to_request: dict[int, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.load_seconds = time.perf_counter() - t0

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TridentError("this model has no tokenizer; pass prompt token ids instead of text")
            prompt_ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            prompt_ids = [int(t) for t in prompt]
            text = None
        if not prompt_ids:
            raise TridentError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise TridentError(f"prompt token ids must be in [0, {vocab})")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise TridentError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        seqs = [Sequence(seq_id=next(self._seq_ids), request_id=request_id, sample_index=i,
                         prompt_token_ids=list(prompt_ids), params=params, arrival_time=now)
                for i in range(params.n)]
        for seq in seqs:  # validates length against the context and the cache; nothing queued on error
            self.scheduler.check(seq)
        request = _Request(request_id, text, list(prompt_ids), seqs, {})
        for seq in seqs:
            self.scheduler.add(seq)
            self._seq_to_request[seq.seq_id] = request
        self._requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.abort_request(request_id)
        self._forget(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that got new tokens (or finished) in it."""
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        changed = self.scheduler.update(plan, result)
        touched: dict[str, _Request] = {}
        for seq in changed:
            request = self._seq_to_request[seq.seq_id]
            touched[request.request_id] = request
            if self.outputs is None:
                continue
            delta = self.outputs.process(seq)
            if delta.stopped and not seq.is_finished:
                self.scheduler.finish(seq.seq_id, FinishReason.STOP)
            text = delta.text + (self.outputs.flush(seq) if seq.is_finished else "")
            request.delta[seq.seq_id] = request.delta.get(seq.seq_id, "") + text
        results = [self._output(request) for request in touched.values()]
        for out in results:
            if out.finished:
                self._forget(self._requests.pop(out.request_id))
        return results

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            if self.outputs is not None:
                text = self.outputs.text(seq.seq_id)
            else:
                text = ""
            completions.append(CompletionOutput(
                index=seq.sample_index, text=text, delta_text=request.delta.pop(seq.seq_id, ""),
                token_ids=tuple(seq.output_token_ids),
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                logprobs=tuple(seq.logprobs) if seq.params.logprobs is not None else None,
            ))
        first = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        done = [s.finish_time for s in request.seqs if s.finish_time is not None]
        finished = all(s.is_finished for s in request.seqs)
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=tuple(request.prompt_token_ids), outputs=tuple(completions), finished=finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=request.seqs[0].arrival_time, first_token_time=min(first) if first else None,
                finish_time=max(done) if finished and done else None,
                num_preemptions=sum(s.num_preemptions for s in request.seqs),
            ),
        )

    def _forget(self, request: _Request) -> None:
        for seq in request.seqs:
            self._seq_to_request.pop(seq.seq_id, None)
            if self.outputs is not None:
                self.outputs.release(seq.seq_id)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.block_manager.usage,
            num_preemptions=s.num_preemptions, prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
        )

    def memory_usage(self) -> MemoryUsage:
        """Bytes this engine holds: its weights (each storage counted once) and its KV cache."""
        storages = {}
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        kv = sum(k.nbytes + v.nbytes for k, v in self.runner.kv_caches)
        return MemoryUsage(weights_bytes=sum(storages.values()), kv_cache_bytes=kv)
