"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text

from service.context import Context, Owner
from service.errors import error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    """A readiness probe's answer; 503 carries the same body with the checks that failed."""

    status: str
    checks: dict[str, Any]
    time: float


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers HTTP (no authentication needed)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        **error_responses(401),
        503: {"model": Readiness, "description": "not ready: `checks` says which check failed"},
    },
)
def readyz(context: Context, owner: Owner) -> Any:
    """Ready to take jobs: the database is writable, the supervisor is alive, devices are seen."""
    checks: dict[str, Any] = {}
    try:
        with context.db.write() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:  # any driver error means not ready; report it, do not raise
        logger.warning("readiness: database not writable: %s", error)
        checks["database"] = f"error: {type(error).__name__}"
    supervisor = context.supervisor
    if supervisor is None:
        checks["supervisor"] = "external (gmnm worker)"
    else:
        checks["supervisor"] = "ok" if supervisor.alive else "not running"
    checks["devices"] = _devices(context.settings.devices)
    ready = (
        checks["database"] == "ok"
        and checks["supervisor"] != "not running"
        and all(state == "ok" for state in checks["devices"].values())
    )
    body = {"status": "ready" if ready else "not ready", "checks": checks, "time": time.time()}
    return JSONResponse(body, status_code=200 if ready else 503)


def _devices(configured: list[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    wants_cuda = any(device.startswith("cuda") for device in configured)
    count = 0
    if wants_cuda:
        import torch

        count = torch.cuda.device_count()
    for device in configured:
        if device.startswith("cuda:"):
            index = int(device.split(":", 1)[1])
            seen[device] = "ok" if index < count else "missing"
        else:
            seen[device] = "ok"
    return seen


@router.get("/metrics", response_class=Response, responses=error_responses(401))
def metrics(context: Context, owner: Owner) -> Response:
    """Prometheus text: jobs by status, queue depth, request latency by route."""
    return Response(context.metrics.render(), media_type="text/plain; version=0.0.4")
