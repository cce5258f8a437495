"""2:4 semi-structured sparse Linear for CUDA: :class:`SparseLinear24` replaces a decoder Linear whose weight keeps
at most two of every four consecutive inputs of a row (a folder written by ``trident prune --structure 2:4``);
:func:`install_sparse_kernels` swaps a built model's decoder Linear layers for it in place (the engine calls it
when ``EngineConfig.sparse_kernel`` / ``--sparse-kernel`` is on). It lives beside the other Linear replacements
(QuantizedLinear, W8A8Linear) and, like them, uses :func:`trident.quant.linear.replace_module`.

What torch offers (``torch.sparse.SparseSemiStructuredTensor``, a prototype API) and how it is used here:

- CUDA only, 2-D contiguous weights; the compressed operand holds the kept half of the values plus 2 bits of
  metadata per kept value (about 56% of the dense bytes in 16-bit).
- dtypes: float16 and bfloat16 here (:data:`KERNEL_DTYPES`; torch also has int8, float8 and float32 variants
  that need other operand handling); x and the weight must share the dtype.
- Shapes: the weight's rows and columns must be multiples of the backend's minimum tile (16 or 32 rows, 16 to 64
  columns depending on backend and torch version); torch raises otherwise, and that layer stays dense.
- Which operand is sparse: only the first of a matmul. ``F.linear(x, W_sparse)`` is computed as
  ``(W_sparse @ x^T)^T``: the weight [N, K] is the sparse left operand, x^T the dense right one, and the 2:4 groups
  run along K (the inputs of a row), which is exactly the mask's grouping. torch pads the dense operand's rows
  (tokens) to a multiple of 8, so any batch runs, 1 token costing as much as 8.
- Backends: cuSPARSELt (``torch._cslt_sparse_mm``; Ampere and, from cuSPARSELt 0.6, Hopper: the H200's sm90) and
  CUTLASS (``torch._sparse_semi_structured_mm``; sm8x only, refused on sm90). ``auto`` takes cuSPARSELt when
  torch was built with it, else CUTLASS on sm8x, else nothing. The backend class is chosen directly (no global
  ``_FORCE_CUTLASS`` flag is set).
- The bias is added after the sparse product (one elementwise kernel), not passed to the sparse kernel.

Every converted layer is checked once at install: the weight really is 2:4 (:func:`is_two_four`), torch accepts
it, and a probe product on 3 rows (padding exercised) matches the dense matmul of the same weight; any refusal
or mismatch leaves that layer dense, with a log line saying why (logger ``trident.sparse``). One converted layer
is then captured in a throwaway CUDA graph: should torch or cuSPARSELt refuse capture, the report says so and the
engine runs its steps eagerly instead of replaying graphs. On the CPU, or in
float32, nothing is converted: the masked weights run as ordinary dense matmuls (correct, no speed-up).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trident.errors import TridentError
from trident.models.layers import Linear

logger = logging.getLogger("trident.sparse")

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Activation and weight dtypes the sparse layer takes."""
BACKENDS = ("auto", "cusparselt", "cutlass")
PROBE_ROWS = 3
"""Rows of the install-time probe: not a multiple of 8, so torch's padding of the dense operand runs too."""
PROBE_TOLERANCE = 2e-2
"""Relative error (Frobenius) the probe accepts against the dense matmul: 16-bit outputs round to ~4e-3."""


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every run of four consecutive inputs of every row of ``weight`` [N, K] holds at most two non-zeros."""
    n, k = weight.shape
    if k % 4:
        return False
    return bool(((weight.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def resolve_backend(device: torch.device, requested: str = "auto") -> tuple[str | None, str]:
    """(backend, why): the semi-structured backend for ``device``, or None with the reason there is none."""
    if requested not in BACKENDS:
        raise TridentError(f"unknown 2:4 backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if device.type != "cuda":
        return None, "the 2:4 kernels run on CUDA only"
    major, minor = torch.cuda.get_device_capability(device)
    has_cusparselt = torch.backends.cusparselt.is_available()
    if requested == "cusparselt" or (requested == "auto" and has_cusparselt):
        return ("cusparselt", "cuSPARSELt") if has_cusparselt else (None, "this torch build has no cuSPARSELt")
    if major == 8:
        return "cutlass", f"CUTLASS on sm{major}{minor}"
    return None, f"torch's CUTLASS 2:4 kernels run on sm8x only (this GPU is sm{major}{minor})"


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` [N, K] (CUDA, 2:4) compressed by ``backend``'s SparseSemiStructuredTensor class."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}[backend]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")
        return cls.from_dense(weight.detach().contiguous())


def sparse_linear(x: torch.Tensor, sparse_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T (+ b) with W a SparseSemiStructuredTensor [N, K]; a contiguous [M, N] in x's dtype."""
    if x.shape[0] == 0:
        return x.new_empty(0, sparse_weight.shape[0])
    y = F.linear(x if x.is_contiguous() else x.contiguous(), sparse_weight).contiguous()
    return y if bias is None else y + bias


class SparseLinear24(nn.Module):
    """y = x W^T (+ b), W held compressed in torch's semi-structured form. The compressed tensors are buffers
    (``packed``, and ``meta`` for CUTLASS) so that memory accounting sees them; the tensor subclass that the
    matmul takes is an attribute built over them."""

    def __init__(self, sparse_weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
        super().__init__()
        self.out_features, self.in_features = sparse_weight.shape
        self.backend = backend
        self.sparse_weight = sparse_weight
        self.register_buffer("packed", sparse_weight.packed)
        self.register_buffer("meta", sparse_weight.meta)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, layer: Linear, backend: str) -> SparseLinear24:
        if not is_two_four(layer.weight):
            raise TridentError("the weight is not 2:4 sparse (at most two non-zeros in every four inputs of a row)")
        return cls(to_semi_structured(layer.weight, backend), layer.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sparse_linear(x.reshape(-1, self.in_features), self.sparse_weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 {self.backend}"


@dataclass
class SparseKernelReport:
    """What :func:`install_sparse_kernels` did."""

    backend: str | None
    converted: list[str] = field(default_factory=list)
    """Layers now SparseLinear24, in model order."""
    dense: dict[str, str] = field(default_factory=dict)
    """Decoder layers left dense, with the reason."""
    reason: str | None = None
    """Why nothing was converted (wrong device, dtype, pattern), else None."""
    graph_failure: str | None = None
    """Why a converted layer could not be captured in a CUDA graph (the engine then runs eagerly), else None."""

    @property
    def capturable(self) -> bool:
        return self.graph_failure is None


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers of the decoder layers (never the embeddings or the LM head), in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, Linear) and name.startswith("model.layers.")]


def _probe(layer: Linear, sparse: SparseLinear24) -> str | None:
    """None when the sparse layer's product on PROBE_ROWS random rows matches the dense one, else why not."""
    w = layer.weight
    x = torch.randn(PROBE_ROWS, layer.in_features, device=w.device, generator=torch.Generator(w.device).manual_seed(0),
                    dtype=torch.float32).to(w.dtype)
    try:
        got = sparse(x).float()
    except Exception as e:  # torch refusing the operands is a reason to stay dense, not an error
        return f"torch refused the product: {type(e).__name__}: {str(e)[:160]}"
    expected = F.linear(x, w, layer.bias).float()
    rel = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    return None if rel < PROBE_TOLERANCE else f"the sparse product is off by {rel:.2e} (relative) from the dense one"


def _capture_failure(sparse: SparseLinear24) -> str | None:
    """None when a call of ``sparse`` can be captured in a CUDA graph (the engine's decode steps are), else why."""
    x = torch.zeros(8, sparse.in_features, device=sparse.packed.device, dtype=sparse.packed.dtype)
    stream = torch.cuda.Stream(sparse.packed.device)
    stream.wait_stream(torch.cuda.current_stream(sparse.packed.device))
    try:
        with torch.cuda.stream(stream):
            sparse(x)  # anything built on first use, outside the capture
        torch.cuda.current_stream(sparse.packed.device).wait_stream(stream)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            sparse(x)
    except Exception as e:  # a library that refuses capture is a reason to run eagerly, not an error
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


@torch.no_grad()
def install_sparse_kernels(model: nn.Module, pattern: str | None, device: torch.device, dtype: torch.dtype,
                           backend: str = "auto") -> SparseKernelReport:
    """Replace the decoder Linear layers of a built ``model`` whose weights are 2:4 by SparseLinear24, in place,
    when ``pattern`` (the folder's ``trident_sparsity`` pattern, None when unmarked) is ``2:4``, the device CUDA
    and ``dtype`` 16-bit; every layer that cannot be converted stays dense with a log line (see the module
    docstring)."""
    if pattern != "2:4":
        reason = ("the model is not marked 2:4 (trident prune --structure 2:4 writes such folders)" if pattern is None
                  else f"the model is marked {pattern}, which has no sparse kernel (only 2:4 does)")
    elif device.type != "cuda":
        reason = "the 2:4 kernels run on CUDA; on the CPU the masked weights run as dense matmuls (no speed-up)"
    elif dtype not in KERNEL_DTYPES:
        reason = f"the 2:4 kernels take bfloat16 or float16, the model runs in {str(dtype).removeprefix('torch.')}"
    else:
        reason = None
    chosen, why = resolve_backend(device, backend) if reason is None else (None, reason)
    report = SparseKernelReport(chosen, reason=None if chosen else why)
    if chosen is None:
        logger.warning("--sparse-kernel: dense matmuls, %s", report.reason)
        return report
    from trident.quant.linear import replace_module

    for name in decoder_linears(model):
        layer = model.get_submodule(name)
        try:
            sparse = SparseLinear24.from_linear(layer, chosen)
        except Exception as e:  # not 2:4, or torch refusing the shape: this layer stays dense
            report.dense[name] = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        failure = _probe(layer, sparse)
        if failure is not None:
            report.dense[name] = failure
            continue
        replace_module(model, name, sparse)
        report.converted.append(name)
    if report.converted:
        report.graph_failure = _capture_failure(model.get_submodule(report.converted[0]))
        if report.graph_failure is not None:
            logger.warning("--sparse-kernel: the sparse matmul cannot be captured in a CUDA graph, so decode steps "
                           "run eagerly: %s", report.graph_failure)
    for name, why in report.dense.items():
        logger.warning("--sparse-kernel: %s stays dense: %s", name, why)
    logger.info("--sparse-kernel: %d of %d decoder projections run 2:4 sparse (%s)", len(report.converted),
                len(report.converted) + len(report.dense), why)
    return report
