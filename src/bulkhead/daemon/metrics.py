"""Observability of the daemon: per-request logs and Prometheus metrics (docs/API.md "Logs and metrics").

`Observe` is an ASGI middleware around the Gate (app.py): it times every request, then writes one
`bulkhead.request` log line (principal, method, route template, status, latency; logsetup.py) and counts it
in the daemon's metrics. The route is the matched template (`/v1/vms/{vm_id}`), never the raw path, so
neither the logs' nor the metrics' label set grows with ids a client makes up.

`GET /v1/metrics` serves the Prometheus text exposition format (version 0.0.4) behind the same mTLS and
the Gate's audit, with its own RBAC action `metrics/read` at `/` (docs/RBAC.md). The registry is per
daemon (never prometheus_client's global one). Exposed families:

- `bulkhead_api_requests_total{method,route,status}`, `bulkhead_api_request_duration_seconds{method,route}`;
- `bulkhead_vms{state}`;
- per VM (labels vm, name, tenant): `bulkhead_vm_exits_total{vcpu}`, `bulkhead_vm_device_io_bytes_total
  {device,direction}`, `bulkhead_vm_virtqueue_faults_total{device,reason}`, `bulkhead_vm_throttled_total
  {device,direction}`, `bulkhead_vm_contained_accesses_total{bus,op}`: the worker's counters (the
  `stats` message of sandbox/protocol.py, the same counters as `bulkhead run --stats`; untrusted
  diagnostics, daemon/vmstats.py);
- `bulkhead_audit_records`, `bulkhead_audit_appends_total` (since this daemon started),
  `bulkhead_audit_verify_ok` and `bulkhead_audit_verify_age_seconds` (a full verification of the files,
  at most once a minute, by the scrape that finds the last one old);
- `bulkhead_host_trusted`, `bulkhead_attestation_age_seconds` (NaN before the first success),
  `bulkhead_attestation_failures_total`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bulkhead.daemon.logsetup import request_logger
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import ReqCtx

__all__ = ["CONTENT_TYPE", "Metrics", "Observe", "metrics_routes"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VERIFY_EVERY_S = 60.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_VM_STATES = ("stopped", "running", "paused", "exited", "lost")


class Metrics:
    """The daemon's registry: request counters and histograms, plus a collector that reads the daemon's
    state at scrape time. `Daemon.metrics` (built in Daemon.__init__; `daemon` is the Daemon: its core,
    backend and current integrity gate are read at scrape time)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        disable_created_metrics()  # type: ignore[no-untyped-call] # no `_created` series: they double every family for no operator use
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("bulkhead_api_requests", "API requests by method, route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("bulkhead_api_request_duration_seconds", "API request latency",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.audit_size_at_start = _audit_size(daemon)
        self._verify: tuple[float, bool] | None = None  # (monotonic time, ok)
        self._verify_lock = threading.Lock()
        self.registry.register(_StateCollector(self))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def scrape(self, ctx: ReqCtx) -> bytes:
        """GET /metrics: authorized as `metrics/read` at `/` (403 otherwise), then rendered."""
        self.daemon.core.authorize(ctx, "metrics/read", "/", visible=lambda: True)
        return self.render()

    def audit_verified(self) -> tuple[bool | None, float | None]:
        """(ok, age in s) of the last full verification of the audit files; runs one when the last is old."""
        with self._verify_lock:
            now = time.monotonic()
            if self._verify is None or now - self._verify[0] >= VERIFY_EVERY_S:
                self._verify = (now, _verify_audit(self.daemon))
            return self._verify[1], now - self._verify[0]


def _audit_size(daemon: Any) -> int:
    try:
        return int(daemon.audit.size)
    except Exception:
        return 0


def _verify_audit(daemon: Any) -> bool:
    """verify_files over the daemon's own audit files with its own verifier key (docs/AUDIT.md)."""
    from bulkhead.daemon.auditlog import load_verifier, verify_files

    root = daemon.core.paths.state_dir
    try:
        verifier = load_verifier(root / "audit.vkey", daemon.audit.path)
        return bool(verify_files(daemon.audit.path, verifier, root / "audit.checkpoint").ok)
    except Exception:
        return False


class _StateCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        d = self.m.daemon
        yield from _vm_families(d)
        size = _audit_size(d)
        g = GaugeMetricFamily("bulkhead_audit_records", "records in the audit log (its tree size)")
        g.add_metric([], size)
        yield g
        c = CounterMetricFamily("bulkhead_audit_appends", "audit records appended since this daemon started")
        c.add_metric([], max(0, size - self.m.audit_size_at_start))
        yield c
        ok, age = self.m.audit_verified()
        g = GaugeMetricFamily("bulkhead_audit_verify_ok", "1 when the last full verification of the audit files passed")
        g.add_metric([], 1.0 if ok else 0.0)
        yield g
        g = GaugeMetricFamily("bulkhead_audit_verify_age_seconds", "seconds since that verification")
        g.add_metric([], age if age is not None else math.nan)
        yield g
        yield from _integrity_families(d)


def _integrity_families(d: Any) -> Iterator[Metric]:
    try:
        st = d.integrity.status()
    except Exception:
        st = {"state": "untrusted", "last_success_age_s": None, "failures": 0}
    g = GaugeMetricFamily("bulkhead_host_trusted", "1 when the host's integrity gate says trusted")
    g.add_metric([], 1.0 if st.get("state") == "trusted" else 0.0)
    yield g
    age = st.get("last_success_age_s")
    g = GaugeMetricFamily("bulkhead_attestation_age_seconds", "seconds since the last successful attestation")
    g.add_metric([], float(age) if isinstance(age, int | float) else math.nan)
    yield g
    c = CounterMetricFamily("bulkhead_attestation_failures", "failed attestation rounds")
    c.add_metric([], float(st.get("failures") or 0))
    yield c


def _vm_families(d: Any) -> Iterator[Metric]:
    from bulkhead.daemon.vmstats import summarize, vm_counters

    rows = d.store.q("SELECT v.id, v.name, v.state, t.name AS tenant_name FROM vms v "
                     "LEFT JOIN tenants t ON t.id = v.tenant ORDER BY v.created")
    by_state = dict.fromkeys(_VM_STATES, 0)
    for r in rows:
        by_state[r["state"]] = by_state.get(r["state"], 0) + 1
    g = GaugeMetricFamily("bulkhead_vms", "VMs by state", labels=["state"])
    for state, n in sorted(by_state.items()):
        g.add_metric([state], n)
    yield g
    base = ["vm", "name", "tenant"]
    exits = CounterMetricFamily("bulkhead_vm_exits", "vCPU exits to the VMM", labels=[*base, "vcpu"])
    io = CounterMetricFamily("bulkhead_vm_device_io_bytes", "device I/O bytes", labels=[*base, "device", "direction"])
    faults = CounterMetricFamily("bulkhead_vm_virtqueue_faults", "contained virtqueue faults by reason",
                                 labels=[*base, "device", "reason"])
    thr = CounterMetricFamily("bulkhead_vm_throttled", "rate-limiter throttling events",
                              labels=[*base, "device", "direction"])
    contained = CounterMetricFamily("bulkhead_vm_contained_accesses", "guest accesses to unclaimed I/O (contained)",
                                    labels=[*base, "bus", "op"])
    for r in rows:
        counters = vm_counters(d.backend, r["id"])
        if counters is None:
            continue
        s = summarize(counters)
        lab = [r["id"], r["name"], r["tenant_name"] or ""]
        for i, n in enumerate(s["exits"]):
            exits.add_metric([*lab, str(i)], n)
        for dev, dirs in s["io_bytes"].items():
            for direction, n in dirs.items():
                io.add_metric([*lab, dev, direction], n)
        for dev, reasons in s["virtqueue_faults"].items():
            for reason, n in reasons.items():
                faults.add_metric([*lab, dev, reason], n)
        for dev, dirs in s["throttled"].items():
            for direction, n in dirs.items():
                thr.add_metric([*lab, dev, direction], n)
        for bus, ops in s["contained_accesses"].items():
            for op, n in ops.items():
                contained.add_metric([*lab, bus, op], n)
    yield from (exits, io, faults, thr, contained)


class Observe:
    """ASGI middleware outside the Gate: one log line and one metrics observation per HTTP request."""

    def __init__(self, app: Any, metrics: Callable[[], Metrics]) -> None:
        self.inner = app  # the Gate
        self.app = getattr(app, "app", app)  # the FastAPI app, for introspection (openapi), as on the Gate
        self.metrics = metrics  # the daemon's (found at request time: an app built for its schema has none)
        self.log = request_logger()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_wrapper(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.inner(scope, receive, send_wrapper)
        finally:
            self._record(scope, status or 500, time.perf_counter() - start)

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"
        method = str(scope.get("method", ""))
        ctx = scope.get("bulkhead.ctx")
        principal = ctx.caller.name if ctx is not None else "-"
        try:
            self.metrics().observe(method, route, status, seconds)
        except Exception as exc:  # metrics must never fail a request
            self.log.warning("metrics-error", extra={"fields": {"error": str(exc)}})
        fields = {"principal": principal, "method": method, "route": route, "status": status,
                  "latency_ms": round(seconds * 1000, 3)}
        if ctx is not None:
            fields["request_id"] = ctx.request_id
            if ctx.decision:
                fields["decision"] = ctx.decision
        self.log.info("request", extra={"fields": fields})


def metrics_routes(metrics: Callable[[], Metrics]) -> list[APIRouter]:
    """GET /v1/metrics, and GET /metrics (Prometheus' default path, same checks, not in the schema)."""
    summary = "Prometheus metrics (text exposition format 0.0.4); RBAC action metrics/read at /"

    def endpoint(ctx: ReqCtx = Ctx) -> Response:
        return Response(metrics().scrape(ctx), media_type=CONTENT_TYPE)

    v1, root = router(), APIRouter()
    v1.add_api_route("/metrics", endpoint, methods=["GET"], response_class=Response, name="metrics",
                     summary=summary, responses={200: {"content": {"text/plain": {}}}})
    root.add_api_route("/metrics", endpoint, methods=["GET"], response_class=Response, name="metrics_root",
                       include_in_schema=False)
    return [v1, root]
