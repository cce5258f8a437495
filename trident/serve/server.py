"""Run the app with uvicorn (what ``trident serve`` calls)."""

from __future__ import annotations

import os

from trident.engine.engine import LLMEngine
from trident.serve.api import build_app
from trident.serve.async_engine import AsyncEngine
from trident.serve.config import ServeConfig


def default_model_name(model: str | None) -> str:
    """The name clients use when --served-model-name is not given: the file or folder name, or the default's."""
    if not model:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(model))
    return name[:-5] if name.endswith(".gguf") else name


def serve(engine: LLMEngine, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", config: ServeConfig | None = None) -> None:
    """Serve ``engine`` over HTTP until interrupted, within ``config``'s limits."""
    import uvicorn

    app = build_app(AsyncEngine(engine), served_model_name, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
