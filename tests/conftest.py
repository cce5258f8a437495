"""Fixtures shared across test folders."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """Path of the real default model (SmolLM2-135M-Instruct Q4_1 GGUF). `make test` installs it, so a
    missing model is an error here, never a skip."""
    from trident.loader import default_model_path

    return default_model_path()


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests (marked ``gpu``) are selected with ``-m gpu``; without a CUDA device they are reported as
    skipped with the reason, never silently passed. Under Triton's CPU interpreter (TRITON_INTERPRET=1),
    the kernel tests (those taking the ``kernel_device`` fixture) run on the CPU instead."""
    import torch

    if torch.cuda.is_available():
        return
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    no_cuda = pytest.mark.skipif(True, reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (interpreting and "kernel_device" in getattr(item, "fixturenames", ())):
            item.add_marker(no_cuda)
