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
