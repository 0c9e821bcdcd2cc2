"""The FastAPI application: routes, error mapping, request metrics, and the control plane's lifecycle."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client import Histogram

from api import errors
from api.routes import datasets, generations, health
from service.control import ControlPlane

REQUESTS = Histogram("nstudent_http_request_seconds", "HTTP requests by route and status",
                     ["method", "route", "status"])


def create_app(control: ControlPlane) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        control.start()
        yield
        control.stop()

    app = FastAPI(
        title="nstudent",
        summary="Noisy Student pseudo-labeling and dataset curation on Ray",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.control = control
    errors.install(app)
    for module in (generations, datasets, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        REQUESTS.labels(request.method, getattr(route, "path", "unmatched"), response.status_code).observe(
            time.perf_counter() - started
        )
        return response

    return app
