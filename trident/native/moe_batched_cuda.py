"""The CUDA batched int4 routed experts (``moe_batched_cuda.cu``): T > 1 tokens through their k int4 experts, grouped
by expert so that each expert's weight rows are read once per step, multiplied as integers on the tensor cores
(8-bit mma: the int4 codes against activations quantized to one int8 stage per block of KBLOCK = 128, gemv_cuda.py's
rule for int4 codes with longer blocks: one mma chain shares one pair of scales). Five launches: the
routing alignment (trident/kernels/moe_align.py, Triton), the hidden rows' quantization, gate|up with the activation
and the intermediate's quantization, down with the routing weights into one row per pair, and the sum over k
(trident/kernels/moe_experts.py's sum_over_k, Triton).

trident/moe/experts_triton.py sends 2..MAX_TOKENS tokens with int4 experts here (``python -m
trident.kernels.bench_moe_experts --weights int8 int4`` times it beside the Triton int8 / int4 kernels: MAX_TOKENS).
Groups of a power-of-two multiple of 128 along K (or per channel) only: smaller groups go to the Triton kernels. At
decode sizes it reads the codes at ~3 TB/s (64 tokens: 104 us a Qwen3-30B-A3B layer against int8's 168), so int4
experts step faster than int8 ones; at prefill sizes, from a build with 32-row blocks (:func:`library_for`), each
block still re-reads its expert's rows and it runs at about 0.7 of int8's speed (8,192 tokens: 2.9 ms against 2.0),
three times the int4 Triton kernels'.

Built with ``nvcc`` on first use (trident/native/cuda_build.py). :func:`takes` says whether a call can run it. The
reference is :class:`trident.moe.experts.TorchExperts`; the kernels' own rounding is emulated by
:func:`experts_reference` (float64 math on the one-stage activations in blocks of 128, the intermediate rounded to
the activation dtype and quantized again), which tests/native/test_moe_batched_cuda.py bounds.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from trident.native.cuda_build import cuda_unavailable_reason, load_cuda, load_cuda_variant
from trident.native.gemv_cuda import ACTIVATIONS, DTYPES, REFERENCE_ACTIVATIONS, quantize_activations_reference
from trident.native.operands import aligned, groups_fit

LIBRARY = "tqmoeb"
BLOCK_M = 8
"""Sorted rows per row block of the routing layout (align_routing's block_m; the kernels' MOEB_BLOCK_M, checked
against the built library when it loads): one mma column tile. At 64 tokens x top-8 of 128 experts an expert has 4
pairs on average, so 8 rows take nearly every expert's pairs in one block (its weights read once). Measured on an
H200 (bench_moe_experts --batched-variants MOEB_BLOCK_M=16 / 32): 16 rows 104 -> 116 us at 64 tokens, 321 -> 262
at 512; 32 rows 4.2 -> 2.9 ms at 8,192 tokens but 175 us at 64: 8 up to PREFILL_TOKENS, PREFILL_BLOCK_M beyond."""
PREFILL_TOKENS = 512
"""From this many tokens the kernels run from a build with PREFILL_BLOCK_M-row blocks (where its shared memory fits:
:func:`library_for`): measured on an H200 (one Qwen3-30B-A3B layer, int4 g128), 32-row blocks against 8: 278 / 321
us at 512 tokens, 820 / 1,100 at 2,048, 2,858 / 4,177 at 8,192; below, 8-row blocks (104 / 175 us at 64)."""
PREFILL_BLOCK_M = 32
"""The prefill build's rows per block (four mma column tiles: each weight row read once per 32 pairs). 64 rows (a
build with a 64-bit row mask, one block a multiprocessor at 255 registers) measured no faster on an H200: 3,048 us
at 8,192 tokens (2,882 with 256 intermediate rows a block) and 905 at 2,048 against 2,874 and 819."""
MIN_TOKENS = 2
"""One token goes to trident/native/moe_gemv_cuda.py's kernels."""
MAX_TOKENS = 16384
"""The most tokens :func:`takes` accepts (no kernel limit behind it; twice the engine's 8,192-token CUDA steps).
Measured on an H200 (bench_moe_experts, one Qwen3-30B-A3B layer, int4 g128, 2026-11-30): 59 / 104 / 129 / 191 / 321
/ 1,100 / 4,177 us at 8 / 64 / 128 / 256 / 512 / 2,048 / 8,192 tokens, against 155 / 347 / 350 / 493 / 526 / 2,948 /
8,325 for the int4 Triton kernels (int8 Triton: 81 / 168 / 172 / 235 / 293 / 681 / 2,012): faster than the int4
Triton kernels at every size."""
MAX_TOP_K = 32
"""The most experts a token (the kernels have no limit of their own; moe_gemv_cuda's bound, kept alike)."""
MAX_HIDDEN = 16384
"""The largest H and I: a block stages BLOCK_M quantized rows of them in shared memory (~1.06 bytes an element)."""
KBLOCK = 128
"""Elements per activation scale and per kernel step along K (the kernels' KBLOCK, checked when the library loads):
H, I and the weight groups are multiples of it."""


def library() -> ctypes.CDLL | None:
    """The default build (BLOCK_M-row blocks; built on first use), or None where it cannot be built."""
    return _checked(load_cuda(LIBRARY), BLOCK_M)


def prefill_library() -> ctypes.CDLL | None:
    """The build with PREFILL_BLOCK_M-row blocks (built on first use, like :func:`library`)."""
    return _checked(load_cuda_variant(LIBRARY, {"MOEB_BLOCK_M": PREFILL_BLOCK_M})[0], PREFILL_BLOCK_M)


def _checked(lib: ctypes.CDLL | None, block_m: int) -> ctypes.CDLL | None:
    """``lib`` typed, once its (block_m, kblock) are found to be what the Python side expects."""
    if lib is not None:
        typed(lib)
        built = (lib.tq_moeb_block_m(), lib.tq_moeb_kblock())
        if built != (block_m, KBLOCK):
            raise RuntimeError(f"{LIBRARY}: the build has (block_m, kblock) {built}, the Python side expects "
                               f"{(block_m, KBLOCK)}")
    return lib


def library_for(num_tokens: int, hidden_size: int, inter: int) -> ctypes.CDLL | None:
    """The build a step of ``num_tokens`` runs: from PREFILL_TOKENS the prefill build where its blocks fit in the
    GPU's shared memory, else the default one (None where it cannot be built)."""
    if num_tokens >= PREFILL_TOKENS:
        lib = prefill_library()
        if lib is not None and lib.tq_moeb_block_shared_bytes(hidden_size, inter) <= _shared_memory_per_block():
            return lib
    return library()


@functools.cache
def _shared_memory_per_block() -> int:
    """The current GPU's shared memory a block may opt into (H100 / H200: 227 KB, A100: 163 KB)."""
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(properties, "shared_memory_per_block_optin", 163 * 1024))


def variant(defines: dict[str, int]) -> tuple[ctypes.CDLL | None, str | None]:
    """The library built with other compile-time tiles (``MOEB_BLOCK_M``, ``GU_ROWS``, ``DOWN_ROWS``, ``DEPTH``,
    ``MIN_BLOCKS``: moe_batched_cuda.cu's ``#ifndef`` constants), for bench_moe_experts' sweep:
    :func:`experts_stages` takes it as ``lib``; (None, why) where it cannot be built."""
    lib, why = load_cuda_variant(LIBRARY, defines)
    return (typed(lib), None) if lib is not None else (None, why)


def typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its entry points' argument and result types set (once)."""
    if not getattr(lib, "_typed", False):
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.tq_moeb_quantize.argtypes = [i, p, p, i, i, i, p]
        lib.tq_moeb_quantize.restype = i
        lib.tq_moeb_gate_up.argtypes = [i, p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, p]
        lib.tq_moeb_gate_up.restype = i
        lib.tq_moeb_down.argtypes = [i, p, p, p, p, p, p, p, p, i, i, i, i, i, p]
        lib.tq_moeb_down.restype = i
        for name in ("tq_moeb_block_m", "tq_moeb_threads", "tq_moeb_kblock"):
            getattr(lib, name).restype = i
        lib.tq_moeb_row_bytes.argtypes = [i]
        lib.tq_moeb_row_bytes.restype = ll
        lib.tq_moeb_block_shared_bytes.argtypes = [i, i]
        lib.tq_moeb_block_shared_bytes.restype = ll
        lib._typed = True
    return lib


def why_unavailable() -> str | None:
    """Why the kernels cannot run (None: both builds are ready; asking builds them, so that an engine's start-up
    and not its first prefill waits for nvcc)."""
    why = cuda_unavailable_reason(LIBRARY)
    if why is None:
        prefill_library()
    return why


def takes(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
          gate_up_scales: torch.Tensor | None, down_scales: torch.Tensor | None, activation: str) -> bool:
    """Whether :func:`experts` runs this step: MIN_TOKENS..MAX_TOKENS tokens of bfloat16 / float16 hidden on CUDA,
    int4 experts (uint8 codes) with float32 scales [E, N, groups] in groups of a power-of-two multiple of KBLOCK
    elements (or per channel), H and I multiples of KBLOCK up to MAX_HIDDEN, int64 expert ids [T, k] with
    k <= MAX_TOP_K, a known activation, everything contiguous and 16-byte aligned, and the library built (from
    PREFILL_TOKENS tokens the prefill build where it fits, else the default one: :func:`library_for`). Shapes,
    dtypes and addresses only: the choice holds across CUDA-graph capture."""
    if gate_up_scales is None or down_scales is None:
        return False
    if not (gate_up.dtype == down.dtype == torch.uint8 and gate_up.dim() == down.dim() == 3
            and gate_up_scales.dim() == down_scales.dim() == 3):
        return False
    num_experts, two_i, half_h = gate_up.shape
    hidden_size, inter = 2 * half_h, two_i // 2
    if not (hidden.is_cuda and hidden.dim() == 2 and MIN_TOKENS <= hidden.shape[0] <= MAX_TOKENS
            and hidden.dtype in DTYPES and hidden.shape[1] == hidden_size
            and down.shape == (num_experts, hidden_size, inter // 2)
            and 0 < hidden_size <= MAX_HIDDEN and 0 < inter <= MAX_HIDDEN
            and hidden_size % KBLOCK == 0 and inter % KBLOCK == 0
            and expert_ids.dtype == torch.int64 and expert_ids.dim() == 2 and expert_ids.is_contiguous()
            and expert_ids.shape[0] == hidden.shape[0] and 1 <= expert_ids.shape[1] <= MAX_TOP_K
            and activation in ACTIVATIONS
            and gate_up_scales.dtype == down_scales.dtype == torch.float32
            and gate_up_scales.shape[:2] == (num_experts, 2 * inter) and down_scales.shape[:2] == (num_experts,
                                                                                                  hidden_size)
            and gate_up_scales.is_contiguous() and down_scales.is_contiguous()
            and aligned(hidden, gate_up, down)):
        return False
    if not (groups_fit(hidden_size, gate_up_scales.shape[2], KBLOCK)
            and groups_fit(inter, down_scales.shape[2], KBLOCK)):
        return False
    return library_for(hidden.shape[0], hidden_size, inter) is not None


class Stages(NamedTuple):
    """What :func:`experts_stages` computed (the tests look at every stage)."""

    out: torch.Tensor
    """[T, H] in hidden's dtype: the sum over k of out_pairs."""
    out_pairs: torch.Tensor
    """[T k, H] in hidden's dtype: pair p = t k + slot's expert output times its routing weight, rounded once."""
    act_rows: torch.Tensor | None
    """[rows, I] in hidden's dtype: act(gate) * up at each pair's sorted row (padding rows unwritten), when asked
    for."""
    sorted_pairs: torch.Tensor
    """int32 [rows]: the routing layout's pair of each sorted row (-1: padding)."""


def _launch(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what} launch failed with CUDA error {err}")


def experts_stages(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, activation: str, gate_up_scales: torch.Tensor, down_scales: torch.Tensor,
                   keep_act: bool = False, lib: ctypes.CDLL | None = None) -> Stages:
    """:func:`experts` with its intermediate results (``keep_act``: the gate|up kernel also writes act in hidden's
    dtype); the caller checked :func:`takes`. ``lib``: a :func:`variant` build instead of the library."""
    from trident.kernels.moe_align import align_routing
    from trident.kernels.moe_experts import sum_over_k
    from trident.kernels.pdl import pdl_launch

    lib = lib or library_for(hidden.shape[0], hidden.shape[1], gate_up.shape[1] // 2)
    block_m = lib.tq_moeb_block_m()
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    inter, top_k = two_i // 2, expert_ids.shape[1]
    device, dtype = hidden.device, DTYPES[hidden.dtype]
    pdl = int(pdl_launch(device))
    stream = torch.cuda.current_stream(device).cuda_stream
    weights = weights.contiguous()  # before the first launch: the five follow each other with nothing between
    aligned = align_routing(expert_ids, num_experts, block_m)
    rows = aligned.sorted_pairs.numel()
    layout = (aligned.sorted_pairs.data_ptr(), aligned.block_experts.data_ptr(), aligned.num_blocks.data_ptr())

    xq = torch.empty((num_tokens, lib.tq_moeb_row_bytes(hidden_size)), dtype=torch.uint8, device=device)
    _launch(lib.tq_moeb_quantize(dtype, hidden.data_ptr(), xq.data_ptr(), num_tokens, hidden_size, pdl, stream),
            "tq_moeb_quantize")
    aq = torch.empty((rows, lib.tq_moeb_row_bytes(inter)), dtype=torch.uint8, device=device)
    act = torch.empty((rows, inter), dtype=hidden.dtype, device=device) if keep_act else None
    _launch(lib.tq_moeb_gate_up(dtype, xq.data_ptr(), *layout, gate_up.data_ptr(), gate_up_scales.data_ptr(),
                                aq.data_ptr(), None if act is None else act.data_ptr(), rows // block_m, top_k, inter,
                                hidden_size, ACTIVATIONS[activation], gate_up_scales.shape[2], pdl, stream),
            "tq_moeb_gate_up")
    out_pairs = torch.empty((num_tokens * top_k, hidden_size), dtype=hidden.dtype, device=device)
    _launch(lib.tq_moeb_down(dtype, aq.data_ptr(), *layout, weights.data_ptr(), down.data_ptr(),
                             down_scales.data_ptr(), out_pairs.data_ptr(), rows // block_m, inter, hidden_size,
                             down_scales.shape[2], pdl, stream), "tq_moeb_down")
    out = out_pairs if top_k == 1 else sum_over_k(out_pairs, num_tokens, top_k, hidden_size)
    return Stages(out, out_pairs, act, aligned.sorted_pairs)


def experts(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, activation: str, gate_up_scales: torch.Tensor,
            down_scales: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] through its k int4 experts each (weights float32 [T, k], expert_ids int64 [T, k]) -> [T, H] in
    hidden's dtype (the argument order of moe_gemv_cuda.experts); the caller checked :func:`takes`."""
    return experts_stages(hidden, weights, expert_ids, gate_up, down, activation, gate_up_scales, down_scales).out


def _by_expert(expert_ids: torch.Tensor):
    """(expert, the pairs p = t k + slot routed to it) for each expert in use."""
    flat = expert_ids.reshape(-1)
    for e in flat.unique().tolist():
        yield e, (flat == e).nonzero().squeeze(1)


def gate_up_reference(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                      gate_up_scales: torch.Tensor, activation: str) -> torch.Tensor:
    """float64 act [T k, I] (row p = t k + slot) as the gate|up kernel computes it before its one rounding: the
    one-stage quantized hidden rows (blocks of KBLOCK) times each pair's dequantized gate and up rows. Computed where
    the tensors lie."""
    from trident.moe.quant import dequantize_experts

    top_k = expert_ids.shape[1]
    x_hat = quantize_activations_reference(hidden, 1, KBLOCK).double()
    inter = gate_up.shape[1] // 2
    act = torch.zeros((expert_ids.numel(), inter), dtype=torch.float64, device=hidden.device)
    for e, pairs in _by_expert(expert_ids):
        w = dequantize_experts(gate_up[e], gate_up_scales[e], torch.float64)  # [2I, H]
        gate, up = (x_hat[pairs // top_k] @ w.T).chunk(2, dim=-1)
        act[pairs] = REFERENCE_ACTIVATIONS[activation](gate) * up
    return act


def down_reference(act: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, down: torch.Tensor,
                   down_scales: torch.Tensor) -> torch.Tensor:
    """float64 [T k, H] as the down kernel computes each pair's row before its one rounding, from act [T k, I] in
    the activation dtype (the kernel's own, or :func:`gate_up_reference` rounded): act quantized again (one stage,
    blocks of KBLOCK)
    times the pair's dequantized down rows, times its routing weight."""
    from trident.moe.quant import dequantize_experts

    a_hat = quantize_activations_reference(act, 1, KBLOCK).double()
    w_flat = weights.reshape(-1).double()
    out = torch.zeros((act.shape[0], down.shape[1]), dtype=torch.float64, device=act.device)
    for e, pairs in _by_expert(expert_ids):
        w = dequantize_experts(down[e], down_scales[e], torch.float64)  # [H, I]
        out[pairs] = (a_hat[pairs] @ w.T) * w_flat[pairs, None]
    return out


def experts_reference(hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor, activation: str, gate_up_scales: torch.Tensor,
                      down_scales: torch.Tensor) -> torch.Tensor:
    """The kernels emulated: :func:`gate_up_reference` rounded to hidden's dtype, :func:`down_reference` rounded to
    it (out_pairs), summed over k in float64 [T, H] (the kernel sums in float32 in slot order, then rounds)."""
    act = gate_up_reference(hidden, expert_ids, gate_up, gate_up_scales, activation).to(hidden.dtype)
    pairs = down_reference(act, weights, expert_ids, down, down_scales).to(hidden.dtype)
    num_tokens, top_k = expert_ids.shape
    return pairs.double().view(num_tokens, top_k, -1).sum(1)
