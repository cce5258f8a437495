"""The OpenAI-compatible HTTP server: ``build_app(AsyncEngine(engine), name)`` and ``trident serve``."""

from trident.serve.api import build_app
from trident.serve.async_engine import AsyncEngine, QueueFullError, RequestStream, RequestTimeoutError
from trident.serve.config import ServeConfig

__all__ = ["AsyncEngine", "QueueFullError", "RequestStream", "RequestTimeoutError", "ServeConfig", "build_app"]
