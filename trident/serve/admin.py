"""The admin API: list, load, register and unload models at run time, behind the admin key.

- ``GET /admin/models``: every model with whether it is loaded, its bytes, requests in flight and aliases,
  plus the memory budget.
- ``POST /admin/models/load`` ``{"model": NAME}``: load a served model now (unloading least recently used
  idle models as the budget needs). With ``"path"`` (and optional engine settings as in a config file's
  ``[[models]]`` entry), first register a new model under NAME.
- ``POST /admin/models/unload`` ``{"model": NAME}``: unload it now (409 while it has requests).

Without an admin key (``--admin-key`` / ``TRIDENT_ADMIN_KEY``) these routes answer 403: nobody may change
what a server serves unless its operator allowed it. The key is separate from the API key, so clients
that may generate cannot load or unload models.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request

from trident.config import EngineConfig
from trident.serve.errors import ApiError
from trident.serve.model_spec import spec_from_dict
from trident.serve.pool import ModelPool, ModelStatus


class LoadRequest(BaseModel):
    """``model`` names a served model; with ``path`` a new one is registered first, and any other key is an
    engine setting as in a config file's ``[[models]]`` entry (dtype, max_model_len, kv_cache_memory, ...)."""

    model_config = ConfigDict(extra="allow")
    model: str
    path: str | None = None


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


def _status(status: ModelStatus) -> dict[str, Any]:
    return asdict(status)


def admin_router(pool: ModelPool, admin_key: str | None, base_engine: EngineConfig) -> APIRouter:
    """The /admin routes of ``pool``; ``base_engine`` gives the settings a registered model does not."""

    def authorize(request: Request) -> None:
        if admin_key is None:
            raise ApiError(403, "the admin API is disabled; start the server with --admin-key (or "
                           "TRIDENT_ADMIN_KEY) to load and unload models at run time", code="admin_disabled")
        header = request.headers.get("authorization")
        if header is None:
            raise ApiError(401, "no admin key given; send it as the header 'Authorization: Bearer <admin key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
            raise ApiError(401, "the admin key is not valid", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/admin", dependencies=[Depends(authorize)])

    @router.get("/models")
    async def list_models() -> dict:
        return {"models": [_status(s) for s in pool.statuses()], "aliases": pool.aliases,
                "memory_budget_bytes": pool.memory_budget_bytes, "loaded_bytes": pool.loaded_bytes()}

    @router.post("/models/load")
    async def load(body: LoadRequest) -> dict:
        added = False
        if body.path is not None:
            settings = {"name": body.model, "path": body.path, **(body.model_extra or {})}
            added = pool.register(spec_from_dict(settings, base_engine, "the load request"))
        elif body.model_extra:
            raise ApiError(400, f"engine settings ({', '.join(sorted(body.model_extra))}) need a path: they "
                           "describe a new model to register")
        try:
            return _status(await pool.load(body.model))
        except BaseException:
            if added:  # a model that cannot be loaded is not served
                pool.unregister(body.model)
            raise

    @router.post("/models/unload")
    async def unload(body: UnloadRequest) -> dict:
        return _status(await pool.unload(body.model))

    return router
