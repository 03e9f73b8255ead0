"""What every service's routes share: the `/v1` router with the documented error responses, and the
request context the Gate put in the ASGI scope (docs/API.md "Resources"). Each service module declares
its own routes with `router()`; app.build_app only includes them behind the Gate."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as FastPath

from bulkhead.control.models import ErrorOut
from bulkhead.daemon.service import ReqCtx

__all__ = ["ERRORS", "Ctx", "NameRef", "TenantRefQuery", "ctx_of", "router"]

_ERR = {"model": ErrorOut}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _ERR, 403: _ERR, 404: _ERR, 409: _ERR, 413: _ERR, 503: _ERR,
}


# A path segment naming a tenant or principal by id or by name (the API takes names where the CLI does;
# Core.tenant_ref / principal_ref resolve it, an unknown or invisible name gets the 404 of an unknown id).
NameRef = Annotated[str, FastPath(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@-]*$")]
# The same for the `?tenant=` query of the VM list.
TenantRefQuery = Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def ctx_of(request: Request) -> ReqCtx:
    ctx: ReqCtx = request.scope["bulkhead.ctx"]
    return ctx


Ctx = Depends(ctx_of)


def router() -> APIRouter:
    """A service's router: under /v1, with the error responses every operation may give."""
    return APIRouter(prefix="/v1", responses=ERRORS)
