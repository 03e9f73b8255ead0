"""The operations routes, installed on the API by app.build_app with one call (docs/API.md):
GET /metrics and /v1/metrics (metrics.py), GET /v1/vms/{vm_id}/stats (vmstats.py), /v1/images
(images.py), /v1/integrity/policy (policyapi.py). Each module holds its own routes; this only lists them."""

from __future__ import annotations

from typing import Any

__all__ = ["install"]


def install(api: Any, router: Any, daemon: Any) -> None:
    from bulkhead.daemon import images, metrics, policyapi, vmstats

    for mod in (metrics, vmstats, images, policyapi):
        mod.register_routes(router, daemon)
    metrics.register_routes(api, daemon, include_in_schema=False)  # Prometheus' default path, same checks
