"""What every service's routes share: the `/v1` router with the documented error responses, and the
request context the Gate put in the ASGI scope (docs/API.md "Resources"). Each service module declares
its own routes with `router()`; app.build_app only includes them behind the Gate."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from bulkhead.control.models import ErrorOut
from bulkhead.daemon.service import ReqCtx

__all__ = ["ERRORS", "Ctx", "ctx_of", "router"]

_ERR = {"model": ErrorOut}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _ERR, 403: _ERR, 404: _ERR, 409: _ERR, 413: _ERR, 503: _ERR,
}


def ctx_of(request: Request) -> ReqCtx:
    ctx: ReqCtx = request.scope["bulkhead.ctx"]
    return ctx


Ctx = Depends(ctx_of)


def router() -> APIRouter:
    """A service's router: under /v1, with the error responses every operation may give."""
    return APIRouter(prefix="/v1", responses=ERRORS)
