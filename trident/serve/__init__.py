"""The OpenAI-compatible HTTP server: ``build_app(ModelPool(...))`` and ``trident serve``.

The names below are imported on first use, so that ``trident.serve.config`` or ``model_spec`` (which the
command line reads for its flags) load without FastAPI, e.g. on a machine that only runs benchmarks.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_app": "trident.serve.api",
    "AsyncEngine": "trident.serve.async_engine",
    "QueueFullError": "trident.serve.async_engine",
    "RequestStream": "trident.serve.async_engine",
    "RequestTimeoutError": "trident.serve.async_engine",
    "ServeConfig": "trident.serve.config",
    "ModelSpec": "trident.serve.model_spec",
    "PoolConfig": "trident.serve.model_spec",
    "ModelPool": "trident.serve.pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trident.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
