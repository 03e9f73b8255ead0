"""The operations routes (docs/API.md "Operations"), included by app.build_app like every service's:
GET /v1/metrics and /metrics (metrics.py), /v1/images (images.py), /v1/integrity/policy (policyapi.py).
GET /v1/vms/{vm_id}/stats is a VM route (vms.vm_routes, daemon/vmstats.py). Each module declares its own
routes; this only lists them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter

from bulkhead.daemon.images import image_routes
from bulkhead.daemon.metrics import metrics_routes
from bulkhead.daemon.policyapi import policy_routes

if TYPE_CHECKING:
    from bulkhead.daemon.daemon import Daemon

__all__ = ["ops_routes"]


def ops_routes(daemon: Callable[[], Daemon]) -> list[APIRouter]:
    return [*metrics_routes(lambda: daemon().metrics), image_routes(lambda: daemon().core), policy_routes(daemon)]
