"""The nano workload is nano-vllm's bench.py, draw for draw: 256 prompts, 133,966 output tokens."""

from __future__ import annotations

import random

import pytest

from trident.bench.workloads import latency_workload, moe64_workload, nano_workload, offline_workload
from trident.errors import TridentError


def _nano_vllm_reference(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024
                         ) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py, as published (module-level random with seed 0); the MoE peer script calls the same
    draws with 64, 512, 256."""
    from random import randint, seed

    seed(0)
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    output_lens = [randint(100, max_output_len) for _ in range(num_seqs)]
    return prompt_token_ids, output_lens


def test_nano_is_nano_vllms_workload() -> None:
    state = random.getstate()
    try:
        prompts, output_lens = _nano_vllm_reference()
    finally:
        random.setstate(state)
    w = nano_workload()
    assert len(w.prompts) == 256 and w.output_tokens == 133_966
    assert [list(p) for p in w.prompts] == prompts and list(w.output_lens) == output_lens
    assert w.summary()["output_tokens"] == 133_966 and w.summary()["prompts"] == 256


def test_moe64_is_the_peer_scripts_draws() -> None:
    state = random.getstate()
    try:
        prompts, output_lens = _nano_vllm_reference(64, 512, 256)
    finally:
        random.setstate(state)
    w = moe64_workload()
    assert [list(p) for p in w.prompts] == prompts and list(w.output_lens) == output_lens
    assert w.name == "moe64" and max(w.prompt_lens) <= 512 and max(w.output_lens) <= 256
    assert w.prompts[:3] != nano_workload(3).prompts  # the ranges change the draws themselves
    with pytest.raises(TridentError, match="64"):
        moe64_workload(num_prompts=65)


def test_nano_is_deterministic_whatever_the_global_random_state() -> None:
    random.seed(12345)
    a = nano_workload()
    random.seed(999)
    assert nano_workload() == a


def test_fewer_nano_prompts_are_the_first_of_the_same_sequence_and_caps_truncate() -> None:
    full = nano_workload()
    few = nano_workload(num_prompts=4)
    assert few.prompts == full.prompts[:4] and few.output_lens == full.output_lens[:4]
    capped = nano_workload(num_prompts=4, max_prompt_len=50, max_output_len=8)
    assert capped.prompts == tuple(p[:50] for p in full.prompts[:4]) and capped.output_lens == (8,) * 4


def test_nano_refuses_a_small_vocabulary_and_too_many_prompts() -> None:
    with pytest.raises(TridentError, match="vocabulary"):
        nano_workload(vocab_size=10_000)
    with pytest.raises(TridentError, match="256"):
        nano_workload(num_prompts=257)


def test_tokenizerless_workloads_are_seeded_token_ids_within_the_vocabulary() -> None:
    lat = latency_workload(None, prompt_len=30, output_len=5, vocab_size=50)
    assert len(lat.prompts[0]) == 30 and lat.output_lens == (5,) and max(lat.prompts[0]) < 50
    assert latency_workload(None, 30, 5, vocab_size=50) == lat
    off = offline_workload(None, num_prompts=3, prompt_len=20, output_len=4, vocab_size=20000)
    assert off.prompt_lens == (20, 20, 20) and len(set(off.prompts)) == 3 and off.output_tokens == 12
