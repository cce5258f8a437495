"""Expert load statistics of an MoE model: how many tokens each expert of each layer received.

:class:`MoeLoadStats` accumulates on the model's device, without ever waiting for it: per step one mask of
the real rows (CUDA-graph padding rows, whose KV slot is -1, are left out), and per MoE layer one index_add of
the chosen expert ids into a [layers, experts] counter and one matrix-vector product adding the tokens' routing
probabilities into a [layers, experts] sum. Nothing reaches the host until :meth:`MoeLoadStats.snapshot` is
asked for; every operation is capturable in a CUDA graph (replays count too).

Figures of a snapshot, per MoE layer:

- ``token_counts[e]``: (token, expert) assignments to expert e; they add up to top_k x tokens.
- ``imbalance``: max / mean of token_counts (1.0 = perfectly even; E / top_k at worst); 0.0 before any token.
- ``mean_probs[e]``: the routing probability of expert e averaged over the tokens, p_i. Softmax routers give it
  directly; a sigmoid router's scores are first divided by their sum over the experts, per token.
- ``entropy_term``: alpha * sum_i p_i log p_i, the entropy balance term: -alpha * log(E) when the router
  spreads probability evenly, 0 when it always puts it all on one expert. ``alpha`` defaults to
  :data:`DEFAULT_ENTROPY_ALPHA` (1.0: the term is minus the entropy of the mean routing distribution, in nats).

Expert parallelism (trident/distributed/experts.py): every rank's router is whole and routes every token, so
every rank's accumulators count all the experts, alike. A rank's snapshot reports the experts it holds
(:meth:`MoeLoadStats.report_experts`, set when the model is split): ``token_counts`` and ``mean_probs`` of those
experts, ``first_expert`` the model's id of the first, ``imbalance`` over them (how evenly the rank's own experts
are loaded); ``num_tokens`` and ``entropy_term`` stay the whole router's. The ranks' ``token_counts`` concatenated
in rank order are the model's; ``snapshot(whole=True)`` gives them on any rank, without communication.

Reset semantics: the figures count every token since the engine finished its start-up (warm-up and CUDA-graph
capture are not counted) or since the last :meth:`MoeLoadStats.reset` (``LLMEngine.reset_moe_stats``). Reading
a snapshot does not reset them. Prefill and decode tokens count alike; preempted and recomputed tokens count
again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trident.moe.router import Routing

DEFAULT_ENTROPY_ALPHA = 1.0
"""The default alpha of the entropy balance term alpha * sum_i p_i log p_i."""


@dataclass(frozen=True)
class MoeLayerLoad:
    """The load of one MoE layer's experts since the last reset (see the module docstring)."""

    layer: int
    """The decoder layer index."""
    token_counts: tuple[int, ...]
    mean_probs: tuple[float, ...]
    imbalance: float
    entropy_term: float

    @property
    def token_share(self) -> tuple[float, ...]:
        """Each expert's fraction of the layer's assignments (0.0 each before any token)."""
        total = sum(self.token_counts)
        return tuple(c / total if total else 0.0 for c in self.token_counts)


@dataclass(frozen=True)
class MoeStats:
    """A snapshot of an MoE model's expert load, per MoE layer."""

    num_experts: int
    """Experts whose figures each layer reports: the model's experts per layer, or under expert parallelism a
    rank's (E / N of them)."""
    top_k: int
    num_tokens: int
    """Tokens routed (through every MoE layer) since the last reset."""
    alpha: float
    layers: tuple[MoeLayerLoad, ...]
    first_expert: int = 0
    """The model's id of each layer's ``token_counts[0]`` (nonzero on the ranks after 0 under expert
    parallelism)."""

    @property
    def max_imbalance(self) -> float:
        return max((layer.imbalance for layer in self.layers), default=0.0)


class MoeLoadStats:
    """The device-side accumulators of a model's MoE layers (``layers``: their decoder layer indices)."""

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int, sigmoid_scores: bool,
                 alpha: float = DEFAULT_ENTROPY_ALPHA) -> None:
        self.layers = tuple(layers)
        self.num_experts = num_experts
        self.top_k = top_k
        self.sigmoid_scores = sigmoid_scores
        self.alpha = alpha
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self._reported = range(num_experts)
        """The experts a snapshot reports (all of them, or a rank's under expert parallelism)."""
        self._counts: torch.Tensor | None = None
        """int64 [layers, experts]."""
        self._prob_sums: torch.Tensor | None = None
        """float32 [layers, experts]."""
        self._num_tokens: torch.Tensor | None = None
        """int64 []."""
        self._pair_mask: torch.Tensor | None = None
        """This step's int64 [tokens * top_k]: 1 for the (token, slot) pairs of real tokens."""
        self._row_mask: torch.Tensor | None = None
        """This step's float32 [tokens]: 1 for real tokens."""

    def _allocate(self, device: torch.device) -> None:
        shape = (len(self.layers), self.num_experts)
        self._counts = torch.zeros(shape, dtype=torch.long, device=device)
        self._prob_sums = torch.zeros(shape, dtype=torch.float32, device=device)
        self._num_tokens = torch.zeros((), dtype=torch.long, device=device)

    def begin_step(self, slot_mapping: torch.Tensor) -> None:
        """Start a forward over tokens whose KV slots are ``slot_mapping`` (-1: a padding row, not counted)."""
        if self._counts is None or self._counts.device != slot_mapping.device:
            self._allocate(slot_mapping.device)
        real = slot_mapping >= 0
        self._row_mask = real.float()
        # expand + reshape rather than repeat_interleave: no repeat count goes through a device tensor (older torch
        # read one back on the host), so the step stays capturable
        self._pair_mask = real.long()[:, None].expand(-1, self.top_k).reshape(-1)
        self._num_tokens += real.sum()

    def record(self, layer: int, routing: Routing) -> None:
        """Add one MoE layer's routing of this step's tokens."""
        assert self._pair_mask is not None, "begin_step comes first"
        slot = self._slot[layer]
        self._counts[slot].index_add_(0, routing.expert_ids.reshape(-1), self._pair_mask)
        probs = routing.scores
        if self.sigmoid_scores:
            probs = probs / probs.sum(dim=-1, keepdim=True)
        self._prob_sums[slot].addmv_(probs.t(), self._row_mask)

    def accumulators(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts int64 [E], probability sums float32 [E], this step's row mask float32 [tokens]) of one MoE layer,
        for a kernel that adds a routing itself as :meth:`record` would (trident/kernels/moe_route.py)."""
        assert self._row_mask is not None, "begin_step comes first"
        slot = self._slot[layer]
        return self._counts[slot], self._prob_sums[slot], self._row_mask

    def report_experts(self, first: int, count: int) -> None:
        """Let snapshots report experts ``first`` .. ``first + count - 1`` only (a rank's, under expert parallelism;
        the accumulators still count every expert)."""
        if not 0 <= first < first + count <= self.num_experts:
            raise ValueError(f"experts {first}..{first + count - 1} are not among the {self.num_experts}")
        self._reported = range(first, first + count)

    def reset(self) -> None:
        """Forget everything counted so far."""
        if self._counts is None:
            return
        with torch.inference_mode():  # the counters are inference tensors when the engine's steps made them
            self._counts.zero_()
            self._prob_sums.zero_()
            self._num_tokens.zero_()

    def snapshot(self, whole: bool = False) -> MoeStats:
        """The figures so far, read from the device (the only place the statistics wait for it): of the reported
        experts (:meth:`report_experts`), or of all of them with ``whole``."""
        if self._counts is None:
            counts = [[0] * self.num_experts for _ in self.layers]
            sums = [[0.0] * self.num_experts for _ in self.layers]
            num_tokens = 0
        else:
            counts = self._counts.cpu().tolist()
            sums = self._prob_sums.cpu().tolist()
            num_tokens = int(self._num_tokens.item())
        experts = range(self.num_experts) if whole else self._reported
        kept = slice(experts.start, experts.stop)
        loads = []
        for layer, layer_counts, layer_sums in zip(self.layers, counts, sums):
            mean_probs = tuple(s / num_tokens if num_tokens else 0.0 for s in layer_sums)
            entropy = self.alpha * sum(p * math.log(p) for p in mean_probs if p > 0)  # the whole router's
            layer_counts = layer_counts[kept]
            total = sum(layer_counts)
            imbalance = max(layer_counts) / (total / len(experts)) if total else 0.0
            loads.append(MoeLayerLoad(layer=layer, token_counts=tuple(layer_counts), mean_probs=mean_probs[kept],
                                      imbalance=imbalance, entropy_term=entropy))
        return MoeStats(num_experts=len(experts), top_k=self.top_k, num_tokens=num_tokens, alpha=self.alpha,
                        layers=tuple(loads), first_expert=experts.start)
