"""The model runner: turns a StepPlan into flat tensors, runs the model over the paged KV cache and
samples. Owns the KV cache tensors."""

from __future__ import annotations

import numpy as np
import torch

from trident.attention.base import AttentionBackend, AttentionMetadata, DecodeBatch, PrefillBatch, PrefillSeq
from trident.engine.cuda_graphs import DecodeGraphs, max_blocks_per_seq
from trident.engine.plan import ScheduledChunk, StepPlan, StepResult
from trident.engine.sampler import Sampler


class ModelRunner:
    """Runs one engine step on ``model`` (built, weights loaded, on ``device`` in ``dtype``)."""

    def __init__(self, model: torch.nn.Module, *, backend: AttentionBackend, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, sampler: Sampler, max_model_len: int | None = None,
                 cuda_graph_batch_sizes: tuple[int, ...] = ()) -> None:
        config = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.wants_prefill_batch = backend.wants_prefill_batch
        shape = backend.cache_shape(num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Zeroed (not empty): padded decode rows read other blocks, and 0 * NaN garbage would poison them.
        self.kv_caches = [(_zeros(shape, kv_dtype, device), _zeros(shape, kv_dtype, device))
                          for _ in range(config.num_layers)]
        self.graphs: DecodeGraphs | None = None
        """Captured decode steps (CUDA with a capturable backend, unless enforce_eager), else None."""
        if cuda_graph_batch_sizes:
            assert max_model_len is not None
            self.graphs = DecodeGraphs(lambda ids, pos, meta: self.model(ids, pos, self.kv_caches, meta),
                                       cuda_graph_batch_sizes, max_blocks_per_seq(max_model_len, block_size), device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        if plan.is_empty:
            return StepResult(sampled={})
        graphs = self.graphs
        if graphs is not None and graphs.bucket(len(plan.chunks)) is not None and \
                all(c.num_tokens == 1 and c.sample for c in plan.chunks):
            return self._execute_graph(plan, graphs)
        input_ids, positions, meta, logits_indices, sample_chunks = self.prepare(plan)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sample_chunks:
            return StepResult(sampled={})
        logits = self.model.compute_logits(hidden[logits_indices])
        tokens = self.sampler(logits, sample_chunks)
        return StepResult(sampled={c.seq_id: t for c, t in zip(sample_chunks, tokens)})

    def _execute_graph(self, plan: StepPlan, graphs: DecodeGraphs) -> StepResult:
        """A decode-only step replayed from a CUDA graph (every chunk is one token and samples)."""
        bs = self.block_size
        chunks = plan.chunks
        positions = [c.start_pos for c in chunks]
        tables = [c.block_table for c in chunks]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        hidden = graphs.run([c.token_ids[-1] for c in chunks], positions, slots, tables)
        tokens = self.sampler(self.model.compute_logits(hidden), chunks)
        return StepResult(sampled={c.seq_id: t for c, t in zip(chunks, tokens)})

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
        for chunk in plan.chunks:
            start = len(input_ids)
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
                    block_table=torch.tensor(prefill_tables[-1], dtype=torch.long, device=dev),
                    query_positions=torch.arange(chunk.start_pos, context_len, device=dev),
                ))
            if chunk.sample:
                logits_indices.append(start + n - 1)
                sample_chunks.append(chunk)
        decode = None
        if decode_indices:
            width = max(len(t) for t in decode_tables)
            padded = [list(t) + [0] * (width - len(t)) for t in decode_tables]
            context_lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            decode = DecodeBatch(
                token_indices=torch.tensor(decode_indices, dtype=torch.long, device=dev),
                block_tables=torch.tensor(padded, dtype=torch.long, device=dev),
                context_lens=context_lens,
                query_positions=context_lens - 1,
                token_indices_are_all=not prefills,
            )
        prefill_batch = None
        if prefills and self.wants_prefill_batch:
            prefill_batch = self._prefill_batch(prefills, prefill_tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=tuple(prefills), decode=decode, num_tokens=len(input_ids), prefill_batch=prefill_batch,
        )
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev),
                meta,
                torch.tensor(logits_indices, dtype=torch.long, device=dev),
                sample_chunks)

    def _prefill_batch(self, prefills: list[PrefillSeq], tables: list[tuple[int, ...]]) -> PrefillBatch:
        """The prefill chunks as flat int32 tensors, sent to the device in one copy."""
        n, width = len(prefills), max(len(t) for t in tables)
        flat = [p.token_start for p in prefills] + [p.num_query_tokens for p in prefills]
        flat += [p.context_len for p in prefills]
        for table in tables:
            flat.extend(table)
            flat.extend([0] * (width - len(table)))
        packed = torch.tensor(flat, dtype=torch.int32, device=self.device)
        return PrefillBatch(query_starts=packed[:n], query_lens=packed[n: 2 * n], context_lens=packed[2 * n: 3 * n],
                            block_tables=packed[3 * n:].view(n, width),
                            max_query_len=max(p.num_query_tokens for p in prefills))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU the memory comes from calloc through numpy, so the operating system
    hands out zero pages as they are first touched: a large cache costs nothing until it is used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
