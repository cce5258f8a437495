"""dtype auto follows the processor's bf16 support."""

from __future__ import annotations

import torch

from trident.engine.sizing import resolve_dtype
from trident.hardware import cpu_flags, cpu_has_native_bf16


def test_auto_dtype_follows_cpu_flags() -> None:
    native = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    assert cpu_has_native_bf16() == native
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
