"""QuantizedLinear, the weight-only quantized twin of :class:`trident.models.layers.Linear`, and
:func:`quantize_model`, which swaps a built model's Linear layers for it in place.

On CUDA (where Triton imports) the forward runs the weight-only kernels of trident/kernels/quant_matmul.py on
the codes as stored, in the affine form of :mod:`trident.quant.affine` (the stored float32 scales, and float32
offsets derived once from the format: a non-persistent buffer ``offsets``). With few rows on the CPU, trident's
native integer kernel (:meth:`QuantizedLinear.native_weight`: int4 and int8 in groups of 32 re-packed on first
use, other int8 on its stored codes), else with bfloat16 activations torch's packed kernels
(:mod:`trident.quant.cpu_kernels`; the group-wise ones from a re-packed copy built on first use). Elsewhere the
reference path dequantizes the whole weight to x's dtype, then calls the same :func:`trident.models.layers.linear`
an unquantized layer calls: it saves memory, not time. Every fast path is tested against the reference.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from trident.errors import TridentError
from trident.models import ops
from trident.models.layers import Linear, linear
from trident.native import qmatmul as native_qmatmul
from trident.quant import cpu_kernels
from trident.quant.affine import AffineWeight, affine_from_rtn, affine_linear, affine_zero_point
from trident.quant.rtn import (
    NEVER_QUANTIZED,
    QuantConfig,
    QuantizedWeight,
    dequantize,
    quantize,
    stored_layout,
    unpack_int4,
)

_DERIVED = ("_native_cpu", "_int4_cpu", "_int8_cpu")
"""Where a QuantizedLinear keeps the kernel layouts it builds on first use (in its ``__dict__``: not saved)."""
CPU_ALIGNMENT = 64
"""Bytes the CPU int8 kernel needs the codes aligned to."""


class QuantizedLinear(nn.Module):
    """y = x dequantize(W)^T (+ b), W held as codes, float32 scales and (asymmetric) zero points in buffers
    ``qweight``, ``scales``, ``zeros`` (see :mod:`trident.quant.rtn` for their layout); the bias stays a float
    parameter named ``bias`` as in Linear."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, q: QuantizedWeight,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        qweight = q.qweight
        if qweight.device.type == "cpu" and qweight.data_ptr() % CPU_ALIGNMENT:
            # Tensors mapped from a safetensors file start wherever the header puts them; torch's int8 CPU
            # kernel reads 64-byte aligned rows and crashes on others. One copy (torch allocates aligned).
            qweight = qweight.clone()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        # The affine form's offsets (None for symmetric int8), derived once where the kernels will use them;
        # not saved (the checkpoint holds the format's own tensors), moved with the module.
        offsets = affine_from_rtn(q, config).offsets if qweight.is_cuda else None
        self.register_buffer("offsets", offsets, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, layer: Linear, config: QuantConfig) -> QuantizedLinear:
        return cls(layer.in_features, layer.out_features, config, quantize(layer.weight, config), layer.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized, self.config, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the codes, scales and zero points (the bias apart)."""
        return sum(t.numel() * t.element_size() for t in self.quantized if t is not None)

    def affine_weight(self) -> AffineWeight:
        """The weight in the kernels' affine form: the stored codes and scales, and the offsets (computed here if
        the module was built off CUDA and moved there since: once, as the buffer follows the module)."""
        q = self.quantized
        needs_offsets = not (self.config.bits == 8 and self.config.symmetric)
        if needs_offsets and (self.offsets is None or self.offsets.device != self.scales.device):
            self.offsets = affine_from_rtn(q, self.config).offsets
        return AffineWeight(q.qweight, q.scales, self.offsets if needs_offsets else None, self.config.bits,
                            affine_zero_point(self.config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.uses_kernels(x):
            return affine_linear(x, self.affine_weight(), self.bias)
        if x.device.type == "cpu":
            rows = x.reshape(-1, self.in_features)
            native = self.native_weight(rows.dtype, rows.shape[0])
            if native is not None:
                return native.matmul(rows).view(*x.shape[:-1], self.out_features)
            y = self._cpu_kernel(rows) if cpu_kernels.kernel_dtype_ok(x) else None
            if y is not None:
                y = y.view(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        return linear(x, self.dequantized_weight(x.dtype), self.bias)

    def fused_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                           activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(y, the residual stream) for h, stream = norm.with_residual(x, residual) and y = self(h), or with an
        activation (this layer a fused gate|up projection) y = act(gate) * up, in one CUDA launch where the batch-1
        integer kernel takes the norm too (trident/native/gemv_cuda.py's gemv_normed: one row, Llama's form of
        RMSNorm); None otherwise (the caller runs the norm, this layer, then the activation)."""
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1) or norm.unit_offset:
            return None
        from trident.native import gemv_cuda

        w = self.affine_weight()
        if not gemv_cuda.takes_normed(x, residual, norm.weight, w, self.bias, activation):
            return None
        return gemv_cuda.gemv_normed(x, residual, norm.weight, norm.eps, w, self.bias, activation)

    def derived_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the kernel layouts this layer builds on the CPU for activations of ``dtype`` and keeps (what
        :meth:`derived_tensors` holds once it has run a product of one row), decided as :meth:`cpu_matmul` decides,
        without building them: works on a meta-device layer."""
        c = self.config
        w = affine_from_rtn(self.quantized, c)
        if dtype in native_qmatmul.X_DTYPES and native_qmatmul.available() and native_qmatmul.supports(w):
            natural = native_qmatmul.takes_natural(w)
            if not (c.bits == 8 and self.scales.shape[1] == 1 and not natural):
                extra_bias = self.bias is not None and self.bias.dtype != torch.float32
                return native_qmatmul.packed_bytes(w, natural, extra_bias)
        group = self.in_features // self.scales.shape[1]
        if dtype != torch.bfloat16 or not cpu_kernels.Int4Packed.supports(self.out_features, group):
            return 0
        if c.bits == 4:
            return cpu_kernels.Int4Packed.packed_bytes(self.out_features, self.in_features, group, dtype)
        if self.scales.shape[1] > 1:  # grouped int8 as the int4 kernel's [N, 2K] weight
            return cpu_kernels.Int4Packed.packed_bytes(self.out_features, 2 * self.in_features, group, dtype)
        return 0

    def derived_tensors(self) -> list[torch.Tensor]:
        """The tensors of the kernel layouts this layer built from its stored weight on first use and keeps
        (:meth:`native_weight`, the packed forms of torch's CPU kernels): memory it holds beside its buffers (a
        layout that reads the codes as stored shares their storage). Not the per-call workspaces a layout keeps
        (activations, a few KiB per row count)."""
        layouts = [self.__dict__.get(key) for key in _DERIVED]
        return [value for packed in layouts if packed is not None
                for value in (getattr(packed, f.name) for f in fields(packed)) if isinstance(value, torch.Tensor)]

    def native_weight(self, dtype: torch.dtype, rows: int) -> native_qmatmul.NativeQWeight | None:
        """The weight packed for trident's own integer dot-product CPU kernel (trident/native/qmatmul.c, bias
        included), built on first use and kept (not saved: derived), when it takes this product: the kernel is
        built for this CPU, x is float32 or bfloat16 with at most its MAX_ROWS rows, the group size a multiple of
        32. int8 codes are read as stored where the kernel takes them so (``takes_natural``: K and the group size
        multiples of 64, N of 4; no second copy); per-channel int8 goes there only then (elsewhere torch's int8
        kernel reads its codes as stored); int4 and other grouped int8 are re-packed (for either kernel). None
        otherwise (the torch kernels or the reference then run)."""
        if dtype not in native_qmatmul.X_DTYPES or not 1 <= rows <= native_qmatmul.MAX_ROWS:
            return None
        if not native_qmatmul.available():
            return None
        packed = self.__dict__.get("_native_cpu")
        if packed is None and not self.__dict__.get("_native_cpu_refused"):
            w = affine_from_rtn(self.quantized, self.config)  # not affine_weight(): no offsets buffer kept
            natural = native_qmatmul.takes_natural(w)
            per_channel_int8 = self.config.bits == 8 and self.scales.shape[1] == 1
            if not native_qmatmul.supports(w) or (per_channel_int8 and not natural):
                self.__dict__["_native_cpu_refused"] = True  # decided by the weight: not asked again per forward
                return None
            packed = native_qmatmul.pack(w, self.bias, natural=natural)
            self.__dict__["_native_cpu"] = packed
        return packed

    def _cpu_kernel(self, rows: torch.Tensor) -> torch.Tensor | None:
        """rows @ W^T through torch's packed CPU kernels when one applies (per-channel int8, or int4 in groups the
        int4 kernel takes, at most ``*_MAX_ROWS`` rows); None otherwise. The products equal the reference's up to
        the rounding of scales to bf16 and the kernels' summation order (tests/quant)."""
        c = self.config
        if c.bits == 8 and self.scales.shape[1] == 1 and rows.shape[0] <= cpu_kernels.INT8_MAX_ROWS:
            w = self.affine_weight()
            return cpu_kernels.int8_matmul(rows, w.codes, w.scales.view(-1),
                                           None if w.offsets is None else w.offsets.view(-1))
        if c.bits == 4 and rows.shape[0] <= cpu_kernels.INT4_MAX_ROWS:
            packed = self._int4_packed(rows.dtype)
            return None if packed is None else packed.matmul(rows)
        if c.bits == 8 and rows.shape[0] <= cpu_kernels.INT4_MAX_ROWS:
            packed = self._int8_packed(rows.dtype)
            return None if packed is None else packed.matmul(torch.cat((rows, rows), dim=1))
        return None

    def cpu_matmul(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The CPU kernel's product (bias included) for [rows, in_features] activations of ``dtype``: the native
        one (:meth:`native_weight`, up to its MAX_ROWS rows) where it takes the weight, else torch's packed kernels
        (bfloat16, up to ``cpu_kernels.*_MAX_ROWS`` rows), as one callable with every choice :meth:`forward` makes
        per call already made (for callers issuing many small steps); None where forward would take the reference
        path."""
        if self.qweight.device.type != "cpu":
            return None
        native = self.native_weight(dtype, 1)
        if native is not None:
            return native.matmul
        if dtype != torch.bfloat16:
            return None
        c, bias = self.config, self.bias
        if c.bits == 8 and self.scales.shape[1] == 1:
            w = self.affine_weight()
            codes, scales = w.codes, w.scales.view(-1).to(dtype)
            offsets = None if w.offsets is None else w.offsets.view(-1)

            def product(rows: torch.Tensor) -> torch.Tensor:
                return cpu_kernels.int8_matmul(rows, codes, scales, offsets)
        elif c.bits == 4 and (packed := self._int4_packed(dtype)) is not None:
            product = packed.matmul
        elif c.bits == 8 and (packed := self._int8_packed(dtype)) is not None:
            def product(rows: torch.Tensor) -> torch.Tensor:
                return packed.matmul(torch.cat((rows, rows), dim=1))
        else:
            return None
        if bias is None:
            return product
        return lambda rows: product(rows) + bias

    def _int4_packed(self, dtype: torch.dtype) -> cpu_kernels.Int4Packed | None:
        """The codes re-packed for torch's int4 CPU kernel, built on first use and kept (not saved: derived)."""
        group = self.in_features // self.scales.shape[1]
        if not cpu_kernels.Int4Packed.supports(self.out_features, group):
            return None
        packed = self.__dict__.get("_int4_cpu")
        if packed is None or packed.scale_and_zeros.dtype != dtype:
            w = affine_from_rtn(self.quantized, self.config)  # not affine_weight(): no offsets buffer kept
            packed = cpu_kernels.Int4Packed.pack(unpack_int4(w.codes), w.scales.float(), w.offsets.float(), group,
                                                 dtype)
            self.__dict__["_int4_cpu"] = packed
        return packed

    def _int8_packed(self, dtype: torch.dtype) -> cpu_kernels.Int4Packed | None:
        """Group-wise int8 codes as the int4 kernel's two-halves weight (Int4Packed.pack_int8), built on first use
        and kept (not saved: derived)."""
        group = self.in_features // self.scales.shape[1]
        if not cpu_kernels.Int4Packed.supports(self.out_features, group):
            return None
        packed = self.__dict__.get("_int8_cpu")
        if packed is None or packed.scale_and_zeros.dtype != dtype:
            w = affine_from_rtn(self.quantized, self.config)  # not affine_weight(): no offsets buffer kept
            packed = cpu_kernels.Int4Packed.pack_int8(w.codes, w.scales.float(),
                                                      None if w.offsets is None else w.offsets.float(), group, dtype)
            self.__dict__["_int8_cpu"] = packed
        return packed

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={c.bits}, "
                f"group_size={c.group_size}, symmetric={c.symmetric}")


@dataclass
class ModuleReport:
    """One quantized module: its shape and the relative Frobenius error ||W - deq(W)|| / ||W|| (float64)."""

    name: str
    out_features: int
    in_features: int
    relative_error: float
    bytes_before: int
    """The weight's bytes as the model held it before quantization."""
    bytes_after: int
    """Codes + scales + zero points."""
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True


@dataclass
class QuantReport:
    config: QuantConfig
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def params_quantized(self) -> int:
        return sum(m.out_features * m.in_features for m in self.modules)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "params_quantized": self.params_quantized,
                "weight_bytes_before": sum(m.bytes_before for m in self.modules),
                "weight_bytes_after": sum(m.bytes_after for m in self.modules),
                "modules": [asdict(m) for m in self.modules]}


def num_weights(model: nn.Module) -> int:
    """The model's parameter count with each quantized weight (weight-only or W8A8) counted as its N x K weights
    (not its codes)."""
    from trident.quant.w8a8 import W8A8Linear

    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, (QuantizedLinear, W8A8Linear)))


def _meta_quantized(out_features: int, in_features: int, config: QuantConfig) -> QuantizedWeight:
    """A stored weight of this shape and config on the meta device (nothing allocated)."""
    stored = {kind: torch.empty(shape, dtype=dtype_, device="meta")
              for kind, (shape, dtype_) in stored_layout(out_features, in_features, config).items()}
    return QuantizedWeight(stored["qweight"], stored["scales"], stored.get("zeros"))


def cpu_derived_bytes(out_features: int, in_features: int, config: QuantConfig, dtype: torch.dtype,
                      bias: bool = False) -> int:
    """:meth:`QuantizedLinear.derived_bytes` of a layer of this shape, config and ``bias`` (in ``dtype``), built on
    the meta device."""
    q = _meta_quantized(out_features, in_features, config)
    with torch.device("meta"):
        layer = QuantizedLinear(in_features, out_features, config, q,
                                torch.empty(out_features, dtype=dtype) if bias else None)
        return layer.derived_bytes(dtype)


def cuda_offsets_bytes(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bytes of the affine offsets a layer of this shape and config keeps on CUDA beside its stored tensors
    (the ``offsets`` buffer the Triton kernels read; none for symmetric int8)."""
    offsets = affine_from_rtn(_meta_quantized(out_features, in_features, config), config).offsets
    return 0 if offsets is None else offsets.numel() * offsets.element_size()


def eligible_modules(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the Linear layers ``config`` quantizes, in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, Linear) and is_selected(name, config)]


def is_selected(name: str, config: QuantConfig) -> bool:
    if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition(".")[2], p) for p in NEVER_QUANTIZED):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in config.modules)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is, and wherever else the model holds that same module object (a layer
    sharing its source layer's modules, trident/models/shared_layers.py), so a shared module stays shared."""
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig,
                   progress: Callable[[str], None] | None = None,
                   module_configs: Mapping[str, QuantConfig] | None = None) -> QuantReport:
    """Replace every eligible Linear of ``model`` by a QuantizedLinear, in place. Fused projections (qkv_proj,
    gate_up_proj) are quantized as one weight: their rows are independent output channels and groups run along
    K, so fusion along N changes nothing. ``progress(name)`` is called after each module. ``module_configs``
    (mixed bits) quantizes the modules it names its own way; ``config`` chooses the modules and quantizes the
    rest."""
    report = QuantReport(config)
    module_configs = module_configs or {}
    names = eligible_modules(model, config)
    unknown = sorted(set(module_configs) - set(names))
    if unknown:
        raise TridentError(f"module_configs names {', '.join(unknown)}, which the config does not quantize")
    for name in names:
        layer = model.get_submodule(name)
        layer_config = module_configs.get(name, config)
        qlayer = QuantizedLinear.from_linear(layer, layer_config)
        w64 = layer.weight.to(torch.float64)
        err = torch.linalg.norm(w64 - qlayer.dequantized_weight(torch.float64)) / torch.linalg.norm(w64).clamp_min(
            1e-300)
        report.modules.append(ModuleReport(name, layer.out_features, layer.in_features, float(err),
                                           layer.weight.numel() * layer.weight.element_size(),
                                           qlayer.storage_bytes(), layer_config.bits, layer_config.group_size,
                                           layer_config.symmetric))
        replace_module(model, name, qlayer)
        if progress is not None:
            progress(name)
    return report
