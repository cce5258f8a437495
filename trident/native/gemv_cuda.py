"""The CUDA batch-1 weight-only matmul (``gemv_cuda.cu``): y = x W^T (+ b) for one row of 16-bit activations and
int4 / int8 affine codes, multiplied as integers (dp4a) after quantizing x per block of 32 to two int8 stages
(int8 codes) or one (int4 codes: ACTIVATION_STAGES).

Built with ``nvcc`` for the GPU it runs on, on first use (trident/native/cuda_build.py); :func:`takes` says
whether a call can run it, else callers keep the Triton kernel (trident/kernels/quant_matmul.py). Its torch
reference is :func:`trident.quant.affine.affine_matmul_reference`; the two differ by the activations' rounding
(emulated exactly by :func:`quantize_activations_reference`), which tests/native/test_gemv_cuda.py bounds.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from trident.native.cuda_build import cuda_unavailable_reason, load_cuda
from trident.quant.affine import AffineWeight

LIBRARY = "tqgemv"
BLOCK = 32
"""Activations are quantized per block of this many elements (K and group sizes must be multiples of it)."""
BLOCKS_PER_SM = 1
"""Blocks of the grid per multiprocessor: one of 16 warps (gemv_cuda.cu's GEMV_WARPS), so that each multiprocessor
quantizes x once; on an H200 8B int8 layers' products took 68.7 us against 72.2 with two blocks of 8 warps (2, 3
and 4 blocks of 8 measured within 2% of each other)."""
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
ACTIVATION_STAGES = {8: 2, 4: 1}
"""The int8 stages of x multiplied with int8 / int4 codes (dp4a_common.cuh's stages_of; checked against the built
library when it loads)."""
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
"""The gated MLP activations the CUDA kernels compute (dp4a_common.cuh's ACT_*), by Hugging Face ``hidden_act``."""
REFERENCE_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu_pytorch_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
}
"""The same activations in torch (any dtype: the kernels' references compute them in float64)."""


def library() -> ctypes.CDLL | None:
    lib = load_cuda(LIBRARY)
    if lib is not None and not getattr(lib, "_typed", False):
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.tq_gemv.argtypes = [i, i, i, p, p, p, p, i, p, p, i, i, i, i, i, p]
        lib.tq_gemv.restype = i
        lib.tq_gemv_normed.argtypes = [i, i, i, p, p, p, ctypes.c_float, p, p, p, p, i, p, p, i, i, i, i, i, i, p]
        lib.tq_gemv_normed.restype = i
        lib.tq_gemv_rows_for.argtypes = [i, i, i, i]
        lib.tq_gemv_rows_for.restype = i
        lib.tq_gemv_threads.restype = i
        lib.tq_gemv_norm_max_k.restype = i
        lib.tq_gemv_stages.argtypes = [i]
        lib.tq_gemv_stages.restype = i
        built = {bits: lib.tq_gemv_stages(bits) for bits in ACTIVATION_STAGES}
        if built != ACTIVATION_STAGES:
            raise RuntimeError(f"{LIBRARY}: the library multiplies {built} activation stages per code width, "
                               f"the Python side expects {ACTIVATION_STAGES}")
        lib._typed = True
    return lib


def why_unavailable() -> str | None:
    return cuda_unavailable_reason(LIBRARY)


@functools.cache
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (the CUDA kernels size their grids by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def grid_size(items: int, warps_per_block: int, device: torch.device, blocks_per_sm: int) -> int:
    """Blocks for ``items`` warp work items (row groups, pairs): enough for one item per warp, at most what stays
    resident (``blocks_per_sm`` per multiprocessor; warps then take items grid-stride)."""
    return max(1, min(-(-items // warps_per_block), blocks_per_sm * sm_count(device_index(device))))


def takes(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None) -> bool:
    """Whether :func:`gemv` runs this product: one row of bfloat16 / float16 x on CUDA, contiguous and 16-byte
    aligned, K and the group size multiples of BLOCK (groups of a power-of-two number of blocks, or one group per
    row: the kernel finds a chunk's scale by a shift), float32 scales (and offsets), a bias of x's dtype or none,
    and the library built. Shapes, dtypes and addresses only: the choice holds across CUDA-graph capture."""
    k = w.in_features
    blocks_per_group = w.group_size // BLOCK
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in DTYPES and x.is_contiguous()
            and x.data_ptr() % 16 == 0 and k % BLOCK == 0 and w.group_size % BLOCK == 0
            and (w.scales.shape[1] == 1 or blocks_per_group & (blocks_per_group - 1) == 0)
            and w.codes.is_contiguous() and w.codes.data_ptr() % 16 == 0
            and w.scales.dtype == torch.float32 and w.scales.is_contiguous()
            and (w.offsets is None or (w.offsets.dtype == torch.float32 and w.offsets.is_contiguous()))
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))):
        return False
    return library() is not None


@functools.cache
def launch_shape(bits: int, n: int, k: int, index: int, gated: bool = False) -> tuple[int, int]:
    """(rows a warp multiplies at a time, grid blocks) of an n x k product on CUDA device ``index`` (gated: n
    (gate, up) row pairs, two rows a warp). Rows: 2, or 1 where the busiest of the resident warps then walks fewer
    pipeline steps (gemv_cuda.cu's tq_gemv_rows_for); the grid: one row group per warp, at most what stays
    resident. Cached: a model's shapes come back every step."""
    lib = library()
    warps_per_block = lib.tq_gemv_threads() // 32
    resident_blocks = BLOCKS_PER_SM * sm_count(index)
    rows = 2 if gated else lib.tq_gemv_rows_for(bits, n, k, resident_blocks * warps_per_block)
    row_groups = n if gated else -(-n // rows)
    return rows, max(1, min(-(-row_groups // warps_per_block), resident_blocks))


def _offsets(w: AffineWeight) -> tuple[int | None, int]:
    """The kernel's (offsets pointer, zero point): a zero point replaces the offsets (never read then)."""
    if w.zero_point:
        return None, w.zero_point
    return (w.offsets.data_ptr() if w.offsets is not None else None), 0


def gemv(x: torch.Tensor, w: AffineWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] -> x W^T (+ b) [1, N] in x's dtype (see the module docstring); the caller checked :func:`takes`."""
    lib = library()
    n, k = w.out_features, w.in_features
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    rows, grid = launch_shape(w.bits, n, k, device_index(x.device))
    from trident.kernels.pdl import pdl_launch

    err = lib.tq_gemv(DTYPES[x.dtype], w.bits, rows, x.data_ptr(), w.codes.data_ptr(), w.scales.data_ptr(),
                      *_offsets(w), bias.data_ptr() if bias is not None else None, y.data_ptr(), n, k,
                      w.group_size, grid, int(pdl_launch(x.device)), torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_gemv launch failed with CUDA error {err}")
    return y


def takes_normed(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, w: AffineWeight,
                 bias: torch.Tensor | None, activation: str | None = None) -> bool:
    """Whether :func:`gemv_normed` runs this product: :func:`takes`, and the norm's residual (or none) and weight
    of x's dtype and shape [1, K] / [K], contiguous and 16-byte aligned, K within what a block normalises; with an
    activation, one of ACTIVATIONS and an even number of rows (gate, then up)."""
    if not takes(x, w, bias) or (activation is not None and (activation not in ACTIVATIONS
                                                             or w.out_features % 2 != 0)):
        return False
    k = w.in_features
    return (k <= library().tq_gemv_norm_max_k() and norm_weight.dtype == x.dtype and norm_weight.numel() == k
            and norm_weight.is_contiguous() and norm_weight.data_ptr() % 16 == 0
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                      and residual.is_contiguous() and residual.data_ptr() % 16 == 0)))


def gemv_normed(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                w: AffineWeight, bias: torch.Tensor | None = None,
                activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x + residual) for y = h W^T (+ b), h = RMSNorm(x + residual) * norm_weight: a decoder layer's fused
    add + RMSNorm (Llama's form, trident/kernels/rms_norm.py) and the product after it in one launch; residual
    None: the norm of x, and x is the stream. With an activation, W is a fused gate|up projection and y [1, N / 2]
    is act(gate) * up, from the two float32 sums, rounded once (trident/kernels/activation.py's contract without
    the rounding of gate and up). The caller checked :func:`takes_normed`."""
    lib = library()
    n, k = w.out_features, w.in_features
    if activation is not None:
        n //= 2
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    rows, grid = launch_shape(w.bits, n, k, device_index(x.device), activation is not None)
    from trident.kernels.pdl import pdl_launch

    err = lib.tq_gemv_normed(DTYPES[x.dtype], w.bits, rows, x.data_ptr(),
                             None if residual is None else residual.data_ptr(), norm_weight.data_ptr(), eps,
                             new_residual.data_ptr(), w.codes.data_ptr(),
                             w.scales.data_ptr(), *_offsets(w), bias.data_ptr() if bias is not None else None,
                             y.data_ptr(), n, k, w.group_size, -1 if activation is None else ACTIVATIONS[activation],
                             grid, int(pdl_launch(x.device)), torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"tq_gemv_normed launch failed with CUDA error {err}")
    return y, new_residual


def quantize_activations_reference(x: torch.Tensor, stages: int = 2, block: int = BLOCK) -> torch.Tensor:
    """x [..., K] (K a multiple of ``block``) as the kernel sees it: per block of 32 (or ``block``: the batched
    MoE kernels' 128), s1 q1 + s2 q2 (``stages`` 2) or s1 q1 alone (1) in float32 with the kernel's roundings
    (s = max / 127, q = rint(x * (127 / max)) clamped to +-127, remainder x - s1 q1)."""
    v = x.float().reshape(*x.shape[:-1], -1, block)

    def stage(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = t.abs().amax(dim=-1, keepdim=True)
        # 127 / m divided as the kernel divides (correctly rounded): torch's ``127.0 / m`` is m.reciprocal() * 127,
        # one ulp off in a quarter of the blocks, which turns exact ties of bfloat16 activations the other way
        inv = torch.where(m > 0, torch.full_like(m, 127.0) / m, torch.zeros_like(m))
        q = torch.round(t * inv).clamp_(-127, 127)
        return m / 127.0, q

    s1, q1 = stage(v)
    if stages == 1:
        return (s1 * q1).reshape(x.shape)
    r = v - s1 * q1
    s2, q2 = stage(r)
    return (s1 * q1 + s2 * q2).reshape(x.shape)
