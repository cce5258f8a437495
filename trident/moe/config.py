"""Mixture-of-experts configuration: how a router picks experts, and which layers hold experts.

Torch-free (ModelConfig carries a :class:`MoeConfig`, and the configuration imports no torch).
:func:`moe_config_from_hf` reads the settings of each supported family from its Hugging Face config dict,
with the arithmetic of transformers 5.24's gate modules:

- mixtral: softmax over all experts, top-k, renormalised over the k.
- qwen2_moe, qwen3_moe: softmax, top-k, renormalised when ``norm_topk_prob``.
- deepseek_v2: softmax; ``topk_method`` greedy, or group_limited_greedy (groups ranked by their best
  expert); weights times ``routed_scaling_factor``; never renormalised (transformers 5.24's gate ignores
  ``norm_topk_prob``).
- deepseek_v3: sigmoid; a per-expert score-correction bias added for the choice only; groups ranked by the
  sum of their two best (biased) scores; the chosen experts' unbiased scores renormalised when
  ``norm_topk_prob`` (over their sum + 1e-20), times ``routed_scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trident.errors import TridentError

SCORING_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
RENORMALIZE_EPS_SIGMOID = 1e-20
"""Added to the sum of the chosen sigmoid scores before dividing by it (DeepSeek-V3's guard against 0)."""


@dataclass(frozen=True)
class RouterConfig:
    """How one MoE layer's router turns its logits [tokens, num_experts] into (weights, expert ids) [tokens, top_k]."""

    num_experts: int
    """Routed experts (shared experts are not routed and do not count)."""
    top_k: int
    """Experts each token is sent to."""
    scoring: str = "softmax"
    """softmax (over all experts) or sigmoid (each expert on its own), computed in float32."""
    renormalize: bool = True
    """Divide the k chosen scores by their sum, so they add up to 1 (before routed_scaling_factor)."""
    num_groups: int = 1
    """Group-limited routing: experts split into this many equal groups (consecutive ids); 1 = off."""
    topk_groups: int = 1
    """With num_groups > 1: a token picks its experts only from its best topk_groups groups."""
    group_score: str = "max"
    """How a group is ranked: max (its best expert's score, DeepSeek-V2) or top2_sum (the sum of its two best,
    DeepSeek-V3)."""
    routed_scaling_factor: float = 1.0
    """The final weights are multiplied by this (DeepSeek)."""
    score_correction_bias: bool = False
    """A learned per-expert bias (the checkpoint's ``gate.e_score_correction_bias``) added to the scores to choose
    the experts, not to weigh them (DeepSeek-V3's auxiliary-loss-free balancing)."""

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or not 0 < self.top_k <= self.num_experts:
            raise TridentError(f"router config: need 0 < top_k ({self.top_k}) <= num_experts ({self.num_experts})")
        if self.scoring not in SCORING_FUNCTIONS:
            raise TridentError(f"router config: unsupported scoring {self.scoring!r}; supported: "
                               f"{', '.join(SCORING_FUNCTIONS)}")
        if self.group_score not in GROUP_SCORES:
            raise TridentError(f"router config: unsupported group_score {self.group_score!r}; supported: "
                               f"{', '.join(GROUP_SCORES)}")
        if self.num_groups <= 0 or self.num_experts % self.num_groups:
            raise TridentError(f"router config: num_experts ({self.num_experts}) must split into num_groups "
                               f"({self.num_groups}) equal groups")
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            if not 0 < self.topk_groups <= self.num_groups:
                raise TridentError(f"router config: need 0 < topk_groups ({self.topk_groups}) <= num_groups "
                                   f"({self.num_groups})")
            if self.top_k > self.topk_groups * per_group:
                raise TridentError(f"router config: top_k ({self.top_k}) exceeds the {self.topk_groups * per_group} "
                                   "experts of the chosen groups; raise topk_groups")
            if self.group_score == "top2_sum" and per_group < 2:
                raise TridentError("router config: top2_sum group scores need at least 2 experts per group")

    @property
    def grouped(self) -> bool:
        return self.num_groups > 1


@dataclass(frozen=True)
class MoeConfig:
    """The mixture-of-experts part of a model: routed experts (and shared experts) in some decoder layers."""

    router: RouterConfig
    moe_intermediate_size: int
    """Intermediate size of each routed expert."""
    sparse_layers: tuple[int, ...]
    """Indices of the decoder layers whose MLP is an MoE block; the others have the dense MLP
    (ModelConfig.intermediate_size)."""
    shared_expert_intermediate_size: int = 0
    """Intermediate size of the shared expert every token also goes through; 0 = none."""
    shared_expert_gate: bool = False
    """The shared expert's output is scaled by sigmoid(hidden . w) per token (Qwen2-MoE)."""
    router_float32: bool = False
    """The router logits come from float32 hidden states and weights (DeepSeek), rather than the model's dtype
    (then widened to float32 for scoring)."""

    def __post_init__(self) -> None:
        if self.moe_intermediate_size <= 0:
            raise TridentError(f"moe config: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.shared_expert_intermediate_size < 0:
            raise TridentError("moe config: shared_expert_intermediate_size must be >= 0")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise TridentError("moe config: a shared expert gate needs a shared expert")

    def is_sparse(self, layer_index: int) -> bool:
        return layer_index in self.sparse_layers


MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def moe_config_from_hf(model_type: str, d: dict[str, Any], num_layers: int) -> MoeConfig | None:
    """The MoeConfig of a Hugging Face config dict ``d`` (class defaults already filled in); None for a dense
    family."""
    if model_type not in MOE_MODEL_TYPES:
        return None
    top_k = int(d["num_experts_per_tok"])
    if model_type == "mixtral":
        router = RouterConfig(num_experts=int(d["num_local_experts"]), top_k=top_k)
        return MoeConfig(router=router, moe_intermediate_size=int(d["intermediate_size"]),
                         sparse_layers=tuple(range(num_layers)))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias)
        num_experts = int(d["num_local_experts"] if "num_local_experts" in d else d["num_experts"])
        router = RouterConfig(num_experts=num_experts, top_k=top_k, renormalize=bool(d.get("norm_topk_prob")))
        dense = set(d.get("mlp_only_layers") or ())
        step = int(d.get("decoder_sparse_step") or 1)
        sparse = tuple(i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
        shared = int(d.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
        return MoeConfig(router=router, moe_intermediate_size=int(d["moe_intermediate_size"]), sparse_layers=sparse,
                         shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0)
    # DeepSeek-V2 / V3
    num_experts = int(d["n_routed_experts"])
    moe_intermediate = int(d["moe_intermediate_size"])
    first_dense = int(d.get("first_k_dense_replace") or 0)
    shared = int(d.get("n_shared_experts") or 0) * moe_intermediate
    scaling = float(d.get("routed_scaling_factor") or 1.0)
    groups, topk_groups = int(d.get("n_group") or 1), int(d.get("topk_group") or 1)
    if model_type == "deepseek_v2":
        method = d.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise TridentError(f"deepseek_v2: unsupported topk_method {method!r}; supported: greedy, "
                               "group_limited_greedy")
        grouped = method == "group_limited_greedy"
        router = RouterConfig(num_experts=num_experts, top_k=top_k, renormalize=False,
                              num_groups=groups if grouped else 1, topk_groups=topk_groups if grouped else 1,
                              routed_scaling_factor=scaling)
    else:
        router = RouterConfig(num_experts=num_experts, top_k=top_k, scoring="sigmoid",
                              renormalize=bool(d.get("norm_topk_prob")), num_groups=groups, topk_groups=topk_groups,
                              group_score="top2_sum", routed_scaling_factor=scaling, score_correction_bias=True)
    return MoeConfig(router=router, moe_intermediate_size=moe_intermediate,
                     sparse_layers=tuple(range(first_dense, num_layers)), shared_expert_intermediate_size=shared,
                     router_float32=True)
