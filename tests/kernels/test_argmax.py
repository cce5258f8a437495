"""The Triton greedy argmax (trident/kernels/argmax.py) picks what torch.argmax picks: the first index among equal
maxima (ties inside a slice, across slices, at slice edges), the first NaN where a row holds one, 0 for a row of
-inf; vocabularies that slices divide and that they do not (Llama-3's 128,256, Qwen's 151,936, SmolLM2's 49,152,
a few hundred), rows with a stride (the logits of a mixed batch), float32 / bfloat16 / float16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.kernels.argmax import SLICE, argmax, argmax_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [128256, 151936, 49152, 300, SLICE, SLICE + 1])
def test_argmax_matches_torch(kernel_device, vocab: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(vocab)
    rows = 7
    logits = (torch.randn(rows, vocab + 5, generator=g) * 4).to(dtype)[:, 3: 3 + vocab]  # a row stride
    top = logits.max().item() + 1
    logits[1, [vocab - 1, vocab // 3]] = top  # a tie: the lower index wins
    logits[2, [min(SLICE - 1, vocab - 1), min(SLICE, vocab - 1)]] = top  # a tie across a slice edge
    logits[3] = float("-inf")  # a row of -inf: 0
    logits[4, [vocab // 2, vocab - 2]] = float("nan")  # the first NaN wins
    logits[5, vocab - 1] = top  # the last index
    logits = logits.to(kernel_device)
    assert torch.equal(argmax(logits), argmax_reference(logits))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), vocab=st.integers(1, 9000), dtype=st.sampled_from(DTYPES),
       levels=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_argmax_random_ties(kernel_device, rows, vocab, dtype, levels, seed) -> None:
    """Logits drawn from a few levels: many equal maxima everywhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).to(dtype).to(kernel_device)
    assert torch.equal(argmax(logits), argmax_reference(logits))
