"""Two engines' greedy decodes of one prompt agree: what the native-kernel tests ask of a faster path against its
reference (both run the same model, so only rounding may differ)."""

from __future__ import annotations


def assert_greedy_agree(ours: list, theirs: list, tolerance: float, min_compared: int = 1) -> None:
    """Per step (Logprob entries with top_logprobs): log-probabilities within ``tolerance`` nats; where the greedy
    tokens differ, only at a near tie (the runner-up within ``tolerance`` in both), after which the continuations
    differ and the comparison stops. At least ``min_compared`` steps compared, and the two of equal length."""
    assert len(ours) == len(theirs), f"{len(ours)} against {len(theirs)} tokens"
    compared = 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a.logprob - b.logprob) < tolerance, f"step {step}: {a.logprob} vs {b.logprob}"
        compared += 1
        if a.token_id != b.token_id:
            margin = min(x.top_logprobs[0][1] - x.top_logprobs[1][1] for x in (a, b))
            assert margin < tolerance, f"step {step}: greedy token {a.token_id} vs {b.token_id}, margin {margin}"
            break
    assert compared >= min_compared, f"only {compared} steps compared"
