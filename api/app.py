"""The FastAPI application: routes, error mapping, request metrics, and the control plane's lifecycle."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Histogram

from api import errors
from api.routes import datasets, generations, health
from service.control import ControlPlane

REQUESTS = Histogram("nstudent_http_request_seconds", "HTTP requests by route and status",
                     ["method", "route", "status"])


class RequestMetrics:
    """Latency by route template and status (a plain ASGI middleware: no per-request task or body copy)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, status[0]).observe(time.perf_counter() - started)


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
    app.state.generation_cache = generations.ResponseCache()
    control.store.listeners.append(app.state.generation_cache.invalidate)
    errors.install(app)
    for module in (generations, datasets, health):
        app.include_router(module.router)

    app.add_middleware(RequestMetrics)
    return app
