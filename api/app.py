"""The FastAPI application: routes, error mapping, request metrics, and the control plane's lifecycle."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Histogram

from api import errors
from api.routes import datasets, generations, health, ui
from service.control import ControlPlane

REQUESTS = Histogram(
    "nstudent_http_request_seconds", "HTTP requests by route and status", ["method", "route", "status"]
)


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


# The largest request body: a generation's request is a few KB; anything near this is a mistake or an attack.
MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """413 for a body over ``MAX_BODY_BYTES``, whether it says its length or streams chunks, before any of it is
    parsed or stored."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _too_large(send)
        seen, answered = 0, False

        async def limited_receive():
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES and not answered:
                    # Answer now, and tell the app the client left: it stops reading and its answer is dropped.
                    answered = True
                    await _too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not answered:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _too_large(send) -> None:
    body = json.dumps({"detail": f"the request body is over {MAX_BODY_BYTES} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
    for module in (generations, datasets, health, ui):
        app.include_router(module.router)

    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)
    return app
