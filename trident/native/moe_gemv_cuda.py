"""The CUDA batch-1 routed experts (``moe_gemv_cuda.cu``): one token through its k int8 or int4 experts in two
launches, gate|up with the activation, then down with the routing weights and the sum over k, multiplied as integers
(dp4a) after quantizing the activations to two int8 stages per block of 32 (one stage for int4 codes, as
trident/native/gemv_cuda.py does).

Built with ``nvcc`` on first use (trident/native/cuda_build.py). :func:`takes` says whether a call can run it;
trident/moe/experts_triton.py sends one-token quantized steps here and keeps its Triton kernels otherwise. The
reference is :class:`trident.moe.experts.TorchExperts`; the kernels' own rounding is emulated by
:func:`experts_reference` (float64 math on the two-stage activations), which tests/native/test_moe_gemv_cuda.py
bounds.
"""

from __future__ import annotations

import ctypes

import torch

from trident.native.cuda_build import cuda_unavailable_reason, load_cuda
from trident.native.gemv_cuda import (
    ACTIVATION_STAGES,
    ACTIVATIONS,
    BLOCK,
    DTYPES,
    REFERENCE_ACTIVATIONS,
    grid_size,
    quantize_activations_reference,
)
from trident.native.operands import aligned, groups_fit

LIBRARY = "tqmoe"
BLOCKS_PER_SM = 2
"""Grid blocks per multiprocessor (what stays resident at the kernels' register use)."""
MAX_TOP_K = 32


def library() -> ctypes.CDLL | None:
    lib = load_cuda(LIBRARY)
    if lib is not None and not getattr(lib, "_typed", False):
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.tq_moe_gate_up.argtypes = [i, i, p, p, p, p, p, i, i, i, i, i, i, i, p]
        lib.tq_moe_gate_up.restype = i
        lib.tq_moe_down.argtypes = [i, i, p, p, p, p, p, p, i, i, i, i, i, i, p]
        lib.tq_moe_down.restype = i
        for name in ("tq_moe_max_top_k", "tq_moe_down_rows_per_warp", "tq_moe_threads"):
            getattr(lib, name).restype = i
        lib._typed = True
    return lib


def why_unavailable() -> str | None:
    return cuda_unavailable_reason(LIBRARY)


def _bits_and_groups(codes: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """(8, 1) for int8 codes with a scale per row; (4, groups) for packed int4 codes with [E, N, groups] scales."""
    return (8, 1) if codes.dtype == torch.int8 else (4, scales.shape[-1])


def takes(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
          gate_up_scales: torch.Tensor | None, down_scales: torch.Tensor | None, activation: str) -> bool:
    """Whether :func:`experts` runs this step: one token of bfloat16 / float16 hidden on CUDA, int8 or int4 experts
    with float32 scales (int4 in groups of a power-of-two number of BLOCK-element blocks, or per channel), H and I
    multiples of BLOCK, k <= MAX_TOP_K, a known activation, everything contiguous and 16-byte aligned, and the
    library built. Shapes, dtypes and addresses only: the choice holds across CUDA-graph capture."""
    if gate_up_scales is None or down_scales is None:
        return False
    int4 = gate_up.dtype == torch.uint8
    num_experts, two_i, row = gate_up.shape
    hidden_size, inter = row * (2 if int4 else 1), two_i // 2
    if not (hidden.is_cuda and hidden.dim() == 2 and hidden.shape[0] == 1 and hidden.dtype in DTYPES
            and gate_up.dtype == down.dtype and gate_up.dtype in (torch.int8, torch.uint8)
            and gate_up_scales.dim() == down_scales.dim() == (3 if int4 else 2)
            and expert_ids.dtype == torch.int64
            and expert_ids.dim() == 2 and 1 <= expert_ids.shape[1] <= MAX_TOP_K and expert_ids.is_contiguous()
            and activation in ACTIVATIONS and hidden_size % BLOCK == 0 and inter % BLOCK == 0
            and hidden.shape[1] == hidden_size and gate_up_scales.dtype == down_scales.dtype == torch.float32
            and aligned(hidden, gate_up, down) and gate_up_scales.is_contiguous() and down_scales.is_contiguous()):
        return False
    if int4 and not (groups_fit(hidden_size, gate_up_scales.shape[2], BLOCK)
                     and groups_fit(inter, down_scales.shape[2], BLOCK)):
        return False
    return library() is not None


def gate_up_activation(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                       gate_up_scales: torch.Tensor, activation: str) -> torch.Tensor:
    """act [k, I] = act(gate_e x) * up_e x for the k experts of ``expert_ids`` [1, k], in hidden's dtype (the first
    launch of :func:`experts`)."""
    from trident.kernels.pdl import pdl_launch

    lib = library()
    top_k = expert_ids.shape[1]
    intermediate, hidden_size = gate_up.shape[1] // 2, hidden.shape[1]
    bits, groups = _bits_and_groups(gate_up, gate_up_scales)
    act = torch.empty((top_k, intermediate), dtype=hidden.dtype, device=hidden.device)
    grid = grid_size(top_k * intermediate, lib.tq_moe_threads() // 32, hidden.device, BLOCKS_PER_SM)
    err = lib.tq_moe_gate_up(DTYPES[hidden.dtype], bits, hidden.data_ptr(), expert_ids.data_ptr(),
                             gate_up.data_ptr(), gate_up_scales.data_ptr(), act.data_ptr(), top_k, intermediate,
                             hidden_size, ACTIVATIONS[activation], groups, grid, int(pdl_launch(hidden.device)),
                             torch.cuda.current_stream(hidden.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_moe_gate_up launch failed with CUDA error {err}")
    return act


def down_weighted_sum(act: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, down: torch.Tensor,
                      down_scales: torch.Tensor) -> torch.Tensor:
    """[1, H] = sum_j weights[0, j] down_e(act[j]) (the second launch of :func:`experts`)."""
    from trident.kernels.pdl import pdl_launch

    lib = library()
    top_k, intermediate = act.shape
    hidden_size = down.shape[1]
    y = torch.empty((1, hidden_size), dtype=act.dtype, device=act.device)
    row_groups = -(-hidden_size // lib.tq_moe_down_rows_per_warp())
    grid = grid_size(row_groups, lib.tq_moe_threads() // 32, act.device, BLOCKS_PER_SM)
    weights = weights.contiguous()
    bits, groups = _bits_and_groups(down, down_scales)
    err = lib.tq_moe_down(DTYPES[act.dtype], bits, act.data_ptr(), expert_ids.data_ptr(), weights.data_ptr(),
                          down.data_ptr(), down_scales.data_ptr(), y.data_ptr(), top_k, intermediate, hidden_size,
                          groups, grid, int(pdl_launch(act.device)), torch.cuda.current_stream(act.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_moe_down launch failed with CUDA error {err}")
    return y


def experts(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, activation: str, gate_up_scales: torch.Tensor,
            down_scales: torch.Tensor) -> torch.Tensor:
    """hidden [1, H] through its k int8 / int4 experts (weights float32 [1, k], expert_ids int64 [1, k]) -> [1, H]
    in hidden's dtype; the caller checked :func:`takes`."""
    act = gate_up_activation(hidden, expert_ids, gate_up, gate_up_scales, activation)
    return down_weighted_sum(act, weights, expert_ids, down, down_scales)


def gate_up_reference(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                      gate_up_scales: torch.Tensor, activation: str) -> torch.Tensor:
    """float64 act [k, I] as the first kernel computes it before its one rounding: the two-stage x (one stage for
    int4 codes) times each chosen expert's dequantized gate and up rows."""
    from trident.moe.quant import dequantize_experts

    x_hat = quantize_activations_reference(hidden.cpu(), _stages(gate_up)).double()[0]
    ids = expert_ids[0].cpu()
    w = dequantize_experts(gate_up[ids].cpu(), gate_up_scales[ids].cpu(), torch.float64)  # [k, 2I, H]
    gu = w @ x_hat
    gate, up = gu.chunk(2, dim=-1)
    return REFERENCE_ACTIVATIONS[activation](gate) * up


def down_reference(act: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, down: torch.Tensor,
                   down_scales: torch.Tensor) -> torch.Tensor:
    """float64 [H] as the second kernel computes it before its one rounding, from the kernel's own act [k, I]: the
    two-stage act row (one stage for int4 codes) times each chosen expert's dequantized down rows, weighted and
    summed."""
    from trident.moe.quant import dequantize_experts

    top_k, intermediate = act.shape
    a_hat = quantize_activations_reference(act.cpu().reshape(1, -1), _stages(down)).double().view(top_k, intermediate)
    ids = expert_ids[0].cpu()
    w = dequantize_experts(down[ids].cpu(), down_scales[ids].cpu(), torch.float64)  # [k, H, I]
    per_expert = torch.einsum("khi,ki->kh", w, a_hat)
    return (weights[0].cpu().double()[:, None] * per_expert).sum(0)


def _stages(codes: torch.Tensor) -> int:
    """Activation stages the kernels multiply these codes with (gemv_cuda.ACTIVATION_STAGES)."""
    return ACTIVATION_STAGES[4 if codes.dtype == torch.uint8 else 8]


def experts_reference(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor, activation: str, gate_up_scales: torch.Tensor,
                      down_scales: torch.Tensor) -> torch.Tensor:
    """The two kernels emulated on the CPU: :func:`gate_up_reference` rounded to hidden's dtype, then
    :func:`down_reference`, in float64 [H]."""
    act = gate_up_reference(hidden, expert_ids, gate_up, gate_up_scales, activation).to(hidden.dtype)
    return down_reference(act, weights, expert_ids, down, down_scales)
