"""Typed dependencies of the routes: the control plane and the calling principal, checked for a role.

They are ``async``: they never block, and a sync dependency would cost each request a trip to the threadpool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.control import ControlPlane
from service.principals import Principal, Role

bearer = HTTPBearer(auto_error=False, description="an API token of a principal: read, write or admin")


async def get_control(request: Request) -> ControlPlane:
    return request.app.state.control


ControlDep = Annotated[ControlPlane, Depends(get_control)]


async def caller(
    control: ControlDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    found = control.principals.find(credentials.credentials)
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return found


async def writer(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    if principal.role < Role.WRITE:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token may only read")
    return principal


async def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    if principal.role < Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin token")
    return principal


# The caller, checked for each role: a route takes the one it needs as a parameter.
Reader = Annotated[Principal, Depends(caller)]
Writer = Annotated[Principal, Depends(writer)]
Admin = Annotated[Principal, Depends(admin)]
