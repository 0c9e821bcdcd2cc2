"""Liveness, readiness and Prometheus metrics (no token needed: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ControlDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Health}})
def readyz(control: ControlDep) -> Health:
    """The database and the Ray cluster's Jobs API are reachable."""
    problems = control.ready()
    if problems:
        return JSONResponse(Health(status="unavailable", problems=problems).model_dump(), status_code=503)
    return Health(status="ok")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics() -> Response:
    """Prometheus metrics: requests, latencies, generations by stage, jobs submitted."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
