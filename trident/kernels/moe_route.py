"""The router's arithmetic after its logits, in one launch: scores, top-k choice, weights, and the load
statistics' accumulation. Its torch reference is :func:`trident.moe.router.route` followed by
:meth:`trident.moe.stats.MoeLoadStats.record` (what runs on the CPU and for group-limited routing).

One program per token reads the token's logits [E] (widened to float32) and computes, as ``route`` does: the
scores (softmax over the experts, or a sigmoid per expert), the choice scores (plus the score-correction bias when
there is one), the top_k experts by choice score, their weights (scores, divided by their sum when renormalising,
plus 1e-20 with sigmoid scores, times the routed scaling factor). The k choices are made by k rounds of "the
largest remaining choice score" (ties to the lower expert id; torch.topk leaves ties unspecified), so the k
experts come out in descending order of choice score.

With statistics, the same program adds the token's k choices to its layer's per-expert counts and its
probabilities (sigmoid scores normalised to sum 1) to the layer's sums, by atomic adds, when the token is a real
one (row mask 1; padding rows of a captured batch add nothing). Integer counts are exact in any order; the float32
probability sums may differ in their last bits from run to run (the order of atomic adds), which statistics can
afford. In the torch path a decode step takes about a dozen launches here (softmax, top-k and its sort, the
renormalisation, an index_add and a matrix-vector product for the statistics); on an H200 they cost ~20 us per
layer at batch 1, this one launch a few.

Launches depend on shapes only and never synchronise with the host (CUDA graphs capture them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.kernels.pdl import pdl_launch, wait_for_previous_grid
from trident.moe.config import RENORMALIZE_EPS_SIGMOID, RouterConfig


def supports(config: RouterConfig) -> bool:
    """Whether the kernel implements this router (everything but group-limited routing)."""
    return not config.grouped


def fused_route(logits: torch.Tensor, config: RouterConfig, correction_bias: torch.Tensor | None = None,
                counts: torch.Tensor | None = None, prob_sums: torch.Tensor | None = None,
                row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int64 [T, k], scores float32 [T, E]) for logits [T, E] (rows
    contiguous); with ``counts`` (int64 [E]), ``prob_sums`` (float32 [E]) and ``row_mask`` (float32 [T], 1 for
    real tokens) the statistics of this layer are accumulated too (see the module docstring)."""
    assert supports(config), "group-limited routing runs the torch path"
    assert logits.dim() == 2 and logits.stride(1) == 1
    num_tokens, num_experts = logits.shape
    assert num_experts == config.num_experts
    top_k = config.top_k
    device = logits.device
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    expert_ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
    scores = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=device)
    if num_tokens == 0:
        return weights, expert_ids, scores
    stats = counts is not None
    assert not stats or (prob_sums is not None and row_mask is not None and counts.is_contiguous()
                         and prob_sums.is_contiguous() and row_mask.numel() == num_tokens)
    has_bias = correction_bias is not None
    pdl = pdl_launch(device)
    _route_kernel[(num_tokens,)](
        logits, correction_bias if has_bias else logits, weights, expert_ids, scores,
        counts if stats else expert_ids, prob_sums if stats else weights, row_mask if stats else weights,
        num_experts, logits.stride(0), float(config.routed_scaling_factor),
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), EXPERTS_PAD=triton.next_power_of_2(num_experts),
        SIGMOID=config.scoring == "sigmoid",
        HAS_BIAS=has_bias, RENORMALIZE=config.renormalize,
        EPS=RENORMALIZE_EPS_SIGMOID if config.scoring == "sigmoid" else 0.0, STATS=stats, USE_PDL=pdl,
        num_warps=1 if num_experts <= 128 else 4, launch_pdl=pdl,
    )
    return weights, expert_ids, scores


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, scores_ptr, counts_ptr, prob_sums_ptr, row_mask_ptr,
                  num_experts, stride_logits, scaling, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
                  EXPERTS_PAD: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, EPS: tl.constexpr,
                  STATS: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, EXPERTS_PAD)
    in_range = experts < num_experts
    x = tl.load(logits_ptr + token * stride_logits + experts, mask=in_range, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
        scores = tl.where(in_range, scores, 0.0)
    else:
        e = tl.exp(x - tl.max(x, 0))
        scores = e / tl.sum(e, 0)
    tl.store(scores_ptr + token * num_experts + experts, scores, mask=in_range)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts, mask=in_range, other=0.0).to(tl.float32)
    choice = tl.where(in_range, choice, float("-inf"))
    slots = tl.arange(0, TOP_K_PAD)  # past TOP_K: id 0, score 0, never stored or counted
    in_k = slots < TOP_K
    chosen_ids = tl.zeros((TOP_K_PAD,), dtype=tl.int32)
    chosen_scores = tl.zeros((TOP_K_PAD,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, 0)
        pick = tl.min(tl.where(choice == best, experts, EXPERTS_PAD), 0)  # the lowest id among equal maxima
        score = tl.sum(tl.where(experts == pick, scores, 0.0), 0)
        chosen_ids = tl.where(slots == j, pick, chosen_ids)
        chosen_scores = tl.where(slots == j, score, chosen_scores)
        choice = tl.where(experts == pick, float("-inf"), choice)
    w = chosen_scores
    if RENORMALIZE:
        w = w / (tl.sum(w, 0) + EPS)
    w = w * scaling
    tl.store(weights_ptr + token * TOP_K + slots, w, mask=in_k)
    tl.store(ids_ptr + token * TOP_K + slots, chosen_ids.to(tl.int64), mask=in_k)
    if STATS:
        real = tl.load(row_mask_ptr + token) > 0
        if real:
            tl.atomic_add(counts_ptr + chosen_ids, tl.full((TOP_K_PAD,), 1, tl.int64), mask=in_k)
            probs = scores
            if SIGMOID:
                probs = scores / tl.sum(scores, 0)
            tl.atomic_add(prob_sums_ptr + experts, probs, mask=in_range)
