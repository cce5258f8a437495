"""LLMEngine: one model, a scheduler over a paged KV cache and a model runner, stepped by the caller.

``add_request`` queues a prompt, ``step`` runs one batched model step for everything running and
returns the requests that progressed; LLM.generate, the CLI and the server all drive it.

Asynchronous scheduling (``EngineConfig.async_scheduling``, on by default on CUDA): ``step`` plans and
launches step k, and only then waits for step k-1's tokens and applies them, so the host's work (planning,
outputs, detokenizing) runs while the device computes. Step k reads the tokens step k-1 sampled straight
from the device. Each call still returns what one step produced: the outputs of the step before the one it
launched (the first call of a run returns none). Requests whose sampling needs the sequence's history
(penalties) switch the engine back to synchronous steps while they run.

Per-step host cost: the scheduler, the detokenizer and the outputs touch every running sequence at
every step, so each does O(1) work per sequence (amortized): outputs share the sequences' token lists
through :class:`~trident.engine.results.Snapshot` views instead of copying them, and
``step(only_finished=True)`` (what LLM.generate uses) builds no output, and decodes no text, for a
request until it finishes (text is still followed step by step for samples with stop strings).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trident.attention.registry import create_backend, resolve_backend_name
from trident.config import EngineConfig
from trident.engine.heap import release_free_heap
from trident.engine.output import OutputProcessor
from trident.engine.plan import StepPlan
from trident.engine.request import FinishReason, SamplingParams, Sequence, SequenceStatus
from trident.engine.results import CompletionOutput, RequestMetrics, RequestOutput, Snapshot
from trident.engine.runner import LaunchedStep, ModelRunner
from trident.engine.sampler import Sampler
from trident.engine.scheduler import Scheduler
from trident.engine.sizing import (
    check_kv_format,
    cuda_graph_batch_sizes,
    default_batched_tokens,
    gguf_native,
    kv_budget_bytes,
    kv_bytes_per_block,
    kv_format_of,
    num_kv_blocks,
    resolve_dtype,
    resolve_max_model_len,
)
from trident.errors import TridentError
from trident.loader import Checkpoint, load_checkpoint
from trident.models.build import build_model
from trident.moe.registry import resolve_experts_backend
from trident.moe.stats import MoeStats

if TYPE_CHECKING:
    from trident.distributed.group import TensorParallel


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    seqs: list[Sequence]
    delta: dict[int, list[str]]
    """seq_id -> text produced since the request's previous output (joined when the next one is built)."""
    metrics: RequestMetrics | None = None
    """The metrics of the latest output: reused while they stay the same (they seldom change)."""


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
    """A single-model engine. Not thread-safe: one caller steps it.

    With ``parallel`` (tensor parallelism, trident/distributed/), this engine is one rank's: the model is split
    over the group after it is built, the KV cache holds this rank's kv heads, and the runner is a
    TensorParallelRunner. Rank 0's engine is stepped by the caller as usual; the other ranks' runners follow it
    (``runner.follow()``) until rank 0 calls ``runner.stop_followers()``."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None,
                 parallel: TensorParallel | None = None) -> None:
        t0 = time.perf_counter()
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise TridentError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
        self.device = torch.device(config.device)
        config = default_batched_tokens(config, self.device)
        self.config = config
        if config.num_threads is not None or config.device == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        checkpoint = checkpoint or load_checkpoint(config.model or None, gguf_native(config, self.device))
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.attention_backend = resolve_backend_name(config.attention_backend, self.device,
                                                      mla=self.model_config.mla is not None)
        """The attention backend in use (torch or triton), auto resolved."""
        backend = create_backend(self.attention_backend, self.device)
        self.experts_backend = resolve_experts_backend(config.experts_backend, self.device, self.dtype)
        """The experts backend an MoE model runs (torch or triton), auto resolved."""
        self.parallel = parallel
        """This rank's tensor-parallel group, or None (the whole model here)."""
        if parallel is not None and config.sparse_kernel:
            raise TridentError("--sparse-kernel is not supported with --tensor-parallel yet")
        # A model split over ranks is built on the CPU (the checkpoint's tensors, mostly without a copy), one decoder
        # layer at a time split as soon as its weights are set and its slices moved to the device, which never holds
        # the whole model (nor does the host beyond the checkpoint: trident/distributed/shard.py's ModelSharder).
        build_device = self.device if parallel is None else torch.device("cpu")
        sharder = None
        if parallel is not None:
            from trident.distributed.shard import ModelSharder

            sharder = ModelSharder(parallel, self.device)
        self.model = build_model(self.model_config, checkpoint.tensors, dtype=self.dtype, device=build_device,
                                 backend=backend, quantization=checkpoint.quantization,
                                 experts_backend=self.experts_backend,
                                 layer_loaded=sharder.layer_loaded if sharder is not None else None)
        if sharder is not None:
            self.model = sharder.finish(self.model).to(self.device)
        self.sparse_kernels = None
        """What --sparse-kernel converted (trident/quant/sparse24.py), None when it is off."""
        if config.sparse_kernel:
            from trident.compress.sparsity import read_sparsity
            from trident.quant.sparse24 import install_sparse_kernels

            marked = read_sparsity(checkpoint.hf_config)
            self.sparse_kernels = install_sparse_kernels(self.model, marked and marked.pattern, self.device,
                                                         self.dtype)
        self.max_model_len = resolve_max_model_len(self.model_config, config, self.device)
        cache = config.cache
        kv_format = kv_format_of(config, self.dtype)
        check_kv_format(kv_format, self.device)
        if self.device.type == "cuda":  # what building the model freed (copies, conversions) back to the device,
            torch.cuda.empty_cache()    # before the budget reads its free memory
        # A given block count needs no budget: the free-memory check is for sizing from the budget.
        # The cache is sized from the model's own config: with tensor parallelism, this rank's heads (its blocks
        # hold its kv heads), the block count agreed by all ranks (the smallest).
        kv_config = self.model.config
        budget = 0 if cache.num_blocks else kv_budget_bytes(kv_config, config, self.device)
        num_blocks = num_kv_blocks(kv_config, config, self.max_model_len, kv_format, budget)
        if parallel is not None:
            num_blocks = parallel.min_over_ranks(num_blocks)
        self.num_blocks = num_blocks
        self.kv_format = kv_format
        """How the KV cache stores keys and values (config.cache.kv_cache_dtype, auto resolved)."""
        self.kv_block_bytes = kv_bytes_per_block(kv_config, cache.block_size, kv_format)
        """Bytes of one KV block over all layers (with the scales of a quantized cache), on this rank."""
        # MoE models answer for their experts backend too (the torch reference reads expert counts on the host;
        # the triton one is capturable), and 2:4 sparse layers for theirs (a capture probe at installation)
        capturable = (backend.supports_cuda_graphs and getattr(self.model, "supports_cuda_graphs", True)
                      and (self.sparse_kernels is None or self.sparse_kernels.capturable))
        graph_sizes = cuda_graph_batch_sizes(config, self.device, capturable)
        runner_args = dict(backend=backend, num_blocks=num_blocks, block_size=cache.block_size, kv_format=kv_format,
                           device=self.device, sampler=Sampler(seed=config.seed, device=self.device),
                           max_num_seqs=config.scheduler.max_num_seqs, max_model_len=self.max_model_len,
                           cuda_graph_batch_sizes=graph_sizes)
        if parallel is None:
            self.runner = ModelRunner(self.model, cpu_decode=not config.enforce_eager, **runner_args)
        else:
            from trident.distributed.runner import TensorParallelRunner

            self.runner = TensorParallelRunner(self.model, parallel=parallel, **runner_args)
        if self.device.type == "cuda":
            self.runner.warm_up()
        self._moe_load = getattr(self.model, "load_stats", None)
        """The expert load statistics of an MoE model (trident/moe/stats.py), else None."""
        self.reset_moe_stats()  # start-up forwards (warm-up, CUDA-graph capture) are not traffic
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        """Whether steps overlap (the config's choice, auto resolved)."""
        self._in_flight: tuple[StepPlan, LaunchedStep] | None = None
        """The launched step whose tokens are not applied yet (asynchronous scheduling)."""
        self._num_history_seqs = 0
        """Unfinished sequences whose sampling reads their token history: steps are synchronous while any run."""
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else self.model_config.eos_token_ids
        self.eos_token_ids = eos
        self.scheduler = Scheduler(config.scheduler, cache, num_blocks, self.max_model_len, eos)
        self.outputs = OutputProcessor(self.tokenizer) if self.tokenizer else None
        self._requests: dict[str, _Request] = {}
        self._seq_to_request: dict[int, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        if self.device.type == "cpu":
            del checkpoint  # this engine's tensors stay; what loading copied or converted goes back to the system
            release_free_heap()
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
        request = _Request(request_id, text, tuple(prompt_ids), seqs, {})
        if params.needs_penalties:
            self._num_history_seqs += len(seqs)
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
    def step(self, *, only_finished: bool = False) -> list[RequestOutput]:
        """Run one engine step; return the requests that got new tokens (or finished) in it.

        With ``only_finished``, return only the requests that finished in this step, each with its
        final output (``delta_text`` then holds all the text not handed out before). That is all an
        offline caller needs, and it skips building an output for every running request at every
        step. Callers may switch between the two forms from one step to the next.
        """
        if self.async_scheduling and not self._num_history_seqs:
            plan = self.scheduler.schedule()
            launched = self.runner.launch(plan)
            previous, self._in_flight = self._in_flight, (plan, launched)
            if previous is None:
                return []
            return self._apply(*previous, only_finished)
        if self._in_flight is not None:  # apply the step in flight before planning synchronously again
            previous, self._in_flight = self._in_flight, None
            return self._apply(*previous, only_finished)
        plan = self.scheduler.schedule()
        return self._apply(plan, self.runner.launch(plan), only_finished)

    def _apply(self, plan: StepPlan, launched: LaunchedStep, only_finished: bool) -> list[RequestOutput]:
        """Wait for a launched step's tokens, hand them to the scheduler and build the outputs."""
        changed = self.scheduler.update(plan, launched.result())
        seq_to_request = self._seq_to_request
        touched: dict[str, _Request] = {}
        for seq in changed:
            request = seq_to_request[seq.seq_id]
            if self.outputs is not None:
                self._detokenize(seq, request, only_finished)
            if not only_finished or seq.status is _FINISHED:
                touched[request.request_id] = request
        results = []
        for request in touched.values():
            finished = all(s.status is _FINISHED for s in request.seqs)
            if finished or not only_finished:
                results.append(self._output(request, finished))
            if finished:
                self._forget(self._requests.pop(request.request_id))
        return results

    def _detokenize(self, seq: Sequence, request: _Request, only_finished: bool) -> None:
        """Turn the sequence's new token into text (and end it on a stop string).

        Without stop strings and with only finished outputs wanted, nothing is decoded until the
        sequence finishes, and then its text comes from one decode of everything not yet handed out.
        """
        outputs = self.outputs
        assert outputs is not None
        if only_finished and not seq.params.stop:
            if seq.status is _FINISHED:
                request.delta.setdefault(seq.seq_id, []).append(outputs.flush(seq))
            return
        delta = outputs.process(seq)
        if delta.stopped and seq.status is not _FINISHED:
            self.scheduler.finish(seq.seq_id, FinishReason.STOP)
        text = delta.text + (outputs.flush(seq) if seq.status is _FINISHED else "")
        if text:
            request.delta.setdefault(seq.seq_id, []).append(text)

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        """The request as it stands: O(1) per sample, whatever the number of tokens so far."""
        completions = []
        first_token_time = finish_time = None
        num_preemptions = 0
        for seq in request.seqs:
            tokens = seq.token_ids
            reason = seq.finish_reason
            parts = request.delta.pop(seq.seq_id, None)
            completions.append(CompletionOutput(
                index=seq.sample_index,
                text=self.outputs.text(seq.seq_id) if self.outputs is not None else "",
                delta_text="".join(parts) if parts else "",
                token_ids=Snapshot(tokens, seq.num_prompt_tokens, len(tokens)),
                finish_reason=reason.value if reason is not None else None,
                logprobs=Snapshot(seq.logprobs) if seq.params.logprobs is not None else None,
            ))
            t = seq.first_token_time
            if t is not None and (first_token_time is None or t < first_token_time):
                first_token_time = t
            t = seq.finish_time
            if finished and t is not None and (finish_time is None or t > finish_time):
                finish_time = t
            num_preemptions += seq.num_preemptions
        first = request.seqs[0]
        metrics = request.metrics
        if metrics is None or (metrics.first_token_time, metrics.finish_time, metrics.num_preemptions) != (
                first_token_time, finish_time, num_preemptions):
            metrics = request.metrics = RequestMetrics(
                arrival_time=first.arrival_time, first_token_time=first_token_time, finish_time=finish_time,
                num_preemptions=num_preemptions)
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            outputs=tuple(completions), finished=finished, num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
        )

    def _forget(self, request: _Request) -> None:
        if request.seqs[0].params.needs_penalties:
            self._num_history_seqs -= len(request.seqs)
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

    def moe_stats(self, whole: bool = False) -> MoeStats | None:
        """Expert load of an MoE model since start-up or the last :meth:`reset_moe_stats` (per layer token counts,
        imbalance, entropy balance term; trident/moe/stats.py); None for a dense model. Reading waits for the
        device (once) and resets nothing. Under expert parallelism a rank's figures are those of the experts it
        holds, unless ``whole`` (every expert of the model: each rank's router routes every token)."""
        return self._moe_load.snapshot(whole=whole) if self._moe_load is not None else None

    def reset_moe_stats(self) -> None:
        """Zero the expert load statistics (no-op for a dense model)."""
        if self._moe_load is not None:
            self._moe_load.reset()

    def kv_cache_summary(self) -> str:
        """The KV cache in one line (start-up logs): format, blocks, bytes per block and in all."""
        total = self.num_blocks * self.kv_block_bytes
        return (f"KV cache {self.kv_format.name}: {self.num_blocks} blocks of {self.config.cache.block_size} "
                f"tokens, {self.kv_block_bytes / 1024:.1f} KiB per block, {total / 2**20:.1f} MiB")

    def decode_summary(self) -> str:
        """How decode steps run, in a few words (start-up logs)."""
        runner = self.runner
        if self.device.type == "cuda":
            summary = "decode: CUDA graphs" if runner.graphs is not None else "decode: eager"
            from trident.moe.router import Router
            from trident.native import gemv_cuda, moe_gemv_cuda
            from trident.quant.linear import QuantizedLinear

            kinds = {type(module) for module in self.model.modules()}
            # (modules that use the CUDA kernels, their library, what runs with it, what runs without it)
            for module_type, library, native, fallback in (
                    (QuantizedLinear, gemv_cuda, "batch-1 quantized products: CUDA dp4a kernel",
                     "batch-1 quantized products: Triton"),
                    (Router, moe_gemv_cuda, "one-token MoE router and quantized experts: CUDA kernels",
                     "one-token MoE router and experts: Triton")):
                if any(issubclass(kind, module_type) for kind in kinds):
                    why = library.why_unavailable()
                    summary += f", {native}" if why is None else f", {fallback} ({why.splitlines()[0][:80]})"
            from trident.moe.quant import QuantizedFusedExperts

            if any(isinstance(m, QuantizedFusedExperts) and m.bits == 4 for m in self.model.modules()):
                from trident.native import moe_batched_cuda

                why = moe_batched_cuda.why_unavailable()
                summary += (f", int4 experts at 2-{moe_batched_cuda.MAX_TOKENS} tokens: CUDA kernels" if why is None
                            else f", int4 experts: Triton ({why.splitlines()[0][:80]})")
            if self.kv_format.quantized and self.attention_backend == "triton":
                from trident.native import paged_decode_cuda

                why = paged_decode_cuda.why_unavailable()
                summary += (f", {self.kv_format.name} KV decode: CUDA kernel (head dims 64, 128)" if why is None
                            else f", {self.kv_format.name} KV decode: Triton ({why.splitlines()[0][:80]})")
            return summary
        decoder = runner.cpu_decoder
        if decoder is None:
            return "decode: general forward"
        if decoder.native_layers is not None:
            from trident.native import qmatmul

            return f"decode: one C call per layer ({qmatmul.isa()})"
        return "decode: lean torch step"

    @property
    def running_limit(self) -> int:
        """Most sequences the scheduler lets run at once now (``max_num_seqs`` unless lowered)."""
        return self.scheduler.running_limit

    def set_running_limit(self, limit: int) -> int:
        """Admit new sequences only while fewer than ``limit`` run (1..max_num_seqs); the limit set."""
        return self.scheduler.set_running_limit(limit)

    @property
    def admission_floor(self) -> int | None:
        """None: new sequences join in any step; else only in steps that start with at most this many running."""
        return self.scheduler.admission_floor

    def set_admission_floor(self, floor: int | None) -> int | None:
        """Admit new sequences in waves (see Scheduler.admission_floor), or in any step (None); the floor set."""
        return self.scheduler.set_admission_floor(floor)

    def memory_usage(self) -> MemoryUsage:
        """Bytes this engine holds: its weights (each storage counted once: parameters, buffers and the kernel
        layouts quantized layers built from them) and its KV cache."""
        from trident.quant.linear import QuantizedLinear

        derived = [t for m in self.model.modules() if isinstance(m, QuantizedLinear) for t in m.derived_tensors()]
        storages = {}
        for tensor in (*self.model.parameters(), *self.model.buffers(), *derived):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        kv = sum(cache.nbytes for cache in self.runner.kv_caches)
        return MemoryUsage(weights_bytes=sum(storages.values()), kv_cache_bytes=kv)


_FINISHED = SequenceStatus.FINISHED  # a module constant: enum attribute look-ups are slow on Python 3.11
