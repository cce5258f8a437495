"""ServeConfig: the limits and safety settings of one HTTP server (``trident serve`` flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trident.errors import TridentError
from trident.serve.adaptive import AdaptiveConfig

DEFAULT_MAX_BODY_BYTES = 1 << 20
"""1 MiB: far more than any prompt that fits an 8k-token context, small enough to refuse floods."""
DEFAULT_MAX_QUEUED_REQUESTS = 256
"""Waiting requests beyond the running batch before new ones are refused with 429."""


@dataclass(frozen=True)
class ServeConfig:
    """What the server accepts; validated at construction (a bad value raises TridentError)."""

    api_key: str | None = None
    """When set, every /v1/* request must carry ``Authorization: Bearer <api_key>`` (else 401);
    /health and /metrics stay open. None: no authentication."""
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    """When the engine already holds this many waiting requests (accepted, not yet in the running
    batch; counted as ``EngineStats.num_waiting`` counts them, i.e. sequences, so n=2 counts twice, and
    preempted sequences count too), a new generation request is answered 429 with a Retry-After header.
    At least 1."""
    request_timeout_s: float | None = None
    """A generation request running longer than this (queue time included) is aborted, its KV blocks
    freed, and answered 408 (a stream already started ends with an error event, then [DONE]).
    None: no limit."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Request bodies larger than this are refused with 413, judged by Content-Length and by the bytes
    actually received (never read whole)."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed by CORS (e.g. ``"https://app.example.com"``, or ``"*"``). Empty: CORS off."""
    admin_key: str | None = None
    """When set, /admin/* (load, unload and register models) needs ``Authorization: Bearer <admin_key>``.
    None: the admin API is disabled (403)."""
    adaptive: AdaptiveConfig | None = None
    """``trident serve --adaptive``: each loaded model's running limit moves to hold this time-per-output-token
    objective (trident/serve/adaptive.py). None: the limit stays max_num_seqs."""

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or self.api_key != self.api_key.strip()):
            raise TridentError("api_key must be a non-empty string without surrounding spaces, or None for no "
                               "authentication")
        if self.admin_key is not None and (not isinstance(self.admin_key, str) or not self.admin_key.strip()
                                           or self.admin_key != self.admin_key.strip()):
            raise TridentError("admin_key must be a non-empty string without surrounding spaces, or None to "
                               "disable the admin API")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise TridentError("admin_key must differ from api_key: every client holds the API key")
        if isinstance(self.max_queued_requests, bool) or not isinstance(self.max_queued_requests, int) \
                or self.max_queued_requests < 1:
            raise TridentError(f"max_queued_requests must be an integer >= 1, got {self.max_queued_requests!r}")
        timeout = self.request_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise TridentError(f"request_timeout_s must be a number of seconds > 0, or None for no limit; "
                               f"got {timeout!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1:
            raise TridentError(f"max_body_bytes must be an integer >= 1, got {self.max_body_bytes!r}")
        if isinstance(self.allowed_origins, str):
            raise TridentError("allowed_origins must be a tuple of origins, not one string; "
                               f"write ({self.allowed_origins!r},)")
        origins = tuple(self.allowed_origins)
        for origin in origins:
            if not isinstance(origin, str) or not origin or origin != origin.strip() or \
                    (origin != "*" and "://" not in origin) or origin.endswith("/"):
                raise TridentError(f"allowed origin {origin!r} is not an origin; write it as scheme://host[:port] "
                                   "without a trailing slash (e.g. https://app.example.com), or '*'")
        object.__setattr__(self, "allowed_origins", origins)
