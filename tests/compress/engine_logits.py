"""Logits of every position of one prompt through trident's paged engine (one prefill chunk, no sampling), for
the compression tests that compare a written folder against transformers on it."""

from __future__ import annotations

from pathlib import Path

import torch


def load_engine(path: Path | str, dtype: str = "float32", **options):
    """An engine over the folder, with a small KV cache and no prefix cache (``options``: more EngineConfig
    keywords, e.g. sparse_kernel=True)."""
    from trident import LLM

    return LLM(str(path), dtype=dtype, num_blocks=32, enable_prefix_caching=False, **options).engine


def prefill_logits(engine, tokens: list[int]) -> torch.Tensor:
    """logits [len(tokens), vocab] of the prompt ``tokens`` prefilled as one chunk into blocks 0, 1, ..."""
    from trident.engine.plan import ScheduledChunk, StepPlan
    from trident.engine.request import SamplingParams

    bs = engine.config.cache.block_size
    chunk = ScheduledChunk(seq_id=0, token_ids=tuple(tokens), start_pos=0,
                           block_table=tuple(range(-(-len(tokens) // bs))), sample=True,
                           params=SamplingParams(temperature=0.0))
    ids, positions, meta, _, _ = engine.runner.prepare(StepPlan(chunks=(chunk,)))
    with torch.inference_mode():
        return engine.model.compute_logits(engine.model(ids, positions, engine.runner.kv_caches, meta))
