"""The daemon's handling of a jailed backend's callbacks, without root: a backend double that behaves like
JailedBackend at its interface (set_hooks, exit_reason, callbacks from another thread). A worker exit is
recorded at once with its reason; a security kind gets exactly one security record whether or not the
worker handle already reported it; a worker that does not answer a status request is never a 500."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from bulkhead.daemon.backend import BackendStatus, FakeBackend
from bulkhead.daemon.testkit import Harness
from bulkhead.errors import HostError
from bulkhead.runtime.exits import EXIT_STATUS, ExitReason
from bulkhead.sandbox.supervisor import WorkerExit


class JailLike(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.exits: dict[str, WorkerExit] = {}
        self.hung = False
        self.on_security: Any = None
        self.on_exit: Any = None

    def set_hooks(self, *, on_security_event: Any = None, on_exit: Any = None) -> None:
        self.on_security, self.on_exit = on_security_event, on_exit

    def exit_reason(self, vm_id: str) -> WorkerExit | None:
        return self.exits.get(vm_id)

    def status(self, vm_id: str) -> BackendStatus:
        if self.hung:
            raise HostError(f"VM {vm_id}: no status reply within 2.0 s")
        return super().status(vm_id)

    def end(self, vm_id: str, kind: str, security_event: bool) -> None:
        """What WorkerHandle._finish does: security hook first (if the handle decided so), then the
        exit, from the worker's reader thread."""
        status = EXIT_STATUS.get(kind, 1)
        result = WorkerExit(ExitReason(kind, status, f"{kind} detail"), security_event, -9)

        def run() -> None:
            if security_event:
                self.on_security(vm_id, kind, f"{kind} detail")
            self.exits[vm_id] = result
            self.exit(vm_id, status)
            self.on_exit(vm_id, result)

        t = threading.Thread(target=run)
        t.start()
        t.join(10)


@pytest.fixture
def h(tmp_path: Path):
    harness = Harness(tmp_path / "s", backend=JailLike())
    yield harness
    harness.close()


@pytest.mark.parametrize("kind, reported, security_records", [
    ("seccomp-kill", True, 1),        # the handle reported it: not recorded a second time
    ("protocol-violation", True, 1),
    ("worker-crash", False, 1),       # not reported by the handle: the daemon records it
    ("oom-kill", False, 1),
    ("poweroff", False, 0),           # a guest reason: no security record
])
def test_worker_exits_are_recorded_once_with_their_reason(h, kind, reported, security_records):
    t = h.tenant("acme")
    vm = h.vm(t, "v")
    with h.client() as c:
        assert c.post(f"/v1/vms/{vm}/start").status_code == 200
        h.backend.end(vm, kind, reported)
        row = h.daemon.store.q1("SELECT state, exit_status FROM vms WHERE id = ?", (vm,))
        assert (row["state"], row["exit_status"]) == ("exited", EXIT_STATUS.get(kind, 1))  # no read needed
        events = c.get(f"/v1/vms/{vm}/events").json()
        assert events[-1]["event"] == "exited"
        assert json.loads(events[-1]["detail"])["reason"] == kind
        recs = c.get("/v1/audit", params={"vm": vm}).json()
        exits = [r for r in recs if r["action"] == "vm.exit"]
        assert len(exits) == 1 and json.loads(exits[0]["detail"])["reason"] == kind
        sec = [r for r in recs if r["action"] == f"security/{kind}"]
        assert len(sec) == security_records
        assert all(r["scope"] == f"/tenants/{t}/vms/{vm}" for r in sec)
        c.get(f"/v1/vms/{vm}")  # a later read does not record it again
        h.daemon.monitor_once()
        assert len([r for r in c.get("/v1/audit", params={"vm": vm}).json() if r["action"] == "vm.exit"]) == 1


def test_a_requested_stop_records_the_interrupted_reason(h):
    t = h.tenant("acme")
    vm = h.vm(t, "v")
    with h.client() as c:
        c.post(f"/v1/vms/{vm}/start")
        h.backend.exits[vm] = WorkerExit(ExitReason("interrupted", 130, "stopped by the host"), False, 130)
        assert c.post(f"/v1/vms/{vm}/stop").json()["state"] == "stopped"
        detail = json.loads(c.get(f"/v1/vms/{vm}/events").json()[-1]["detail"])
        assert detail["reason"] == "interrupted"


def test_a_worker_that_does_not_answer_is_not_a_500(h):
    t = h.tenant("acme")
    vm = h.vm(t, "v")
    with h.client() as c:
        c.post(f"/v1/vms/{vm}/start")
        h.backend.hung = True
        r = c.get(f"/v1/vms/{vm}")
        assert r.status_code == 200 and r.json()["state"] == "running"
        assert [v["state"] for v in c.get("/v1/vms").json()] == ["running"]
        h.daemon.monitor_once()


def test_exits_during_shutdown_are_left_to_the_restart_policy(tmp_path):
    backend = JailLike()
    h = Harness(tmp_path / "s", backend=backend)
    t = h.tenant("acme")
    vm = h.vm(t, "v")
    with h.client() as c:
        c.post(f"/v1/vms/{vm}/start")
    h.daemon._closing = True  # what close() sets before it stops the backend
    backend.end(vm, "interrupted", False)
    assert h.daemon.store.q1("SELECT state FROM vms WHERE id = ?", (vm,))["state"] == "running"
    h.close()
    h = Harness(tmp_path / "s", backend=JailLike())
    try:
        assert h.daemon.store.q1("SELECT state FROM vms WHERE id = ?", (vm,))["state"] == "lost"
    finally:
        h.close()


def test_worker_security_events_are_audited(h):
    t = h.tenant("acme")
    vm = h.vm(t, "v")
    h.backend.on_security(vm, "worker:device-reset", "virtio-net queue reset")
    with h.client() as c:
        recs = [r for r in c.get("/v1/audit", params={"vm": vm}).json() if r["kind"] == "security"]
    assert [r["action"] for r in recs] == ["security/worker:device-reset"]
    assert json.loads(recs[0]["detail"]) == {"detail": "virtio-net queue reset", "source": "jailed worker"}


def test_backend_choice_and_the_unjailed_warning(monkeypatch, capsys):
    import os

    from bulkhead.daemon.backend import ProcessBackend, make_backend
    from bulkhead.errors import ConfigError
    from bulkhead.sandbox.backend import JailedBackend

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert isinstance(make_backend("auto"), JailedBackend)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert isinstance(make_backend("auto"), ProcessBackend)  # not root: unjailed, and it says so
    assert "WARNING: VMs run WITHOUT the jail" in capsys.readouterr().err
    assert isinstance(make_backend("process"), ProcessBackend)
    assert "WITHOUT the jail" in capsys.readouterr().err
    with pytest.raises(HostError, match="needs root"):
        make_backend("jail")
    with pytest.raises(ConfigError, match="backend must be one of"):
        make_backend("qemu")
    assert isinstance(make_backend("fake"), FakeBackend)


def test_serve_network_options():
    import argparse

    from bulkhead.daemon.cli import _network_service
    from bulkhead.daemon.networks import DryNetworkService
    from bulkhead.errors import ConfigError
    from bulkhead.network.service import NetworkService

    def ns(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"network": None, "backend": "auto", "net_prefix": "bh", **kw})

    assert isinstance(_network_service(ns(backend="fake")), DryNetworkService)
    real = _network_service(ns())
    assert type(real) is NetworkService and real.config.prefix == "bh"
    assert type(_network_service(ns(backend="fake", network="host", net_prefix="t1"))) is NetworkService
    assert isinstance(_network_service(ns(network="dry")), DryNetworkService)
    with pytest.raises(ConfigError, match="network prefix"):
        _network_service(ns(net_prefix="Bad-prefix"))
