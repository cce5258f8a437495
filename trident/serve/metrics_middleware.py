"""Counting generation requests the engine never saw: an ASGI middleware.

A request that reaches the engine is counted once by the AsyncEngine (finish reason, abort or error).
One refused earlier (bad JSON, unknown model, prompt over the context, ...) or failing without having
been submitted must still show up as ``status="error"``: this middleware counts those. Routes call
:func:`mark_submitted` once the engine holds the request, so an error response after that (a client
gone before a non-streamed answer: 499; an engine failure: 500) is not counted a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SUBMITTED = "trident_submitted_to_engine"
_MODEL = "trident_model"


def mark_submitted(request: Request) -> None:
    """Tell the middleware that the engine now holds this request (it is counted there)."""
    setattr(request.state, _SUBMITTED, True)


def mark_model(request: Request, model: str) -> None:
    """Tell the middleware which model the request was routed to (the ``model`` label of its error)."""
    setattr(request.state, _MODEL, model)


class RequestErrorCounter:
    """Calls ``on_error(model)`` once for each POST to ``paths`` answered with status >= 400 (or failing
    before any answer) without having been submitted to an engine; ``model`` is the model the request was
    routed to (:func:`mark_model`), or "" when it was refused before that."""

    def __init__(self, app: ASGIApp, paths: Collection[str], on_error: Callable[[str], None]) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            if not status and not state.get(_SUBMITTED):
                self.on_error(state.get(_MODEL, ""))
            raise
        if status and status[0] >= 400 and not state.get(_SUBMITTED):
            self.on_error(state.get(_MODEL, ""))
