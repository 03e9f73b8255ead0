"""The management API's routes as attack surfaces, generated from the served OpenAPI document so the
inventory cannot drift from the code (kept apart from app.py so declaring them needs no running daemon)."""

from __future__ import annotations

__all__ = ["declare_surfaces"]


def declare_surfaces() -> None:
    from bulkhead.daemon.app import MAX_BODY, openapi_document
    from bulkhead.surface import declare

    doc = openapi_document(None)
    for path, ops in sorted(doc.get("paths", {}).items()):
        for method in sorted(ops):
            if method.lower() not in ("get", "post", "put", "patch", "delete"):
                continue
            declare(
                "api-route",
                f"{method.upper()} {path}",
                owner="bulkhead.daemon.app",
                boundary="client-daemon",
                accepts=f"an mTLS-authenticated request (or root on the local socket), body <= {MAX_BODY} bytes "
                "validated by pydantic; RBAC-authorized, 404 outside the caller's scopes, audited",
                fuzz="fuzz/fuzz_api_models.py",
                operation=str(ops[method].get("operationId", "")),
            )
