"""The OpenAI-compatible HTTP server: ``build_app(ModelPool(...))`` and ``trident serve``."""

from trident.serve.api import build_app
from trident.serve.async_engine import AsyncEngine, QueueFullError, RequestStream, RequestTimeoutError
from trident.serve.config import ServeConfig
from trident.serve.model_spec import ModelSpec, PoolConfig
from trident.serve.pool import ModelPool

__all__ = ["AsyncEngine", "ModelPool", "ModelSpec", "PoolConfig", "QueueFullError", "RequestStream",
           "RequestTimeoutError", "ServeConfig", "build_app"]
