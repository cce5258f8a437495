"""Which adjacent layers share their weights (``trident share --groups auto --num-shared K``).

A candidate is a layer t >= 1 *joining* the group of layer t-1: it gives up its weights for that group's (the run
containing t-1, a lone layer being a run of one; if t already leads a run, the whole run joins). K joins make K
layers lose their weights. The cost of a join given the joins already made (:data:`CRITERIA`):

- ``nll`` (default, needs calibration text): the rise of the mean negative log-likelihood (nats per token) of the
  calibration tokens when the join is applied on top of the joins made, measured by running the model (trident's,
  float32, through :func:`trident.compress.eval.perplexity`) with the layers' modules swapped in place for the
  group's (its first layer's, or their mean: the ``--merge`` of the folder written);
- ``cosine`` (weights only): 1 minus the cosine similarity of layer t's weights and its would-be group's weights,
  averaged over the seven projection matrices (each flattened, float64).

Choice: greedy, the cheapest join first, K times. The costs are kept from one pick to the next and re-measured
lazily: the cheapest stored cost is measured again against the current joins, and taken only if it is still the
cheapest (else it goes back with its new cost). With costs that only grow as joins are added this gives the plain
greedy's answer for about (L - 1) + 2K measurements instead of K (L - 1); the costs of the first round (every join
alone against the original model) are the per-pair table of the report.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from trident.compress.share import mean_tensor
from trident.errors import TridentError
from trident.models.shared_layers import PROJECTIONS

CRITERIA = {
    "nll": "rise of the calibration tokens' mean NLL when the layer joins its neighbour's group (needs --calib)",
    "cosine": "1 - cosine similarity of the layer's weight matrices and its neighbour group's (weights only)",
}


@dataclass(frozen=True)
class Join:
    """One pick: ``layer`` joined the group now ``group``, at ``cost`` (against the joins picked before it)."""

    layer: int
    group: tuple[int, int]
    cost: float


@dataclass
class Choice:
    """The joins picked, in order, and every join's cost measured alone against the original (the first round)."""

    joins: list[Join] = field(default_factory=list)
    alone: dict[int, float] = field(default_factory=dict)
    measurements: int = 0

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        return runs_of({j.layer for j in self.joins})


def runs_of(joined: set[int] | frozenset[int]) -> tuple[tuple[int, int], ...]:
    """The groups (first, last) made by ``joined`` (layer t in it: t is in t-1's group); lone layers left out."""
    groups: list[list[int]] = []
    for t in sorted(joined):
        if groups and groups[-1][1] == t - 1:
            groups[-1][1] = t
        else:
            groups.append([t - 1, t])
    return tuple((a, b) for a, b in groups)


def _run_of(groups: Sequence[tuple[int, int]], layer: int) -> tuple[int, int]:
    return next(((a, b) for a, b in groups if a <= layer <= b), (layer, layer))


def choose_joins(num_layers: int, num_shared: int, cost: Callable[[frozenset[int], int], float]) -> Choice:
    """Pick ``num_shared`` joins greedily with lazily re-measured costs (see the module docstring);
    ``cost(joined, t)``: the cost of layer t joining given the joins ``joined``."""
    if not isinstance(num_shared, int) or not 1 <= num_shared <= num_layers - 1:
        raise TridentError(f"--num-shared must be between 1 and {num_layers - 1} (the model has {num_layers} "
                           f"layers), got {num_shared!r}")
    choice = Choice()
    joined: frozenset[int] = frozenset()
    heap = []
    for t in range(1, num_layers):
        c = cost(joined, t)
        choice.alone[t] = c
        heap.append((c, t, 0))
    choice.measurements = num_layers - 1
    heapq.heapify(heap)
    version = 0
    while len(joined) < num_shared:
        c, t, measured_at = heapq.heappop(heap)
        if measured_at == version:
            joined = joined | {t}
            version += 1
            choice.joins.append(Join(t, _run_of(runs_of(joined), t), c))
            continue
        heapq.heappush(heap, (cost(joined, t), t, version))
        choice.measurements += 1
    return choice


@contextmanager
def groups_applied(model: nn.Module, groups: Sequence[tuple[int, int]], sharing_modules: Sequence[str],
                   merge: str):
    """Within the block, every layer of each group runs the group's modules (trident names, e.g.
    ``self_attn.qkv_proj``): its first layer's (``merge`` first) or new modules holding the mean of the group's
    parameters (``mean``); the model's own modules are put back on exit."""
    layers = model.get_submodule("model.layers")
    saved = []
    try:
        for first, last in groups:
            for path in sharing_modules:
                parent, _, attr = path.rpartition(".")
                members = [layers[i].get_submodule(path) for i in range(first, last + 1)]
                merged = members[0] if merge == "first" else _mean_module(members)
                for i in range(first + 1 if merge == "first" else first, last + 1):
                    owner = layers[i].get_submodule(parent) if parent else layers[i]
                    saved.append((owner, attr, getattr(owner, attr)))
                    setattr(owner, attr, merged)
        yield
    finally:
        for owner, attr, module in reversed(saved):
            setattr(owner, attr, module)


def _mean_module(members: list[nn.Module]) -> nn.Module:
    merged = copy.copy(members[0])
    merged._parameters = {name: None if p is None else nn.Parameter(
        mean_tensor([m._parameters[name] for m in members]), requires_grad=False)
        for name, p in members[0]._parameters.items()}
    return merged


def nll_cost(loss: Callable[[], float], model: nn.Module, modules: Sequence[str],
             merge: str) -> Callable[[frozenset[int], int], float]:
    """The ``nll`` criterion: ``loss()`` (the calibration NLL of ``model`` as it is at the call) with the joins
    applied to ``modules`` (trident names, :func:`trident.models.shared_layers.trident_names`), minus the same
    without the candidate; losses are cached per set of joins."""
    cache: dict[frozenset[int], float] = {}

    def loss_of(joined: frozenset[int]) -> float:
        if joined not in cache:
            with groups_applied(model, runs_of(joined), modules, merge):
                cache[joined] = loss()
        return cache[joined]

    return lambda joined, t: loss_of(joined | {t}) - loss_of(joined)


def layer_weights(tensors: Mapping[str, torch.Tensor], layer: int) -> list[torch.Tensor]:
    """Layer ``layer``'s projection matrices (Hugging Face names), flattened, float64."""
    return [tensors[f"model.layers.{layer}.{m}.weight"].detach().to(torch.float64).flatten() for m in PROJECTIONS]


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The mean over the matrices of the cosine similarity of a's and b's."""
    sims = [float(torch.dot(x, y) / (x.norm() * y.norm()).clamp_min(1e-300)) for x, y in zip(a, b)]
    return sum(sims) / len(sims)


def cosine_cost(tensors: Mapping[str, torch.Tensor], merge: str) -> Callable[[frozenset[int], int], float]:
    """The ``cosine`` criterion: 1 - :func:`cosine` of layer t's weights and those of the group of t-1 under the
    joins made (its first layer's, or the mean of its layers')."""
    weights: dict[int, list[torch.Tensor]] = {}

    def of(layer: int) -> list[torch.Tensor]:
        if layer not in weights:
            weights[layer] = layer_weights(tensors, layer)
        return weights[layer]

    def cost(joined: frozenset[int], t: int) -> float:
        first, last = _run_of(runs_of(joined), t - 1)
        if merge == "first":
            group = of(first)
        else:
            members = [of(i) for i in range(first, last + 1)]
            group = [torch.stack(parts).mean(0) for parts in zip(*members)]
        return 1.0 - cosine(of(t), group)

    return cost


def adjacent_cosines(tensors: Mapping[str, torch.Tensor], num_layers: int) -> dict[int, float]:
    """Layer t -> :func:`cosine` of layers t-1 and t, for t = 1 .. num_layers - 1."""
    out, previous = {}, layer_weights(tensors, 0)
    for t in range(1, num_layers):
        current = layer_weights(tensors, t)
        out[t], previous = cosine(previous, current), current
    return out
