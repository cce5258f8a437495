"""The model runner: turns a StepPlan into flat tensors, runs the model over the paged KV cache and
samples, all queued on the device without waiting for it (:meth:`ModelRunner.launch`); the sampled tokens
reach the host when :meth:`LaunchedStep.result` asks. Owns the KV cache tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trident.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    DecodeBatch,
    LayerKVCache,
    PrefillBatch,
    PrefillSeq,
)
from trident.engine.cpu_decode import MAX_ROWS as CPU_DECODE_MAX_ROWS
from trident.engine.cpu_decode import CpuDecoder, unsupported_reason
from trident.engine.cuda_graphs import DecodeGraphs, fed_tokens, max_blocks_per_seq
from trident.engine.plan import PENDING_TOKEN, ScheduledChunk, StepPlan, StepResult
from trident.engine.request import SamplingParams
from trident.engine.sampler import DeviceSamples, Sampler
from trident.engine.transfer import to_device
from trident.errors import TridentError
from trident.quant.kv import SCALE_DTYPE, KVCacheFormat

MAX_WARM_ROWS = 16
"""Row counts of the logits the start-up warm-up runs (each of 1 to this)."""


@dataclass
class LaunchedStep:
    """A step queued on the device. :meth:`result` waits for its sampled tokens (only those: the host may plan
    and launch the next step before calling it)."""

    sample_chunks: tuple[ScheduledChunk, ...] | list[ScheduledChunk]
    samples: DeviceSamples | None
    sampler: Sampler

    def result(self) -> StepResult:
        if self.samples is None:
            return StepResult(sampled={})
        tokens = self.sampler.resolve(self.samples, self.sample_chunks)
        return StepResult(sampled={c.seq_id: t for c, t in zip(self.sample_chunks, tokens)})


class ModelRunner:
    """Runs one engine step on ``model`` (built, weights loaded, on ``device`` in ``dtype``).

    Chunks may carry PENDING_TOKEN: their token is the one the previous launched step sampled for the same
    sequence, read on the device (:func:`fed_tokens`). At most one step is in flight: launch step k+1 only
    after step k's launch, and wait for step k's result before launching step k+2.
    """

    def __init__(self, model: torch.nn.Module, *, backend: AttentionBackend, num_blocks: int, block_size: int,
                 kv_format: KVCacheFormat, device: torch.device, sampler: Sampler, max_num_seqs: int,
                 max_model_len: int | None = None, cuda_graph_batch_sizes: tuple[int, ...] = (),
                 cpu_decode: bool = False) -> None:
        config = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.wants_prefill_batch = backend.wants_prefill_batch
        spec = config.kv_cache_spec
        self.kv_cache_spec = spec
        """What each layer caches per token (keys and values, or one latent), as the model's config declares it."""
        shape = backend.cache_shape(num_blocks, block_size, spec.num_kv_heads, spec.key_dim)
        self.kv_format = kv_format
        self.kv_caches = [_layer_cache(shape, kv_format, device, spec.has_value) for _ in range(config.num_layers)]
        self._feedback = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        """The previous step's sampled tokens, where the chunks of this step read their pending tokens."""
        self._last_sampled: tuple[tuple[ScheduledChunk, ...] | list[ScheduledChunk], torch.Tensor] | None = None
        """The sampling chunks of the last launched step and its device tokens (one per chunk)."""
        self.graphs: DecodeGraphs | None = None
        """Captured decode steps (CUDA with a capturable backend, unless enforce_eager), else None."""
        if cuda_graph_batch_sizes:
            assert max_model_len is not None
            self.graphs = DecodeGraphs(lambda ids, pos, meta: self.model(ids, pos, self.kv_caches, meta),
                                       cuda_graph_batch_sizes, max_blocks_per_seq(max_model_len, block_size), device,
                                       self._feedback)
        self.cpu_decoder: CpuDecoder | None = None
        """Runs small decode-only steps on the CPU (cpu_decode and a model it supports), else None."""
        if cpu_decode and unsupported_reason(model, backend, self.kv_caches, device) is None:
            self.cpu_decoder = CpuDecoder(model, self.kv_caches, block_size)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run one mixed step (a prompt chunk crossing a block boundary beside a decode) on scratch blocks, so
        that the eager paths' one-time work (Triton compilation, allocator growth) happens at start-up rather
        than in the first requests; then zero the cache again. Needs three blocks; does nothing with fewer."""
        if self.kv_caches[0].key.numel() < 3 * self.block_size * self.kv_cache_spec.num_kv_heads:
            return
        bs = self.block_size
        greedy = SamplingParams(temperature=0.0)
        prompt = ScheduledChunk(-1, (0,) * (bs + 1), 0, (0, 1), True, greedy)
        decode = ScheduledChunk(-2, (0,), 1, (2,), True, greedy)
        self.execute(StepPlan(chunks=(prompt, decode)))
        # The logits of every small row count (decode batches below the graph buckets' padding and prefill
        # steps sample few rows; kernels may compile per row-count bucket, outside the captured graphs).
        dtype = next(self.model.parameters()).dtype
        hidden = torch.zeros((MAX_WARM_ROWS, self.model.config.hidden_size), dtype=dtype, device=self.device)
        for rows in range(1, MAX_WARM_ROWS + 1):
            self.model.compute_logits(hidden[:rows]).argmax(dim=-1)
        self._last_sampled = None
        for cache in self.kv_caches:
            cache.zero_()

    def execute(self, plan: StepPlan) -> StepResult:
        """Run a step and wait for its result."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue a step on the device (model, logits, sampling, the copy of the tokens to the host) without
        waiting for it."""
        if plan.is_empty:
            self._last_sampled = None
            return LaunchedStep((), None, self.sampler)
        plan = plan.longest_decodes_first()
        graphs = self.graphs
        if graphs is not None and graphs.bucket(len(plan.chunks)) is not None and \
                all(c.num_tokens == 1 and c.sample for c in plan.chunks):
            hidden, sample_chunks = self._forward_graph(plan, graphs), plan.chunks
        elif self.cpu_decoder is not None and len(plan.chunks) <= CPU_DECODE_MAX_ROWS and \
                all(c.num_tokens == 1 and c.sample for c in plan.chunks):
            hidden, sample_chunks = self._forward_cpu_decode(plan, self.cpu_decoder), plan.chunks
        else:
            input_ids, positions, meta, logits_indices, sample_chunks = self.prepare(plan)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            if sample_chunks:
                hidden = hidden[logits_indices]
        if not sample_chunks:
            self._last_sampled = None
            return LaunchedStep((), None, self.sampler)
        samples = self.sampler.sample(self.model.compute_logits(hidden), sample_chunks)
        self._last_sampled = (sample_chunks, samples.token_ids)
        return LaunchedStep(sample_chunks, samples, self.sampler)

    def _token_sources(self, chunks) -> list[int] | None:
        """Per chunk, the row of the previous step's samples its pending token comes from (-1 for a chunk
        whose tokens are known); None when no chunk waits for one. Fills the feedback buffer when needed."""
        if not any(c.token_ids[0] == PENDING_TOKEN for c in chunks):
            return None
        assert self._last_sampled is not None, "a pending token, but the previous step sampled nothing"
        previous, tokens = self._last_sampled
        rows = {c.seq_id: i for i, c in enumerate(previous)}
        self._feedback[: len(previous)].copy_(tokens)
        return [rows[c.seq_id] if c.token_ids[0] == PENDING_TOKEN else -1 for c in chunks]

    def _forward_graph(self, plan: StepPlan, graphs: DecodeGraphs) -> torch.Tensor:
        """Final hidden states of a decode-only step replayed from a CUDA graph (every chunk is one token and
        samples)."""
        bs = self.block_size
        chunks = plan.chunks
        positions = [c.start_pos for c in chunks]
        tables = [c.block_table for c in chunks]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        return graphs.run([c.token_ids[-1] for c in chunks], positions, slots, tables, self._token_sources(chunks))

    def _forward_cpu_decode(self, plan: StepPlan, decoder: CpuDecoder) -> torch.Tensor:
        """Final hidden states of a small decode-only step on the CPU (every chunk is one token and samples)."""
        chunks = plan.chunks
        ids = to_device([c.token_ids[0] for c in chunks], torch.long, self.device)
        sources = self._token_sources(chunks)
        if sources is not None:
            ids = fed_tokens(ids, to_device(sources, torch.long, self.device), self._feedback)
        return decoder.forward(ids, [c.start_pos for c in chunks], [c.block_table for c in chunks])

    def prepare(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor,
                                               list[ScheduledChunk]]:
        bs = self.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSeq] = []
        prefill_tables: list[tuple[int, ...]] = []
        decode_indices: list[int] = []
        decode_tables: list[tuple[int, ...]] = []
        decode_lens: list[int] = []
        logits_indices: list[int] = []
        sample_chunks: list[ScheduledChunk] = []
        chunk_starts: list[int] = []
        for chunk in plan.chunks:
            start = len(input_ids)
            chunk_starts.append(start)
            n = chunk.num_tokens
            input_ids.extend(chunk.token_ids)
            chunk_positions = range(chunk.start_pos, chunk.start_pos + n)
            positions.extend(chunk_positions)
            table = chunk.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in chunk_positions)
            context_len = chunk.start_pos + n
            if n == 1:
                decode_indices.append(start)
                decode_tables.append(table)
                decode_lens.append(context_len)
            else:
                prefill_tables.append(table[: -(-context_len // bs)])
                prefills.append(PrefillSeq(
                    token_start=start, num_query_tokens=n, context_len=context_len,
                    block_table=to_device(prefill_tables[-1], torch.long, dev),
                    query_positions=torch.arange(chunk.start_pos, context_len, device=dev),
                ))
            if chunk.sample:
                logits_indices.append(start + n - 1)
                sample_chunks.append(chunk)
        decode = None
        if decode_indices:
            width = max(len(t) for t in decode_tables)
            padded = [list(t) + [0] * (width - len(t)) for t in decode_tables]
            context_lens = to_device(decode_lens, torch.long, dev)
            decode = DecodeBatch(
                token_indices=to_device(decode_indices, torch.long, dev),
                block_tables=to_device(padded, torch.long, dev),
                context_lens=context_lens,
                query_positions=context_lens - 1,
                token_indices_are_all=not prefills,
            )
        prefill_batch = None
        if prefills and self.wants_prefill_batch:
            prefill_batch = self._prefill_batch(prefills, prefill_tables)
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, dev),
            prefills=tuple(prefills), decode=decode, num_tokens=len(input_ids), prefill_batch=prefill_batch,
        )
        ids = to_device(input_ids, torch.long, dev)
        sources = self._token_sources(plan.chunks)
        if sources is not None:  # pending tokens are one-token chunks: one row each in the flat batch
            flat = [-1] * len(input_ids)
            for chunk_start, src in zip(chunk_starts, sources):
                flat[chunk_start] = src
            ids = fed_tokens(ids, to_device(flat, torch.long, dev), self._feedback)
        return (ids,
                to_device(positions, torch.long, dev),
                meta,
                to_device(logits_indices, torch.long, dev),
                sample_chunks)

    def _prefill_batch(self, prefills: list[PrefillSeq], tables: list[tuple[int, ...]]) -> PrefillBatch:
        """The prefill chunks as flat int32 tensors, sent to the device in one copy. Each part starts on a
        16-byte boundary: Triton specialises a kernel on whether each pointer is 16-byte aligned, so parts at
        offsets that depend on the chunk count would compile new variants in the middle of serving."""
        n, width = len(prefills), max(len(t) for t in tables)
        part = -(-n // 4) * 4  # int32s per part, a multiple of 4 (16 bytes)
        pad = [0] * (part - n)
        flat = [p.token_start for p in prefills] + pad + [p.num_query_tokens for p in prefills] + pad
        flat += [p.context_len for p in prefills] + pad
        for table in tables:
            flat.extend(table)
            flat.extend([0] * (width - len(table)))
        packed = to_device(flat, torch.int32, self.device)
        return PrefillBatch(query_starts=packed[:n], query_lens=packed[part: part + n],
                            context_lens=packed[2 * part: 2 * part + n],
                            block_tables=packed[3 * part:].view(n, width),
                            max_query_len=max(p.num_query_tokens for p in prefills))


def _layer_cache(shape: tuple[int, ...], kv_format: KVCacheFormat, device: torch.device,
                 has_value: bool = True) -> LayerKVCache:
    """One layer's cache, zeroed (not empty: padded decode rows read other blocks, and 0 * NaN garbage would
    poison them); a quantized one with its scales, shaped like the codes without the head_dim axis. Without
    ``has_value``, the latent cache of multi-head latent attention: one tensor, never quantized."""
    if not has_value:
        if kv_format.quantized:
            raise TridentError(f"a --kv-cache-dtype {kv_format.name} cache is not supported for multi-head latent "
                               "attention (DeepSeek) yet; use --kv-cache-dtype auto")
        return LayerKVCache(_zeros(shape, kv_format.dtype, device), None)
    codes = (_zeros(shape, kv_format.dtype, device), _zeros(shape, kv_format.dtype, device))
    if not kv_format.quantized:
        return LayerKVCache(*codes)
    return LayerKVCache(*codes, key_scale=_zeros(shape[:-1], SCALE_DTYPE, device),
                        value_scale=_zeros(shape[:-1], SCALE_DTYPE, device))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU the memory comes from calloc through numpy, so the operating system
    hands out zero pages as they are first touched: a large cache costs nothing until it is used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
