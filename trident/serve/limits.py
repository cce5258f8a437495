"""ASGI middlewares that refuse requests before any route runs: API-key check and body size limit.

Both answer with an OpenAI-style error body. They sit inside :class:`RequestErrorCounter`, so each
refused generation request is counted as ``status="error"``.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trident.serve.errors import error_response

PROTECTED_PREFIX = "/v1/"
"""Paths that need the API key (when one is set); /health, /metrics and the rest stay open."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyAuth:
    """401 for a /v1/* request without ``Authorization: Bearer <api_key>`` (constant-time comparison)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization")
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(PROTECTED_PREFIX) or path == "/v1") \
                or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        missing = _header(scope, b"authorization") is None
        message = ("no API key given; send it as the header 'Authorization: Bearer <key>'" if missing
                   else "the API key is not valid")
        response = error_response(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodySizeLimit:
    """413 for a request body over ``max_body_bytes``: at once when Content-Length says so, else as soon as
    the bytes received pass the limit (the rest is never read). A body within the limit is read here
    and handed on unchanged, so later ``receive()`` calls (disconnect checks) reach the client as usual."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is larger than this server's limit of "
                                  f"{self.max_body_bytes} bytes", code="request_too_large")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                response = error_response(400, "the Content-Length header is not a number")
                await response(scope, receive, send)
                return
            if declared_bytes > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        received = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see that
                first = message
                break
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if first is None:
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)
