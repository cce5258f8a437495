"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine.

``build_app(async_engine, served_model_name, config)`` is the only entry point; the app holds no
globals, so tests and the CLI build as many as they like.

Middleware, outermost first: CORS (only with ``config.allowed_origins``), the refused-request counter,
the API-key check (only with ``config.api_key``), the body size limit, then the routes.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from trident.serve.async_engine import AsyncEngine
from trident.serve.chat import create_chat_completion
from trident.serve.completions import create_completion
from trident.serve.config import ServeConfig
from trident.serve.context import ServeContext
from trident.serve.errors import install_error_handlers
from trident.serve.limits import ApiKeyAuth, BodySizeLimit
from trident.serve.metrics import METRICS_CONTENT_TYPE, ServerMetrics
from trident.serve.metrics_middleware import RequestErrorCounter
from trident.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
"""Routes whose requests ``trident_requests_total`` counts."""


def build_app(async_engine: AsyncEngine, served_model_name: str, config: ServeConfig | None = None) -> FastAPI:
    """An app serving ``async_engine``'s model under ``served_model_name``, within ``config``'s limits
    (default: ``ServeConfig()``: no API key, no time limit, 1 MiB bodies, CORS off)."""
    config = config if config is not None else ServeConfig()
    ctx = ServeContext(engine=async_engine, served_model_name=served_model_name, config=config)
    metrics = ServerMetrics(served_model_name)
    metrics.model_loaded()
    async_engine.add_observer(metrics)
    app = FastAPI(title="trident", docs_url=None, redoc_url=None)
    app.state.serve = ctx
    app.state.metrics = metrics
    install_error_handlers(app)
    # add_middleware puts each new one outside the previous ones
    app.add_middleware(BodySizeLimit, max_body_bytes=config.max_body_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(RequestErrorCounter, paths=GENERATION_PATHS, on_error=metrics.request_refused)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.engine_stats(async_engine.engine.stats())
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=served_model_name, created=ctx.created, max_model_len=async_engine.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    return app
