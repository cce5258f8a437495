"""The CUDA batch-1 router (``moe_route_cuda.cu``, in the ``tqmoe`` library): one token's router logits, scores,
top-k choice, weights and load statistics in one launch, where a batch-1 step took two (the router's matrix-vector
product, then trident/kernels/moe_route.py's kernel).

:class:`trident.moe.router.Router` sends one-token CUDA steps here when :func:`takes` holds and keeps the other
paths otherwise. Its reference is the same as the Triton kernel's: the logits as :meth:`Router.logits` computes
them, then :func:`trident.moe.router.route` and :meth:`trident.moe.stats.MoeLoadStats.record`
(tests/native/test_moe_route_cuda.py).
"""

from __future__ import annotations

import ctypes

import torch

from trident.moe.config import RENORMALIZE_EPS_SIGMOID, RouterConfig
from trident.native.cuda_build import load_cuda
from trident.native.gemv_cuda import DTYPES
from trident.native.moe_gemv_cuda import LIBRARY

MAX_EXPERTS = 256
MAX_TOP_K = 32


def library() -> ctypes.CDLL | None:
    lib = load_cuda(LIBRARY)
    if lib is not None and not getattr(lib, "_route_typed", False):
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.tq_moe_route.argtypes = [i, p, p, p, p, p, p, p, p, p, p, p, i, i, i, i, i, f, f, i, i, p]
        lib.tq_moe_route.restype = i
        lib._route_typed = True
    return lib


def takes(hidden: torch.Tensor, weight: torch.Tensor, config: RouterConfig,
          correction_bias: torch.Tensor | None) -> bool:
    """Whether :func:`route` runs this routing: one token of bfloat16 / float16 on CUDA, a gate weight [E, H] of
    the same dtype, E <= MAX_EXPERTS, k <= MAX_TOP_K, H a multiple of 8, no group-limited routing, a float32 bias
    or none, everything contiguous and 16-byte aligned, and the library built. Shapes, dtypes and addresses only."""
    if not (hidden.is_cuda and hidden.dim() == 2 and hidden.shape[0] == 1 and hidden.dtype in DTYPES
            and weight.dtype == hidden.dtype and not config.grouped and config.num_experts <= MAX_EXPERTS
            and config.top_k <= MAX_TOP_K and hidden.shape[1] % 8 == 0
            and (correction_bias is None or (correction_bias.dtype == torch.float32
                                             and correction_bias.is_contiguous()))
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (hidden, weight))):
        return False
    return library() is not None


def new_ticket(device: torch.device) -> torch.Tensor:
    """The counter a router's launches share (zero between calls; see moe_route_cuda.cu)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def route(hidden: torch.Tensor, weight: torch.Tensor, config: RouterConfig, correction_bias: torch.Tensor | None,
          round_logits: bool, ticket: torch.Tensor, counts: torch.Tensor | None = None,
          prob_sums: torch.Tensor | None = None,
          row_mask: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights float32 [1, k], expert ids int64 [1, k], scores float32 [1, E], logits float32 [1, E]) of hidden
    [1, H] through the gate weight [E, H]; ``round_logits`` rounds each logit to hidden's dtype (F.linear in that
    dtype), else float32. With ``counts`` / ``prob_sums`` / ``row_mask`` (MoeLoadStats.accumulators) the
    statistics are added too. The caller checked :func:`takes`; ``ticket`` comes from :func:`new_ticket` on this
    device."""
    from trident.kernels.pdl import pdl_launch

    lib = library()
    num_experts, hidden_size = weight.shape
    top_k, device = config.top_k, hidden.device
    logits = torch.empty((1, num_experts), dtype=torch.float32, device=device)
    scores = torch.empty((1, num_experts), dtype=torch.float32, device=device)
    weights = torch.empty((1, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((1, top_k), dtype=torch.int64, device=device)
    stats = counts is not None
    sigmoid = config.scoring == "sigmoid"

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    err = lib.tq_moe_route(DTYPES[hidden.dtype], hidden.data_ptr(), weight.data_ptr(), ptr(correction_bias),
                           logits.data_ptr(), scores.data_ptr(), weights.data_ptr(), ids.data_ptr(),
                           ptr(counts) if stats else None, ptr(prob_sums) if stats else None,
                           ptr(row_mask) if stats else None, ticket.data_ptr(), num_experts, hidden_size, top_k,
                           int(sigmoid), int(config.renormalize), RENORMALIZE_EPS_SIGMOID if sigmoid else 0.0,
                           float(config.routed_scaling_factor), int(round_logits), int(pdl_launch(device)),
                           torch.cuda.current_stream(device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_moe_route launch failed with CUDA error {err}")
    return weights, ids, scores, logits
