"""trident: an LLM inference engine and model-compression toolkit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trident.engine.request import SamplingParams
from trident.errors import TridentError

if TYPE_CHECKING:
    from trident.engine.llm import LLM

__all__ = ["LLM", "SamplingParams", "TridentError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; keep `import trident` cheap for torch-free users (scheduler tests, CLI help).
    if name == "LLM":
        from trident.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'trident' has no attribute {name!r}")
