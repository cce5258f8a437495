"""Synthetic ShareGPT-like workload for `trident bench serve`: seeded prompt/output lengths, prompts built
from a fixed word list, and Poisson arrival times."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WORDS = (
    "the river city light water stone field house music paper story garden market winter summer morning "
    "evening forest mountain valley island bridge road train window table chair book letter friend family "
    "school teacher doctor farmer artist child people animal bird horse dog cat fish tree flower grass "
    "cloud rain snow wind fire sun moon star sky ocean sea lake hill road door wall floor room kitchen "
    "bread apple milk cheese coffee tea sugar salt market money price work time year day week month hour"
).split()
"""Common English words, each about one token for a byte-pair tokenizer when preceded by a space."""

LENGTH_SIGMA = 0.7
"""Spread (sigma of the underlying normal) of the lognormal lengths: ShareGPT-like, a long right tail."""

MAX_LENGTH_FACTOR = 6
"""Lengths are clipped to at most this many times their mean."""


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the workload, before it is sent."""

    index: int
    prompt: str
    input_len: int
    """Words in the prompt (roughly its token count)."""
    output_len: int
    """max_tokens, honoured exactly because the request sets ignore_eos."""
    arrival_s: float
    """When to send it, in seconds after the bench starts (0 for all under fixed concurrency)."""


def sample_lengths(rng: np.random.Generator, n: int, mean: float, low: int, high: int,
                   sigma: float = LENGTH_SIGMA) -> np.ndarray:
    """``n`` integer lengths from a lognormal whose mean is ``mean``, rounded and clipped to [low, high]."""
    if mean <= 0 or n < 0 or low > high:
        raise ValueError(f"bad length distribution: n={n} mean={mean} low={low} high={high}")
    mu = math.log(mean) - sigma * sigma / 2  # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2) = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), low, high).astype(np.int64)


def length_range(mean: int, minimum: int) -> tuple[int, int]:
    """The clip range of lengths around ``mean``: [max(minimum, mean // 4), MAX_LENGTH_FACTOR * mean]."""
    return max(minimum, mean // 4), max(minimum, MAX_LENGTH_FACTOR * mean)


def build_prompt(rng: np.random.Generator, num_words: int) -> str:
    """A prompt of ``num_words`` random words from WORDS (random, so the prefix cache cannot reuse it)."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words))


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float | None) -> np.ndarray:
    """Send times of ``n`` requests arriving as a Poisson process at ``rate`` per second (the first at 0);
    all zeros when ``rate`` is None (no pacing: fixed concurrency decides when requests go)."""
    if rate is None or math.isinf(rate):
        return np.zeros(n)
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]) if n else gaps


def plan_requests(seed: int, num_prompts: int, input_len_mean: int, output_len_mean: int,
                  request_rate: float | None) -> list[PlannedRequest]:
    """The whole workload, a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(rng, num_prompts, input_len_mean, *length_range(input_len_mean, 1))
    outputs = sample_lengths(rng, num_prompts, output_len_mean, *length_range(output_len_mean, 2))
    arrivals = poisson_arrivals(rng, num_prompts, request_rate)
    return [PlannedRequest(index=i, prompt=build_prompt(rng, int(inputs[i])), input_len=int(inputs[i]),
                           output_len=int(outputs[i]), arrival_s=float(arrivals[i])) for i in range(num_prompts)]
