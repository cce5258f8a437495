"""OpenAI-style error bodies and the exception handlers that produce them.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}``. A request FastAPI
cannot validate (malformed JSON, a wrong type, a missing field) is a 400, not FastAPI's 422; a
TridentError (bad sampling values, prompt over the context, ...) is a 400; anything unexpected is a
500 with a generic message, and the server keeps running. A full queue is a 429 with Retry-After, a
request past the time limit a 408. An unknown model is a 404; a model that cannot be loaded now because
the models filling the memory budget are busy is a 503 with Retry-After; unloading a busy model or
registering a taken name is a 409. A tensor-parallel engine whose ranks fell out of step (a rank exited) answers
503 while the server stops.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trident.distributed.config import TensorParallelError
from trident.errors import TridentError
from trident.serve.async_engine import QueueFullError, RequestTimeoutError
from trident.serve.pool_errors import (
    ModelBusyError,
    ModelCapacityError,
    ModelConflictError,
    ModelTooLargeError,
    UnknownModelError,
)
from trident.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("trident.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


class ApiError(Exception):
    """An error a route answers with directly (status, message and the OpenAI fields)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        """Extra response headers (e.g. Retry-After on a 429)."""


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error body with ``status`` (the error type follows from the status)."""
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


RETRY_AFTER_S = 1
"""The Retry-After (seconds) of a 429: about how long a few engine steps take to drain the queue."""
CAPACITY_RETRY_AFTER_S = 5
"""The Retry-After (seconds) of a 503 for a model that cannot be loaded yet: busy models must finish first."""

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location ("str", "list[int]"); the client needs none."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for the first few validation errors, and the parameter of the first."""
    parts = []
    param = None
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('msg', '')})")
            continue
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an OpenAI-style error body."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(QueueFullError)
    async def _on_queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestTimeoutError)
    async def _on_timeout(_: Request, exc: RequestTimeoutError) -> JSONResponse:
        return error_response(408, str(exc), code="request_timeout")

    @app.exception_handler(UnknownModelError)
    async def _on_unknown_model(_: Request, exc: UnknownModelError) -> JSONResponse:
        return error_response(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(ModelCapacityError)
    async def _on_capacity(_: Request, exc: ModelCapacityError) -> JSONResponse:
        return error_response(503, str(exc), code="model_capacity",
                              headers={"Retry-After": str(CAPACITY_RETRY_AFTER_S)})

    @app.exception_handler(ModelTooLargeError)
    async def _on_too_large(_: Request, exc: ModelTooLargeError) -> JSONResponse:
        return error_response(400, str(exc), param="model", code="model_too_large")

    @app.exception_handler(ModelBusyError)
    async def _on_busy(_: Request, exc: ModelBusyError) -> JSONResponse:
        return error_response(409, str(exc), code="model_busy")

    @app.exception_handler(ModelConflictError)
    async def _on_conflict(_: Request, exc: ModelConflictError) -> JSONResponse:
        return error_response(409, str(exc), code="model_conflict")

    @app.exception_handler(TensorParallelError)
    async def _on_tensor_parallel(_: Request, exc: TensorParallelError) -> JSONResponse:
        return error_response(503, str(exc), code="engine_failed")

    @app.exception_handler(TridentError)
    async def _on_trident_error(_: Request, exc: TridentError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the server log")
