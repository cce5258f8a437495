"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """Path of the real default model (SmolLM2-135M-Instruct Q4_1 GGUF); skips when it is not installed."""
    from trident.errors import TridentError
    from trident.loader import default_model_path

    try:
        return default_model_path()
    except TridentError as e:
        pytest.skip(str(e))


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests (marked ``gpu``) are selected with ``-m gpu``; without a CUDA device they are reported as
    skipped with the reason, never silently passed."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skipif(True, reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
