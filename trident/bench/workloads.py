"""CPU benchmark workloads (TARGETS.md): the same token ids go to trident and to the peer."""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_TEXT = "The history of the printing press " * 40
OFFLINE_TEXT = (
    "Rivers carve valleys over thousands of years, carrying sediment from mountains to the sea. "
    "Along the way they feed wetlands, shape deltas and support towns that grew up on their banks. "
    "Engineers have dammed, straightened and dredged them, and ecologists now study how to undo some "
    "of that work so that fish can migrate and floods can spread across their plains again. "
) * 12


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: tuple[tuple[int, ...], ...]
    output_len: int


def latency_workload(tokenizer, prompt_len: int = 241, output_len: int = 128) -> Workload:
    ids = tokenizer.encode(LATENCY_TEXT, add_special_tokens=False)[:prompt_len]
    return Workload("latency", (tuple(ids),), output_len)


def offline_workload(tokenizer, num_prompts: int = 16, prompt_len: int = 128, output_len: int = 128) -> Workload:
    """num_prompts distinct prompts of prompt_len tokens (different windows of one text), so the
    prefix cache cannot serve one from another."""
    ids = tokenizer.encode(OFFLINE_TEXT, add_special_tokens=False)
    stride = max(1, (len(ids) - prompt_len) // max(1, num_prompts - 1))
    prompts = tuple(tuple(ids[i * stride: i * stride + prompt_len]) for i in range(num_prompts))
    if any(len(p) != prompt_len for p in prompts):
        raise ValueError("benchmark text too short for the requested prompts")
    return Workload("offline", prompts, output_len)
