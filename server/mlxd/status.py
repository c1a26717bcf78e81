"""mlxd's own pages: the status page at ``/``, ``/status`` (its data) and ``/metrics``.

The page is three static files shipped in the package (``server/static``): plain HTML, CSS and
JavaScript with no CDN, no framework and no build step, so it works offline. It polls
``/status`` — ``/health`` plus the configured models and the recent requests — once a second.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

from mlxd.metrics import CONTENT_TYPE, Metrics
from mlxd.state import AppState

router = APIRouter()

_ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}


def _asset(name: str) -> str:
    return (resources.files("mlxd") / "static" / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def status_page() -> HTMLResponse:
    return HTMLResponse(_asset("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/ui/{name}", include_in_schema=False)
async def status_asset(name: str) -> Response:
    if name not in _ASSETS:
        raise HTTPException(404, f"no such file: /ui/{name}")  # rendered like any 404
    return Response(_asset(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """What the page shows: /health, every configured model, the last requests (newest first)."""
    state: AppState = request.app.state.mlxd
    metrics: Metrics = request.app.state.metrics
    return {
        "health": await state.health(),
        "models": [state.describe_model(entry) for entry in state.registry.entries],
        "recent_requests": [
            {**record.to_log(), "at": record.at} for record in reversed(metrics.recent)
        ],
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
