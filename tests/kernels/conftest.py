"""The device the kernel tests run on: CUDA, or the CPU under Triton's interpreter, which runs the same
kernels slowly, for developing without a GPU:

    TRITON_INTERPRET=1 pytest -m gpu tests/kernels

(with triton importable; Triton 3.6's interpreter also needs numpy < 2.4, which still converts its
one-element arrays to Python ints).

Every test here is gpu-marked (deselected by ``make test``). Where triton is not installed (the CPU
venv) the files, which import the kernels, are not collected at all."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

collect_ignore_glob = [] if importlib.util.find_spec("triton") is not None else ["test_*.py"]


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _widen_interpreter_bf16_dot()
        return torch.device("cpu")
    pytest.fail("the kernel tests need a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")


def _widen_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter multiplies bf16 tl.dot operands as their raw uint16 bit patterns; widen
    them to fp32 first (exact), as the GPU's bf16 tensor cores compute, so bf16 kernels check on the CPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot
    if getattr(original, "widens_bf16", False):
        return

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_bf16 = True
    InterpreterBuilder.create_dot = create_dot
