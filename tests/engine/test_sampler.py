"""Sampler against an independent float64 reference written with plain Python loops.

Frequency checks draw N = 20,000 samples. For a token of reference probability p the count is
Binomial(N, p), so each empirical frequency must lie within 5 standard deviations
(5 * sqrt(p (1 - p) / N), two-sided tail ~6e-7 per token) plus 2/N for float32 rounding of the
probabilities; on top of that a chi-square statistic over the bins with an expected count >= 5 must
stay below its 1 - 1e-4 quantile (Wilson-Hilferty approximation). Tokens the reference removes must
never be drawn. Every random source is seeded, so the tests are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trident.engine.plan import ScheduledChunk
from trident.engine.request import SampledToken, SamplingParams
from trident.engine.sampler import Sampler, apply_penalties, row_seed

N_DRAWS = 20_000
HYPO = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Reference (float64, loops, no torch)


def ref_penalized(logits, params: SamplingParams, prompt=(), output=()) -> list[float]:
    x = [float(v) for v in logits]
    seen = set(prompt) | set(output)
    for t in seen:
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= params.frequency_penalty * count + params.presence_penalty
    return x


def ref_log_softmax(x: list[float]) -> list[float]:
    m = max(x)
    log_z = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - log_z for v in x]


def ref_distribution(logits, params: SamplingParams, prompt=(), output=(), margin=1e-4):
    """(probabilities, ambiguous): ambiguous when a top-p / min-p cut is within `margin` of a boundary."""
    x = ref_penalized(logits, params, prompt, output)
    vocab = len(x)
    if params.temperature == 0:
        best = max(range(vocab), key=lambda i: (x[i], -i))
        return [1.0 if i == best else 0.0 for i in range(vocab)], False
    x = [v / params.temperature for v in x]
    order = sorted(range(vocab), key=lambda i: (-x[i], i))
    keep = order[: params.top_k] if 0 < params.top_k < vocab else order

    def normalized(ids):
        m = max(x[i] for i in ids)
        w = {i: math.exp(x[i] - m) for i in ids}
        z = sum(w.values())
        return {i: v / z for i, v in w.items()}

    p = normalized(keep)
    ambiguous = False
    if params.top_p < 1:
        mass, nucleus = 0.0, []
        for i in keep:
            if abs(mass - params.top_p) < margin:
                ambiguous = True
            if mass >= params.top_p:
                break
            nucleus.append(i)
            mass += p[i]
        keep = nucleus
        p = normalized(keep)
    if params.min_p > 0:
        threshold = params.min_p * max(p.values())
        if any(abs(v - threshold) < margin * threshold for v in p.values()):
            ambiguous = True
        keep = [i for i in keep if p[i] >= threshold]
        p = normalized(keep)
    return [p.get(i, 0.0) for i in range(vocab)], ambiguous


# ---------------------------------------------------------------------------------------------
# Helpers


def make_chunk(params: SamplingParams, *, seq_id=0, sample_index=0, num_output_tokens=0,
               prompt=(), output=()) -> ScheduledChunk:
    return ScheduledChunk(seq_id=seq_id, token_ids=(0,), start_pos=0, block_table=(), sample=True,
                          params=params, sample_index=sample_index, num_output_tokens=num_output_tokens,
                          prompt_token_ids=tuple(prompt), output_token_ids=tuple(output))


def check_frequencies(tokens: list[int], expected: list[float]) -> None:
    n = len(tokens)
    counts = Counter(tokens)
    for t in counts:
        assert expected[t] > 0, f"token {t} was removed by the reference but drawn {counts[t]} times"
    for t, p in enumerate(expected):
        bound = 5 * math.sqrt(p * (1 - p) / n) + 2 / n
        assert abs(counts.get(t, 0) / n - p) <= bound, (t, counts.get(t, 0) / n, p)
    big = [t for t, p in enumerate(expected) if p * n >= 5]
    observed = [counts.get(t, 0) for t in big] + [n - sum(counts.get(t, 0) for t in big)]
    wanted = [expected[t] * n for t in big] + [n - sum(expected[t] * n for t in big)]
    bins = [(o, e) for o, e in zip(observed, wanted, strict=True) if e >= 5]
    df = len(bins) - 1
    if df >= 1:
        chi2 = sum((o - e) ** 2 / e for o, e in bins)
        z = 3.719  # standard normal 1 - 1e-4 quantile
        limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
        assert chi2 <= limit, (chi2, limit, df)


def random_logits(vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


random_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_k=st.integers(0, 12),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.2]),
    min_p=st.sampled_from([0.0, 0.05, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    frequency_penalty=st.sampled_from([0.0, 0.5, -0.4]),
    presence_penalty=st.sampled_from([0.0, 1.0, -0.7]),
    seed=st.one_of(st.none(), st.integers(0, 2**40)),
    logprobs=st.one_of(st.none(), st.integers(0, 5)),
)


# ---------------------------------------------------------------------------------------------
# Greedy


def test_fast_greedy_path_is_argmax():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    chunks = [make_chunk(SamplingParams(temperature=0.0), seq_id=i) for i in range(7)]
    out = Sampler()(logits, chunks)
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()
    assert all(s.logprob is None and s.top_logprobs == () for s in out)


def test_greedy_rows_share_one_token_object_per_id_and_a_single_other_row_is_noticed():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    logits[3] = logits[0]
    plain, other = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=1)
    sampler = Sampler()
    out = sampler(logits, [make_chunk(plain, seq_id=i) for i in range(6)])
    assert out[0] is out[3] and out[0] == SampledToken(int(logits[0].argmax()))
    again = sampler(logits, [make_chunk(plain, seq_id=i) for i in range(6)])
    assert all(a is b for a, b in zip(out, again))
    # one row with logprobs among plain ones (as separate params objects) leaves the all-greedy path
    mixed = sampler(logits, [make_chunk(SamplingParams(temperature=0.0) if i != 4 else other, seq_id=i)
                             for i in range(6)])
    assert [t.token_id for t in mixed] == logits.argmax(-1).tolist()
    assert mixed[4].logprob is not None and len(mixed[4].top_logprobs) == 1
    assert all(t.logprob is None for i, t in enumerate(mixed) if i != 4)


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    plain = SamplingParams(temperature=0.0)
    with_logprobs = SamplingParams(temperature=0.0, logprobs=2)
    for params in (plain, with_logprobs):
        out = Sampler()(logits, [make_chunk(params), make_chunk(params)])
        assert [s.token_id for s in out] == [1, 0]


def test_empty_batch_and_shape_mismatch():
    assert Sampler()(torch.zeros(0, 10), []) == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [make_chunk(SamplingParams())])


def test_input_logits_not_modified():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.7, min_p=0.1, repetition_penalty=1.5,
                            frequency_penalty=0.5, presence_penalty=0.5, logprobs=3)
    Sampler()(logits, [make_chunk(params, prompt=[1, 2], output=[3, 3, 4]) for _ in range(3)])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# Penalties and logprobs


@HYPO
@given(vocab=st.integers(2, 40), seed=st.integers(0, 10_000),
       repetition=st.floats(0.25, 4.0), frequency=st.floats(-2, 2), presence=st.floats(-2, 2),
       data=st.data())
def test_penalties_match_reference(vocab, seed, repetition, frequency, presence, data):
    params = SamplingParams(temperature=0.0, repetition_penalty=repetition,
                            frequency_penalty=frequency, presence_penalty=presence)
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=12))
    output = data.draw(st.lists(st.integers(0, vocab - 1), max_size=12))
    logits = random_logits(vocab, seed, scale=3.0)
    neutral = make_chunk(SamplingParams(temperature=0.0, logprobs=1), output=[0])
    chunks = [neutral, make_chunk(params, prompt=prompt, output=output)]
    batch = torch.stack([logits, logits])
    got = apply_penalties(batch, chunks)
    want = ref_penalized(logits.tolist(), params, prompt, output)
    np.testing.assert_allclose(got[1].double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], batch[0])  # the row without penalties is untouched
    # greedy with penalties picks the reference argmax (skip float32 near-ties)
    ranked = sorted(want, reverse=True)
    assume(vocab == 1 or ranked[0] - ranked[1] > 1e-5)
    token = Sampler()(batch, chunks)[1].token_id
    assert token == max(range(vocab), key=lambda i: (want[i], -i))


@HYPO
@given(vocab=st.integers(2, 20), seed=st.integers(0, 10_000), params=random_params, data=st.data())
def test_logprobs_are_penalized_log_softmax(vocab, seed, params, data):
    params = dataclasses.replace(params, logprobs=data.draw(st.integers(0, 20)))
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    output = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    logits = random_logits(vocab, seed, scale=4.0)
    (out,) = Sampler(seed=seed)(logits[None], [make_chunk(params, prompt=prompt, output=output)])
    want = ref_log_softmax(ref_penalized(logits.tolist(), params, prompt, output))
    assert out.logprob == pytest.approx(want[out.token_id], abs=1e-5)
    k = min(params.logprobs, vocab)
    assert len(out.top_logprobs) == k
    values = [v for _, v in out.top_logprobs]
    assert values == sorted(values, reverse=True)
    for token_id, value in out.top_logprobs:
        assert value == pytest.approx(want[token_id], abs=1e-5)
    if k:  # the reported set is the k most likely (up to float32 near-ties at the cut)
        cut = values[-1]
        left_out = [want[t] for t in range(vocab) if t not in dict(out.top_logprobs)]
        assert all(v <= cut + 1e-5 for v in left_out)


def test_full_logprobs_with_penalties_and_truncation():
    vocab = 16
    logits = random_logits(vocab, 3)
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.7,
                            frequency_penalty=0.3, presence_penalty=0.2, logprobs=16, seed=5)
    prompt, output = [0, 1, 2, 2], [5, 5, 5, 7]
    (out,) = Sampler()(logits[None], [make_chunk(params, prompt=prompt, output=output)])
    want = ref_log_softmax(ref_penalized(logits.tolist(), params, prompt, output))
    assert [t for t, _ in out.top_logprobs] == sorted(range(vocab), key=lambda i: -want[i])
    np.testing.assert_allclose([v for _, v in out.top_logprobs], sorted(want, reverse=True), atol=1e-5)


def test_logprobs_zero_gives_only_the_token():
    logits = random_logits(10, 4)
    (out,) = Sampler()(logits[None], [make_chunk(SamplingParams(temperature=1.0, logprobs=0))])
    assert out.top_logprobs == ()
    assert out.logprob == pytest.approx(ref_log_softmax(logits.tolist())[out.token_id], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Distributions


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int = N_DRAWS, prompt=(), output=(),
                seed: int = 0) -> list[int]:
    chunks = [make_chunk(params, seq_id=i, prompt=prompt, output=output) for i in range(n)]
    return [s.token_id for s in Sampler(seed=seed)(logits.expand(n, -1), chunks)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.integers(2, 48), seed=st.integers(0, 10_000), params=random_params, data=st.data())
def test_frequencies_match_reference(vocab, seed, params, data):
    params = dataclasses.replace(params, seed=None)
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    output = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    logits = random_logits(vocab, seed)
    expected, ambiguous = ref_distribution(logits.tolist(), params, prompt, output)
    assume(not ambiguous)
    check_frequencies(sample_many(logits, params, prompt=prompt, output=output, seed=seed), expected)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=1),
])
def test_masked_tokens_never_sampled_and_frequencies(params):
    logits = random_logits(64, 11)
    expected, ambiguous = ref_distribution(logits.tolist(), params)
    assert not ambiguous
    tokens = sample_many(logits, params)
    assert all(expected[t] > 0 for t in set(tokens))
    check_frequencies(tokens, expected)


def test_seeded_rows_follow_the_distribution():
    """Seeded draws (a fresh generator per draw) are unbiased too: vary num_output_tokens."""
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=1234)
    logits = random_logits(40, 21)
    chunks = [make_chunk(params, seq_id=i, num_output_tokens=i) for i in range(N_DRAWS)]
    tokens = [s.token_id for s in Sampler()(logits.expand(N_DRAWS, -1), chunks)]
    expected, ambiguous = ref_distribution(logits.tolist(), params)
    assert not ambiguous
    check_frequencies(tokens, expected)


def test_mixed_batch_rows_follow_their_own_params():
    """Greedy, filtered and plain rows interleaved in one batch each get their own distribution."""
    logits = random_logits(30, 8)
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=4),
             SamplingParams(temperature=1.0, min_p=0.2, logprobs=2)]
    n = 3 * 8000
    chunks = [make_chunk(kinds[i % 3], seq_id=i) for i in range(n)]
    out = Sampler(seed=3)(logits.expand(n, -1), chunks)
    for k, params in enumerate(kinds):
        tokens = [out[i].token_id for i in range(k, n, 3)]
        expected, _ = ref_distribution(logits.tolist(), params)
        check_frequencies(tokens, expected)


# ---------------------------------------------------------------------------------------------
# Seeds


@HYPO
@given(vocab=st.integers(2, 300), seed=st.integers(-(2**40), 2**62), sample_index=st.integers(0, 7),
       num_output_tokens=st.integers(0, 1000), position=st.integers(0, 7), others=st.lists(
           random_params, min_size=7, max_size=7), batch_seed=st.integers(0, 1000))
def test_seed_reproducible_regardless_of_batch(vocab, seed, sample_index, num_output_tokens, position,
                                               others, batch_seed):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed, logprobs=2)
    row = random_logits(vocab, batch_seed)
    target = make_chunk(params, sample_index=sample_index, num_output_tokens=num_output_tokens,
                        output=[0, 1])
    alone = Sampler(seed=1)(row[None], [target])[0]

    g = torch.Generator().manual_seed(batch_seed + 1)
    batch = torch.randn(8, vocab, generator=g) * 3
    batch[position] = row
    chunks = [make_chunk(p, seq_id=i + 1, num_output_tokens=i, output=[i % vocab])
              for i, p in enumerate(others)]
    chunks.insert(position, target)
    in_batch = Sampler(seed=99)(batch, chunks)[position]
    assert in_batch == alone


def test_seeded_stream_after_preemption_and_across_samplers():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = random_logits(1000, 5, scale=0.5)

    def stream(sampler: Sampler, steps: range, sample_index: int = 0) -> list[int]:
        return [sampler(logits[None], [make_chunk(params, sample_index=sample_index,
                                                  num_output_tokens=k)])[0].token_id for k in steps]

    full = stream(Sampler(seed=0), range(40))
    # "preempted" after 25 tokens and resumed with a different sampler: the tail is the same
    assert stream(Sampler(seed=7), range(25, 40)) == full[25:]
    other_index = stream(Sampler(seed=0), range(40), sample_index=1)
    assert sum(a != b for a, b in zip(full, other_index, strict=True)) > 30
    assert len(set(full)) > 20  # the step counter moves the stream on


def test_different_sample_index_and_seed_give_different_mixes():
    seeds = {row_seed(s, i, k) for s in range(4) for i in range(4) for k in range(4)}
    assert len(seeds) == 64
    assert all(0 <= s < 2**63 for s in seeds)


def test_unseeded_rows_are_deterministic_for_a_sampler_seed():
    logits = random_logits(100, 6).expand(50, -1)
    chunks = [make_chunk(SamplingParams(temperature=1.0), seq_id=i) for i in range(50)]
    first = Sampler(seed=3)(logits, chunks)
    assert Sampler(seed=3)(logits, chunks) == first
    assert Sampler(seed=4)(logits, chunks) != first


def test_two_pass_argmax_equals_torch_argmax_with_ties() -> None:
    """The two-pass greedy argmax (used on CUDA; tests/integration/test_cuda.py runs it there) and the CPU's
    (torch.max's indices) pick what torch.argmax picks: the first index among equal maxima, also when the maximum
    repeats across and within slices, in float32 and bfloat16."""
    from trident.engine.sampler import ARGMAX_GROUPS, argmax, two_pass_argmax

    gen = torch.Generator().manual_seed(0)
    for vocab, groups in ((ARGMAX_GROUPS * 37, ARGMAX_GROUPS), (12, 4), (211, 211), (64, 1)):
        logits = torch.randint(-3, 4, (32, vocab), generator=gen).float()  # many ties
        assert torch.equal(two_pass_argmax(logits, groups), logits.argmax(dim=-1))
        assert torch.equal(argmax(logits), logits.argmax(dim=-1))  # the CPU path
        assert torch.equal(argmax(logits.bfloat16()), logits.argmax(dim=-1))
