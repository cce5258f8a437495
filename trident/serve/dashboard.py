"""GET /dashboard: a built-in page with live charts of the figures on /metrics (no Grafana needed).

The page is static (``static/dashboard.html`` and ``static/dashboard.js``, shipped as package data,
vanilla JS, no external resource of any kind): the browser polls ``/metrics`` on the same origin,
parses the Prometheus text format, keeps a rolling window and draws its own canvas line charts, one
line per ``model`` label value (a model that appears later gets its own line). Query parameters:

- ``interval_ms``: time between two scrapes (default 2000, at least 100);
- ``window_s``: the time span the charts show (default 300);
- ``rate_window_s``: the span over which rates and histogram quantiles are taken, like the range of
  PromQL's ``rate(x[...])`` (default: 20 s, or 4 scrape intervals when that is longer).

The script exposes ``window.tridentDashboard`` for tests; ``static/dashboard.js`` documents it.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response

DASHBOARD_PATH = "/dashboard"
"""The page."""
DASHBOARD_SCRIPT_PATH = "/dashboard.js"
"""Its script, which the page loads from the same origin."""

_NO_CACHE = {"Cache-Control": "no-cache"}


def _static(name: str) -> str:
    return files("trident.serve").joinpath("static", name).read_text(encoding="utf-8")


def install_dashboard(app: FastAPI) -> None:
    """Add ``GET /dashboard`` (the page) and ``GET /dashboard.js`` (its script) to ``app``; the page reads
    ``/metrics``, which the app must serve."""
    page, script = _static("dashboard.html"), _static("dashboard.js")

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=_NO_CACHE)

    @app.get(DASHBOARD_SCRIPT_PATH, include_in_schema=False)
    async def dashboard_script() -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers=_NO_CACHE)
