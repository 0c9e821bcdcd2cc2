"""Typed dependencies of the routes: the control plane and the caller's role.

They are ``async``: they never block, and a sync dependency would cost each request a trip to the threadpool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.control import ControlPlane

bearer = HTTPBearer(auto_error=False, description="an API token: read-only or read-write")


async def get_control(request: Request) -> ControlPlane:
    return request.app.state.control


ControlDep = Annotated[ControlPlane, Depends(get_control)]


async def role(control: ControlDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    found = control.tokens.role(credentials.credentials)
    if found is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


async def require_write(caller: Annotated[str, Depends(role)]) -> str:
    if caller != "write":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token may only read")
    return caller


Reader = Depends(role)
Writer = Depends(require_write)
