"""The memory-bandwidth roofline of decoding: bytes a step must move against a copy bandwidth measured
in the same run.

A decode step reads every weight once (whatever the batch) and, for each sequence in the batch, the
keys and values of its context in every layer (at most the window on sliding-window layers). The input
embedding table is not counted when it is untied (a step reads one row per token); tied, it is the
LM head and is counted. Prefill compute, activations and KV writes are left out: this is a lower
bound on time, so the roofline is an upper bound on tokens per second.

Mixture-of-experts models: a step reads only the routed experts its tokens chose. With uniform routing (each
token picks top_k distinct experts of E, every set equally likely, tokens independent), an expert is missed by one
token with probability 1 - k / E, by all b tokens of a step with (1 - k / E)^b, so a sparse layer reads
E (1 - (1 - k / E)^b) experts in expectation: k at batch 1, nearly all E at large batches. Real routers are less
even (more tokens on popular experts, fewer distinct experts), so fewer bytes: the bound stays a bound only as
far as routing is near uniform. Dense weights (attention, shared experts, dense layers, the router) count every
step.

For a workload, the bound is taken over the ideal schedule: every sequence decodes in one batch from
the first step, so there are as many steps as the longest output (step s batching the sequences with more
than s outputs), and output token t of a sequence with a p-token prompt reads p + t cached tokens. The first
token (from prefill) is counted as a decode step of context p; the latency benchmark's decode rate excludes it,
so its roofline starts one token later.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from trident.config import ModelConfig

CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 256 << 20


@dataclass(frozen=True)
class Roofline:
    """The bandwidth bound of decoding a workload."""

    bandwidth_bytes_s: float
    """Measured copy bandwidth: bytes read plus bytes written per second."""
    weight_bytes: int
    """Weights a decode step may read: all of them (less an untied embedding table)."""
    steps: int
    """Decode steps of the ideal schedule (the longest output)."""
    kv_read_bytes: int
    """Keys and values read over the whole workload."""
    kv_element_bytes: int
    output_tokens: int
    context_tokens: int
    """Sum over output tokens of the context each one attends to (before window caps)."""
    weight_read_bytes: float
    """Weights read over the whole workload: weight_bytes per step for a dense model; with routed experts their
    expected share at each step's batch (see the module docstring)."""
    expert_bytes: int = 0
    """The routed experts' part of weight_bytes (0 for a dense model)."""

    @property
    def weight_bytes_per_step(self) -> float:
        """Weights read per decode step, on average over the steps."""
        return self.weight_read_bytes / self.steps

    @property
    def total_bytes(self) -> float:
        return self.weight_read_bytes + self.kv_read_bytes

    @property
    def seconds(self) -> float:
        return self.total_bytes / self.bandwidth_bytes_s

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def mean_batch(self) -> float:
        return self.output_tokens / self.steps

    @property
    def mean_context(self) -> float:
        return self.context_tokens / self.output_tokens

    def as_dict(self) -> dict:
        return {"bandwidth_gb_s": self.bandwidth_bytes_s / 1e9, "weight_bytes": self.weight_bytes,
                "expert_bytes": self.expert_bytes, "weight_bytes_per_step": self.weight_bytes_per_step,
                "steps": self.steps, "kv_read_bytes": self.kv_read_bytes,
                "kv_element_bytes": self.kv_element_bytes, "mean_batch": self.mean_batch,
                "mean_context": self.mean_context, "roofline_s": self.seconds, "roofline_tok_s": self.tok_s}


def decode_weight_bytes(named_parameters: Iterable[tuple[str, torch.Tensor]], tie_word_embeddings: bool) -> int:
    """Bytes of the weights one decode step reads: every parameter (``Module.named_parameters`` lists a shared
    one once), less an untied input embedding table."""
    return sum(t.numel() * t.element_size() for name, t in named_parameters
               if tie_word_embeddings or not name.endswith("embed_tokens.weight"))


def routed_expert_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Bytes of the routed experts' fused tensors (``experts.gate_up_proj``, ``experts.down_proj``: every expert of
    every sparse layer) among the (name, tensor) pairs; int8 experts (trident/moe/quant.py) as stored, their codes
    (``experts.gate_up_qweight`` / ``down_qweight``) and scales (``_scales``) counted."""
    from trident.moe.quant import expert_weight_bytes

    return expert_weight_bytes(named_tensors)


def expected_active_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a sparse layer runs for ``batch`` tokens under uniform routing: E (1 - (1 - k / E)^b)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def kv_read_bytes(config: ModelConfig, prompt_lens: Sequence[int], output_lens: Sequence[int],
                  kv_element_bytes: int) -> tuple[int, int]:
    """(bytes, context tokens) read from the KV cache when output token t of request i attends to
    prompt_lens[i] + t cached tokens (capped at a layer's window) in every layer (what the model's
    ``kv_cache_spec`` caches: keys and values, or one latent per token with multi-head latent attention)."""
    spec = config.kv_cache_spec
    per_token_layer = spec.tensors_per_layer * spec.num_kv_heads * spec.key_dim * kv_element_bytes
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    total = context = 0
    for p, o in zip(prompt_lens, output_lens):
        full = o * p + o * (o - 1) // 2  # sum over t < o of (p + t)
        context += full
        for window in windows:
            total += (full if window is None else _capped_sum(p, o, window)) * per_token_layer
    return total, context


def decode_roofline(config: ModelConfig, weight_bytes: int, kv_element_bytes: int, prompt_lens: Sequence[int],
                    output_lens: Sequence[int], bandwidth_bytes_s: float, expert_bytes: int = 0) -> Roofline:
    """The roofline of decoding ``output_lens[i]`` tokens after ``prompt_lens[i]`` cached ones, all at once.
    ``weight_bytes``: all weights (decode_weight_bytes); ``expert_bytes``: the routed experts' part of them
    (routed_expert_bytes), read at each step as far as its batch routes to them (config.moe's experts and top-k)."""
    kv, context = kv_read_bytes(config, prompt_lens, output_lens, kv_element_bytes)
    steps = max(output_lens)
    weight_read: float = steps * weight_bytes
    if expert_bytes:
        assert config.moe is not None, "routed expert bytes without experts in the config"
        num_experts, top_k = config.moe.router.num_experts, config.moe.router.top_k
        for step in range(steps):
            batch = sum(1 for o in output_lens if o > step)
            share = expected_active_experts(num_experts, top_k, batch) / num_experts
            weight_read -= expert_bytes * (1.0 - share)
    return Roofline(bandwidth_bytes_s=bandwidth_bytes_s, weight_bytes=weight_bytes, steps=steps,
                    kv_read_bytes=kv, kv_element_bytes=kv_element_bytes, output_tokens=sum(output_lens),
                    context_tokens=context, weight_read_bytes=weight_read, expert_bytes=expert_bytes)


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second (read + write) of copying one large buffer into another on ``device``: the best of
    ``repeats`` copies after a warm-up one. 1 GiB on CUDA, 256 MiB on the CPU (past its caches) by default."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first copy warms up (page faults, allocator)
            best = min(best, time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return moved / best


def _capped_sum(p: int, o: int, window: int) -> int:
    """sum over t < o of min(p + t, window)."""
    below = max(0, min(o, window - p))  # the first `below` tokens see fewer than `window` cached ones
    return below * p + below * (below - 1) // 2 + (o - below) * window
