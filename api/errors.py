"""Service errors to HTTP statuses, in one place. No response ever carries a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from curation.storage import StorageUnavailable
from service.errors import Conflict, InvalidRequest, NotFound, Unavailable
from service.failures import LOG_LINE, one_line
from service.jobs import RayUnavailable
from service.store import DatabaseUnavailable

log = logging.getLogger(__name__)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette names the methods of the first matching route only; a path served by several routes
            # (GET and POST /generations) allows all of theirs.
            methods = sorted(
                {
                    m
                    for r in app.router.routes
                    if r.matches(request.scope)[0] != Match.NONE
                    for m in getattr(r, "methods", None) or ()
                }
            )
            return JSONResponse({"detail": e.detail}, e.status_code, headers={"Allow": ", ".join(methods)})
        return await http_exception_handler(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid_fields(_: Request, e: RequestValidationError) -> JSONResponse:
        # Where and what, without echoing the input back: it may be huge, or NaN, which JSON cannot carry.
        detail = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(InvalidRequest)
    async def invalid(_: Request, e: InvalidRequest) -> JSONResponse:
        # The same shape as FastAPI's own validation errors, so clients parse one format.
        detail = [{"loc": ["body", e.field], "msg": e.message, "type": "invalid_source"}]
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, e: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status.HTTP_404_NOT_FOUND)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, e: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status.HTTP_409_CONFLICT)

    @app.exception_handler(Unavailable)
    @app.exception_handler(RayUnavailable)
    async def unavailable(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e).split("\n", 1)[0]}, status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(StorageUnavailable)
    async def dependency_down(request: Request, e: Exception) -> JSONResponse:
        what = "the database" if isinstance(e, DatabaseUnavailable) else "the object store"
        log.warning("%s %s: %s is not reachable: %s", request.method, request.url.path, what, one_line(e, LOG_LINE))
        return JSONResponse(
            {"detail": f"{what} is not reachable; try again shortly"},
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"detail": "internal error; the server log has the details"}, status.HTTP_500_INTERNAL_SERVER_ERROR
        )
