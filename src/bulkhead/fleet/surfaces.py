"""The fleet controller's own API routes as attack surfaces (the host API's routes it also serves are
declared by bulkhead.daemon.surfaces). Records read from etcd are covered in docs/FLEET.md: every one
is decoded with fleet.model.decode (malformed = absent), and a host's evidence is only ever verified."""

from __future__ import annotations

__all__ = ["declare_surfaces"]

ROUTES = (("GET", "/v1/hosts", "host_list"), ("POST", "/v1/hosts/{host}/drain", "host_drain"),
          ("POST", "/v1/hosts/{host}/undrain", "host_undrain"))


def declare_surfaces() -> None:
    from bulkhead.daemon.app import MAX_BODY
    from bulkhead.surface import declare

    for method, path, op in ROUTES:
        declare("api-route", f"{method} {path} (fleet)", owner="bulkhead.fleet.api", boundary="client-daemon",
                accepts=f"an mTLS-authenticated request to the fleet controller, body <= {MAX_BODY} bytes; "
                "host ids validated (a-z, 0-9, -); RBAC host/read or host/drain at /, audited",
                operation=op, fuzz="fuzz/fuzz_fleet_records.py")
