"""Unstructured and 2:4 semi-structured pruning as masks: zeros written into the decoder's projection weights,
shapes unchanged (``trident prune --structure unstructured|2:4``).

Which weights: the seven projections of every decoder layer (:data:`PROJECTIONS`: q, k, v, o, gate, up, down);
never the embeddings, the LM head or the norms.

Score of weight ``W[i, j]`` (output row i, input feature j), higher is kept:

- ``l1``: ``|W[i, j]|``;
- ``wanda``: ``|W[i, j]| * ||X_j||``, ``||X_j||`` the L2 norm over the calibration tokens of input feature j of
  that projection (:class:`trident.compress.prune.ActivationNorms`: the normed hidden state for q/k/v and
  gate/up, the attention output for o, the intermediate activation for down), as Wanda (Sun et al., 2023) scores.

Comparison groups (Wanda's per-output choice):

- ``unstructured``: each output row on its own: the :func:`pruned_per_row` lowest-scoring weights of every row
  are zeroed (``in_features * sparsity`` rounded half up), so every row keeps exactly the same count;
- ``2:4``: each run of four consecutive input features of a row (columns 4g..4g+3): the two lowest are zeroed,
  the two highest kept. 50% by definition; what NVIDIA's sparse tensor cores multiply
  (:mod:`trident.quant.sparse24`).

Ties keep the lower input index. Scores are float64 whatever the weights' dtype; the masked weights keep it.

The written folder is an ordinary Hugging Face folder (same shapes, loads in transformers and trident unchanged)
whose config.json carries ``trident_sparsity`` = ``{"pattern", "sparsity", "method"}`` (:func:`read_sparsity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trident.compress.prune import ARCHITECTURES, ActivationNorms, Shape
from trident.errors import TridentError

PATTERNS = ("unstructured", "2:4")
MASK_METHODS = {
    "l1": "|W|",
    "wanda": "|W| times the L2 norm of its input feature on the calibration tokens",
}
"""Weight scores by name (see the module docstring)."""
CONFIG_KEY = "trident_sparsity"
"""The config.json entry that marks a masked folder."""
PROJECTIONS = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
               "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
               "mlp.down_proj": "mlp_mid"}
"""The masked projections of a decoder layer and which ActivationNorms field is their input."""
GROUP = 4
KEPT_PER_GROUP = 2
"""2:4: of every GROUP consecutive input features of a row, KEPT_PER_GROUP are kept."""


@dataclass(frozen=True)
class SparsityConfig:
    """Which pattern, how much, scored how."""

    pattern: str
    """``unstructured`` or ``2:4``."""
    sparsity: float | None = None
    """Fraction of each row's weights zeroed: 0 < sparsity < 1 for unstructured; 2:4 is 0.5 (None means that)."""
    method: str = "l1"
    """The score (a key of :data:`MASK_METHODS`)."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise TridentError(f"unknown sparsity pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        s = self.sparsity
        if self.pattern == "2:4":
            if s is None:
                object.__setattr__(self, "sparsity", 0.5)
            elif s != 0.5:
                raise TridentError(f"2:4 keeps 2 of every 4 weights: its sparsity is 0.5; drop --sparsity or give "
                                   f"0.5 (got {s!r})")
        elif s is None or isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise TridentError(f"--sparsity must be a fraction strictly between 0 and 1 (0.5 zeroes half of every "
                               f"row), got {s!r}")
        if self.method not in MASK_METHODS:
            raise TridentError(f"--structure {self.pattern} scores weights by {', '.join(MASK_METHODS)}; got "
                               f"{self.method!r}")

    def as_hf_dict(self) -> dict:
        return {"pattern": self.pattern, "sparsity": self.sparsity, "method": self.method}


@dataclass(frozen=True)
class MaskedModule:
    """One masked projection: its zeros before and after."""

    name: str
    out_features: int
    in_features: int
    zeros_before: int
    zeros_after: int


def read_sparsity(hf_config: Mapping) -> SparsityConfig | None:
    """The folder's ``trident_sparsity`` mark, None when unmarked; a malformed one is a TridentError."""
    entry = hf_config.get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or "pattern" not in entry:
        raise TridentError(f"config.json's {CONFIG_KEY} must be an object with pattern and sparsity (written by "
                           f"`trident prune --structure`), got {entry!r}")
    try:
        return SparsityConfig(entry["pattern"], entry.get("sparsity"), entry.get("method", "l1"))
    except TridentError as e:
        raise TridentError(f"config.json's {CONFIG_KEY} is invalid: {e}") from None


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """Weights zeroed in every row at unstructured ``sparsity``: ``in_features * sparsity`` rounded half up."""
    return min(in_features, math.floor(in_features * sparsity + 0.5))


def weight_scores(weight: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
    """float64 [out, in]: ``|W|`` (l1, ``input_norms`` None) or ``|W| * ||X_j||`` (wanda, norms [in])."""
    scores = weight.detach().to(torch.float64).abs()
    return scores if input_norms is None else scores * input_norms.to(torch.float64)[None, :]


def _keep_highest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest of each row of ``scores`` (ties: the lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :keep], True)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Which weights stay (bool [out, in]): all but the :func:`pruned_per_row` lowest of every row."""
    return _keep_highest(scores, scores.shape[1] - pruned_per_row(scores.shape[1], sparsity))


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Which weights stay (bool [out, in]): the two highest of every four consecutive input features of a row."""
    out_features, in_features = scores.shape
    if in_features % GROUP:
        raise TridentError(f"2:4 sparsity groups the input features by {GROUP}; a weight with {in_features} inputs "
                           "cannot be masked so (use --structure unstructured)")
    grouped = scores.reshape(out_features, in_features // GROUP, GROUP)
    return _keep_highest(grouped, KEPT_PER_GROUP).reshape(out_features, in_features)


def weight_mask(weight: torch.Tensor, config: SparsityConfig, input_norms: torch.Tensor | None) -> torch.Tensor:
    """The mask ``config`` gives ``weight``; wanda needs ``input_norms``, l1 takes none."""
    if (config.method == "wanda") != (input_norms is not None):
        raise TridentError("--method wanda scores with the activation norms (--calib TEXT); l1 with the weights only")
    scores = weight_scores(weight, input_norms)
    return two_four_mask(scores) if config.pattern == "2:4" else unstructured_mask(scores, config.sparsity)


def masked_tensors(tensors: Mapping[str, torch.Tensor], shape: Shape, config: SparsityConfig,
                   norms: list[ActivationNorms] | None = None) -> tuple[dict[str, torch.Tensor], list[MaskedModule]]:
    """Every tensor of the model with the decoder projections masked (dtypes kept), and one record per masked
    projection; wanda needs ``norms``, one per layer."""
    if config.method == "wanda" and (norms is None or len(norms) != shape.num_layers):
        raise TridentError("--method wanda needs the activation norms of every layer (--calib TEXT)")
    out = dict(tensors)
    report = []
    for layer in range(shape.num_layers):
        for module, norm_field in PROJECTIONS.items():
            name = f"model.layers.{layer}.{module}.weight"
            weight = tensors[name]
            input_norms = None if config.method != "wanda" else getattr(norms[layer], norm_field)
            keep = weight_mask(weight, config, input_norms)
            out[name] = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))
            report.append(MaskedModule(name, weight.shape[0], weight.shape[1], int((weight == 0).sum()),
                                       int((out[name] == 0).sum())))
    return out, report


def sparse_hf_config(hf_config: Mapping, config: SparsityConfig) -> dict:
    """The source's config with :data:`CONFIG_KEY` set and ``architectures`` filled in."""
    result = dict(hf_config)
    result[CONFIG_KEY] = config.as_hf_dict()
    result.setdefault("architectures", [ARCHITECTURES[result["model_type"]]])
    return result
