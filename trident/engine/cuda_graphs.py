"""CUDA graphs for decode-only steps: the whole model forward of B one-token sequences, captured once per
batch-size bucket at start-up and replayed with new inputs copied into static buffers.

A decode step launches a few hundred small kernels (per layer: norms, projections, rotary, KV write,
attention, MLP); eagerly, their launch cost dominates a small model's step. Replaying a graph launches
them all at once. A step of B sequences replays the smallest captured bucket >= B: the extra rows are
padding (token 0 at position 0, KV slot -1 so nothing is written, context length 0 so attention reads
nothing), and their outputs are ignored.

The block-table buffer is as wide as the longest sequence the engine allows, so any step fits; each step
copies only the columns its longest sequence uses (the kernels read a row only up to its context length).
Inputs go through pinned host buffers into the static device buffers, asynchronously (two sets of host
buffers used in turn, each reused only once the copies of its previous step are done).

A row's token may also come from the device: where ``token_src[i] >= 0`` the graph reads its token from
``feedback[token_src[i]]`` (the previous step's sampled tokens, still on the device: asynchronous
scheduling), so the host never has to wait for them before launching the step.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from trident.attention.base import AttentionMetadata, DecodeBatch
from trident.progress import progress_bar

ModelForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
"""(input_ids, positions, meta) -> final hidden states [num_tokens, hidden]."""


class DecodeGraphs:
    """Captured decode forwards for ``batch_sizes`` (ascending); see the module docstring."""

    def __init__(self, forward: ModelForward, batch_sizes: Sequence[int], max_blocks_per_seq: int,
                 device: torch.device, feedback: torch.Tensor, show_progress: bool = True) -> None:
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.device = device
        m = self.max_batch
        i64 = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(m, **i64)
        self.positions = torch.zeros(m, **i64)
        self.slots = torch.full((m,), -1, **i64)
        self.context_lens = torch.zeros(m, **i64)
        self.block_tables = torch.zeros((m, max_blocks_per_seq), **i64)
        self.token_indices = torch.arange(m, **i64)
        self.token_src = torch.full((m,), -1, **i64)
        self.feedback = feedback
        """int64 device tensor the rows with ``token_src >= 0`` read their tokens from."""
        pinned = dict(dtype=torch.long, pin_memory=True)
        # ids, positions, slots, context lens, token sources; and block tables: two sets, used in turn
        self._host_rows = [torch.zeros((5, m), **pinned) for _ in range(2)]
        self._host_tables = [torch.zeros((m, max_blocks_per_seq), **pinned) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        """Recorded after the copies out of each set: its next user waits for it (normally long done)."""
        self.replays = 0
        """Steps replayed so far."""
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        self._capture(forward, show_progress)
        self.capture_seconds = time.perf_counter() - t0

    def bucket(self, batch: int) -> int | None:
        """The captured batch size a step of ``batch`` sequences replays, or None if none is large enough."""
        i = bisect.bisect_left(self.batch_sizes, batch)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def _meta(self, batch: int) -> AttentionMetadata:
        """Metadata over the first ``batch`` rows of the static buffers (views, so replays see new values)."""
        context_lens = self.context_lens[:batch]
        decode = DecodeBatch(token_indices=self.token_indices[:batch], block_tables=self.block_tables[:batch],
                             context_lens=context_lens, query_positions=self.positions[:batch],
                             token_indices_are_all=True)
        return AttentionMetadata(slot_mapping=self.slots[:batch], prefills=(), decode=decode, num_tokens=batch)

    @torch.inference_mode()
    def _capture(self, forward: ModelForward, show_progress: bool) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with progress_bar(TextColumn("capturing CUDA graphs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True, disable=not show_progress) as progress:
            task = progress.add_task("capture", total=len(self.batch_sizes))
            for batch in reversed(self.batch_sizes):  # the largest first: the smaller ones reuse its memory
                meta = self._meta(batch)
                ids, positions = self.input_ids[:batch], self.positions[:batch]
                stream.wait_stream(torch.cuda.current_stream(self.device))
                src = self.token_src[:batch]
                with torch.cuda.stream(stream):  # warm-up off the capture: compiles kernels, settles allocations
                    forward(fed_tokens(ids, src, self.feedback), positions, meta)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[batch] = forward(fed_tokens(ids, src, self.feedback), positions, meta)
                self._graphs[batch] = graph
                progress.advance(task)
        torch.cuda.synchronize(self.device)

    def run(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
            tables: Sequence[Sequence[int]], token_src: Sequence[int] | None = None) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step: sequence i feeds ``token_ids[i]`` (or, where
        ``token_src[i] >= 0``, the device's ``feedback[token_src[i]]``) at ``positions[i]`` into KV slot
        ``slots[i]`` and attends its first ``positions[i] + 1`` tokens through ``tables[i]``.
        The result is a view of the graph's output buffer, valid until the next replay."""
        batch = len(token_ids)
        bucket = self.bucket(batch)
        assert bucket is not None, f"no CUDA graph for a batch of {batch}"
        turn = self.replays % 2
        self._copied[turn].synchronize()
        host_rows, host_tables = self._host_rows[turn], self._host_tables[turn]
        rows = host_rows.numpy()
        rows[0, :batch] = token_ids
        rows[1, :batch] = positions
        rows[2, :batch] = slots
        rows[3, :batch] = positions
        rows[3, :batch] += 1
        rows[4, :batch] = -1 if token_src is None else token_src
        rows[:, batch:bucket] = 0
        rows[2, batch:bucket] = -1  # padding rows write nowhere and attend nothing (context length 0)
        rows[4, batch:bucket] = -1
        width = max(len(t) for t in tables)
        tables_np = host_tables.numpy()
        for i, table in enumerate(tables):
            tables_np[i, : len(table)] = table
        n = bucket
        self.input_ids[:n].copy_(host_rows[0, :n], non_blocking=True)
        self.positions[:n].copy_(host_rows[1, :n], non_blocking=True)
        self.slots[:n].copy_(host_rows[2, :n], non_blocking=True)
        self.context_lens[:n].copy_(host_rows[3, :n], non_blocking=True)
        self.token_src[:n].copy_(host_rows[4, :n], non_blocking=True)
        self.block_tables[:batch, :width].copy_(host_tables[:batch, :width], non_blocking=True)
        self._copied[turn].record(torch.cuda.current_stream(self.device))
        self._graphs[bucket].replay()
        self.replays += 1
        return self._outputs[bucket][:batch]

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay the graph of ``bucket`` on whatever the static buffers hold (timing the GPU part of a step);
        returns its output buffer."""
        self._graphs[bucket].replay()
        return self._outputs[bucket]


def max_blocks_per_seq(max_model_len: int, block_size: int) -> int:
    return -(-max_model_len // block_size)


def fed_tokens(token_ids: torch.Tensor, token_src: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """``token_ids`` with each entry whose ``token_src`` is >= 0 replaced by ``feedback[token_src]``: tokens
    sampled by the previous step, fed without a round trip through the host."""
    return torch.where(token_src >= 0, feedback[token_src.clamp(min=0)], token_ids)
