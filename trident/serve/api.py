"""The FastAPI app: OpenAI-compatible routes over a ModelPool (one or many models).

``build_app(pool, config)`` is the only entry point; the app holds no globals, so tests and the CLI build
as many as they like. Each generation request is routed by its "model" (a name or an alias) to that
model's engine, loaded on demand.

Middleware, outermost first: CORS (only with ``config.allowed_origins``), the refused-request counter,
the API-key check (only with ``config.api_key``), the body size limit, then the routes. The /admin routes
check the admin key themselves (see admin.py).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from trident.config import EngineConfig
from trident.serve.admin import admin_router
from trident.serve.chat import create_chat_completion
from trident.serve.completions import create_completion
from trident.serve.config import ServeConfig
from trident.serve.dashboard import install_dashboard
from trident.serve.errors import install_error_handlers
from trident.serve.limits import ApiKeyAuth, BodySizeLimit
from trident.serve.metrics import METRICS_CONTENT_TYPE
from trident.serve.metrics_middleware import RequestErrorCounter, mark_model
from trident.serve.pool import ModelPool
from trident.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
"""Routes whose requests ``trident_requests_total`` counts."""


def build_app(pool: ModelPool, config: ServeConfig | None = None, base_engine: EngineConfig | None = None) -> FastAPI:
    """An app serving ``pool``'s models within ``config``'s limits (default: ``ServeConfig()``: no API key,
    no admin key, no time limit, 1 MiB bodies, CORS off). ``base_engine``: the engine settings of models
    registered through the admin API that do not give their own (default: the first model's)."""
    config = config if config is not None else pool.serve_config
    metrics = pool.metrics
    app = FastAPI(title="trident", docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.metrics = metrics
    install_error_handlers(app)
    install_dashboard(app)
    # add_middleware puts each new one outside the previous ones
    app.add_middleware(BodySizeLimit, max_body_bytes=config.max_body_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(RequestErrorCounter, paths=GENERATION_PATHS, on_error=metrics.request_refused)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    base = base_engine if base_engine is not None else pool.config.models[0].engine
    app.include_router(admin_router(pool, config.admin_key, base))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        pool.refresh_metrics()
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = []
        for status in pool.statuses():
            cards.append(ModelCard(id=status.name, created=pool.created, root=status.name, loaded=status.loaded,
                                   max_model_len=status.max_model_len))
            for alias in status.aliases:
                cards.append(ModelCard(id=alias, created=pool.created, root=status.name, loaded=status.loaded,
                                       max_model_len=status.max_model_len))
        return ModelList(data=cards)

    async def routed(handler, body, request: Request) -> Response:
        """Run a generation route on the model the request names (loaded on demand)."""
        name = pool.resolve(body.model)
        mark_model(request, name)
        async with pool.use(name) as ctx:
            return await handler(ctx, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await routed(create_completion, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await routed(create_chat_completion, body, request)

    return app
