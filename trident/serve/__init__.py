"""The OpenAI-compatible HTTP server: ``build_app(AsyncEngine(engine), name)`` and ``trident serve``."""

from trident.serve.api import build_app
from trident.serve.async_engine import AsyncEngine, RequestStream

__all__ = ["AsyncEngine", "RequestStream", "build_app"]
