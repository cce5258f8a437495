"""Benchmark workloads (TARGETS.md): the same token ids and output lengths go to trident and to the peer.

- ``latency``: one prompt (text of the model's tokenizer, or seeded random token ids when there is none).
- ``offline`` (``--workload default``): distinct prompts of equal length, equal output lengths.
- ``nano`` (``--workload nano``): nano-vllm's offline benchmark, exactly: ``random.seed(0)``; 256 prompts,
  prompt i of ``randint(100, 1024)`` token ids each ``randint(0, 10000)``; then 256 output lengths
  ``randint(100, 1024)``; EOS ignored; 133,966 output tokens. Fewer prompts (``--num-prompts N``) are the
  first N of that same sequence; caps on prompt or output length truncate each one (for quick runs).
- ``moe64`` (``--workload moe64``): TARGETS.md's mixture-of-experts offline workload, drawn as the peer script
  (``../shared/peers/hf_transformers_gpu.py``, part ``moecb``) draws it: the same procedure as nano with 64
  prompts of ``randint(100, 512)`` token ids and outputs of ``randint(100, 256)`` tokens (not nano's draws
  truncated: the ranges change the draws).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trident.errors import TridentError

LATENCY_TEXT = "The history of the printing press " * 40
OFFLINE_TEXT = (
    "Rivers carve valleys over thousands of years, carrying sediment from mountains to the sea. "
    "Along the way they feed wetlands, shape deltas and support towns that grew up on their banks. "
    "Engineers have dammed, straightened and dredged them, and ecologists now study how to undo some "
    "of that work so that fish can migrate and floods can spread across their plains again. "
) * 12
NANO_NUM_PROMPTS = 256
NANO_MAX_TOKEN_ID = 10000
MOE64_NUM_PROMPTS, MOE64_MAX_PROMPT_LEN, MOE64_MAX_OUTPUT_LEN = 64, 512, 256
RANDOM_TOKEN_SEED = 0
"""Seed of the random prompt token ids of the latency and default offline workloads on tokenizer-less models."""


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids) and how many tokens each request generates (EOS ignored)."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.output_lens):
            raise ValueError("a workload needs one output length per prompt, and at least one prompt")

    @property
    def prompt_lens(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def summary(self) -> dict:
        """What the JSON record says of the workload."""
        p, o = self.prompt_lens, self.output_lens
        return {"name": self.name, "prompts": len(p), "prompt_tokens": sum(p), "prompt_len_min": min(p),
                "prompt_len_max": max(p), "output_tokens": sum(o), "output_len_min": min(o),
                "output_len_max": max(o)}


def latency_workload(tokenizer, prompt_len: int = 241, output_len: int = 128, vocab_size: int | None = None
                     ) -> Workload:
    """One prompt of ``prompt_len`` tokens: the tokenizer's encoding of a text, else seeded random ids."""
    if tokenizer is None:
        ids = _random_ids(random.Random(RANDOM_TOKEN_SEED), prompt_len, vocab_size)
    else:
        ids = tokenizer.encode(LATENCY_TEXT, add_special_tokens=False)[:prompt_len]
        if len(ids) < prompt_len:
            raise TridentError(f"the latency text has only {len(ids)} tokens; ask for --prompt-len <= {len(ids)}")
    return Workload("latency", (tuple(ids),), (output_len,))


def offline_workload(tokenizer, num_prompts: int = 16, prompt_len: int = 128, output_len: int = 128,
                     vocab_size: int | None = None) -> Workload:
    """``num_prompts`` distinct prompts of ``prompt_len`` tokens (different windows of one text, or seeded random
    ids without a tokenizer), so the prefix cache cannot serve one from another."""
    if tokenizer is None:
        rng = random.Random(RANDOM_TOKEN_SEED)
        prompts = tuple(tuple(_random_ids(rng, prompt_len, vocab_size)) for _ in range(num_prompts))
    else:
        ids = tokenizer.encode(OFFLINE_TEXT, add_special_tokens=False)
        stride = max(1, (len(ids) - prompt_len) // max(1, num_prompts - 1))
        prompts = tuple(tuple(ids[i * stride: i * stride + prompt_len]) for i in range(num_prompts))
        if any(len(p) != prompt_len for p in prompts):
            raise TridentError("the benchmark text is too short for the requested prompts; ask for a smaller "
                               "--prompt-len or --num-prompts")
    return Workload("offline", prompts, (output_len,) * num_prompts)


def nano_workload(num_prompts: int = NANO_NUM_PROMPTS, max_prompt_len: int | None = None,
                  max_output_len: int | None = None, vocab_size: int | None = None) -> Workload:
    """nano-vllm's bench.py workload (module docstring); the first ``num_prompts`` requests, each length capped
    at ``max_prompt_len`` / ``max_output_len`` when given."""
    return _nano_draws("nano", NANO_NUM_PROMPTS, 1024, 1024, num_prompts, max_prompt_len, max_output_len,
                       vocab_size)


def moe64_workload(num_prompts: int = MOE64_NUM_PROMPTS, max_prompt_len: int | None = None,
                   max_output_len: int | None = None, vocab_size: int | None = None) -> Workload:
    """TARGETS.md's 64-sequence MoE workload (module docstring); first N and caps as for :func:`nano_workload`."""
    return _nano_draws("moe64", MOE64_NUM_PROMPTS, MOE64_MAX_PROMPT_LEN, MOE64_MAX_OUTPUT_LEN, num_prompts,
                       max_prompt_len, max_output_len, vocab_size)


def _nano_draws(name: str, total: int, prompt_high: int, output_high: int, num_prompts: int,
                max_prompt_len: int | None, max_output_len: int | None, vocab_size: int | None) -> Workload:
    """nano-vllm's draws with seed 0: ``total`` prompts of randint(100, prompt_high) ids in [0, 10000], then
    ``total`` output lengths randint(100, output_high); the first ``num_prompts``, truncated to the caps."""
    if not 1 <= num_prompts <= total:
        raise TridentError(f"the {name} workload has {total} prompts; --num-prompts must be in [1, {total}], got "
                           f"{num_prompts}")
    if vocab_size is not None and vocab_size <= NANO_MAX_TOKEN_ID:
        raise TridentError(f"the {name} workload draws token ids up to {NANO_MAX_TOKEN_ID}, but this model's "
                           f"vocabulary has {vocab_size} tokens; use --workload default")
    rng = random.Random(0)  # the same draws as random.seed(0) with the module functions, without global state
    prompts = [[rng.randint(0, NANO_MAX_TOKEN_ID) for _ in range(rng.randint(100, prompt_high))]
               for _ in range(total)]
    output_lens = [rng.randint(100, output_high) for _ in range(total)]
    p_cap, o_cap = max_prompt_len or prompt_high, max_output_len or output_high
    return Workload(name, tuple(tuple(p[:p_cap]) for p in prompts[:num_prompts]),
                    tuple(min(o, o_cap) for o in output_lens[:num_prompts]))


def _random_ids(rng: random.Random, n: int, vocab_size: int | None) -> list[int]:
    if vocab_size is None:
        raise ValueError("random prompts need the vocabulary size")
    high = min(vocab_size - 1, NANO_MAX_TOKEN_ID)
    return [rng.randint(0, high) for _ in range(n)]
