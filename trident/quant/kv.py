"""KV-cache storage formats: float (the compute dtype or another float dtype) or quantized (int8 / fp8 codes
with scales), and the quantize / dequantize math in plain torch: what the reference attention backend runs and
what the Triton write kernel and the attention kernels' in-register dequantization are tested against.

Quantized caches (``--kv-cache-dtype int8|fp8``) keep, for every (token slot, kv head), the ``head_dim`` codes
of its key and of its value, and one float32 scale each (symmetric, no zero point):

- int8: ``s = absmax / 127``, ``q = clamp(floor(x / s + 0.5), -127, 127)`` (round half up, the rule the Triton
  kernel computes the same way); ``|x - q * s| <= s / 2``.
- fp8: float8_e4m3fn codes with the same per-(token, head) scaling, ``s = absmax / 448`` (e4m3's largest
  finite value), ``q = fp8(clamp(x / s, -448, 448))`` rounded to nearest even; relative error <= 2^-4 per
  element. Chosen over a fixed scale of 1.0 (vLLM's default): keys after rotary embedding reach hundreds in
  some models (past 448 a fixed scale saturates) and small values would land in e4m3's subnormals (only
  2^-9 apart), while the per-token scale costs the same 4 bytes per (token, head) as int8's and reuses its
  machinery. The clamp saturates: no finite input yields NaN or inf.

A row of zeros gets the scale 0 and codes 0 (dequantized exactly). Scales are float32: a float16 scale
would underflow for rows smaller than about 6e-8 * 127, overflow past 65504 * 127, and add up to 2^-11 of
relative error to each element of its row; at head_dim 64 / 128 the 4 bytes cost 6% / 3% of the row
(bytes per token and head: int8 68 / 132 against bf16's 128 / 256, a 1.88x / 1.94x larger cache for the
same memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trident.errors import TridentError

FLOAT_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_KV_DTYPES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
"""name -> (code dtype, largest code magnitude)."""
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class KVCacheFormat:
    """How one layer's keys and values are stored."""

    name: str
    """float32, bfloat16, float16 (values stored as they are), int8 or fp8 (codes plus scales)."""
    dtype: torch.dtype
    """Element dtype of the key/value (code) tensors."""
    qmax: float | None = None
    """Largest code magnitude of a quantized format (127, 448); None for a float one."""

    @property
    def quantized(self) -> bool:
        return self.qmax is not None

    def bytes_per_token_head(self, head_dim: int) -> int:
        """Bytes of one token's key (or value) in one kv head: its elements plus, if quantized, its scale."""
        element = torch.empty((), dtype=self.dtype).element_size()
        scale = SCALE_DTYPE.itemsize if self.quantized else 0
        return head_dim * element + scale


def kv_cache_format(name: str, compute_dtype: torch.dtype) -> KVCacheFormat:
    """The format ``name`` (a CacheConfig.kv_cache_dtype) stands for; auto: the compute dtype, unquantized."""
    if name == "auto":
        return KVCacheFormat(name=str(compute_dtype).removeprefix("torch."), dtype=compute_dtype)
    if name in FLOAT_KV_DTYPES:
        return KVCacheFormat(name=name, dtype=FLOAT_KV_DTYPES[name])
    if name in QUANTIZED_KV_DTYPES:
        dtype, qmax = QUANTIZED_KV_DTYPES[name]
        return KVCacheFormat(name=name, dtype=dtype, qmax=qmax)
    choices = ", ".join(("auto", *FLOAT_KV_DTYPES, *QUANTIZED_KV_DTYPES))
    raise TridentError(f"unsupported kv_cache_dtype {name!r}; use one of {choices}")


def format_of_codes(dtype: torch.dtype) -> KVCacheFormat:
    """The quantized format whose codes have ``dtype`` (int8, float8_e4m3fn)."""
    for name, (code_dtype, qmax) in QUANTIZED_KV_DTYPES.items():
        if code_dtype == dtype:
            return KVCacheFormat(name=name, dtype=code_dtype, qmax=qmax)
    raise ValueError(f"no quantized KV-cache format has {dtype} codes")


def quantize_kv(x: torch.Tensor, fmt: KVCacheFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] in fmt.dtype, float32 scales [...])."""
    assert fmt.qmax is not None, f"{fmt.name} is not a quantized KV-cache format"
    x = x.float()
    scale = x.abs().amax(dim=-1) / fmt.qmax
    y = x / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    if fmt.dtype == torch.int8:
        codes = torch.floor(y + 0.5).clamp_(-fmt.qmax, fmt.qmax).to(torch.int8)
    else:
        codes = y.clamp_(-fmt.qmax, fmt.qmax).to(fmt.dtype)
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim] and scales [...] -> values [..., head_dim] in ``dtype`` (products in float32)."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)
