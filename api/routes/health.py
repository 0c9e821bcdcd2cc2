"""Liveness, readiness and Prometheus metrics (no token needed: probes and scrapers call these), and the audit
log of writes (admin tokens only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Admin, ControlDep
from api.schemas import AuditPublic, AuditsPublic, Health, Page, Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Health}})
def readyz(control: ControlDep, response: Response) -> Health:
    """The database and the Ray cluster's Jobs API are reachable."""
    problems = control.ready()
    if problems:
        response.status_code = 503
        return Health(status="unavailable", problems=problems)
    return Health(status="ok")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics() -> Response:
    """Prometheus metrics: requests, latencies, generations by stage, jobs submitted."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/audit", responses={401: {"model": Problem}, 403: {"model": Problem}})
def audit(control: ControlDep, caller: Admin, query: Annotated[Page, Query()]) -> AuditsPublic:
    """Every write through the API, newest first: who, when, what (admin tokens only)."""
    rows, count = control.store.audit_log(offset=query.offset, limit=query.limit)
    return AuditsPublic(data=[AuditPublic.model_validate(r, from_attributes=True) for r in rows], count=count)
