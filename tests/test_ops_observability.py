"""Issue 19, operations: /metrics (parsed by the Prometheus text parser, over real mTLS, its own RBAC
action), one structured log line per request, per-VM stats (API and `bulkhead vm stats`), and a real
guest's counters arriving from its jailed worker."""

from __future__ import annotations

import io
import json
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkhead.daemon.logsetup import configure
from bulkhead.daemon.testkit import Harness, ServerThread

COUNTERS = {  # the nested shape of `bulkhead run --stats` (runtime/stats.py machine_stats)
    "vcpu_exits": [41, 7],
    "pio_unclaimed": {"reads": 3, "writes": 2},
    "mmio_unclaimed": {"reads": 1, "writes": 0},
    "devices": {
        "virtio-blk0": {"read_bytes": 8192, "write_bytes": 512, "fault.desc-chain-loop": 1, "notifies": 9},
        "virtio-net-tap0": {"rx_bytes": 100, "tx_bytes": 60, "rx_throttled": 4, "tx_throttled": 1},
    },
}


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam: Any, suffix: str = "", **labels: str) -> float:
    for s in fam.samples:
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {fam.name}{suffix} {labels}")


def _ctx(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path / "s")
    yield h
    h.close()


def test_metrics_over_mtls_parse_and_need_their_own_permission(harness: Harness) -> None:
    h = harness
    t = h.tenant("acme")
    vm = h.vm(t, "web")
    h.backend.counters[vm] = COUNTERS  # type: ignore[attr-defined]
    mon = h.principal("prom", ("Monitoring Reader", "/"))
    op = h.principal("operator", ("VM Operator", "/"))
    tenant_reader = h.principal("tr", ("Reader", f"/tenants/{t}"))
    with ServerThread(h, unix=False) as srv:
        with httpx.Client(base_url=srv.url, verify=_ctx(mon.cert_path, mon.key_path, h.sd.ca_cert)) as c:
            assert c.get("/v1/whoami").status_code == 200
            r = c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert c.get("/v1/metrics").status_code == 200
        fams = _families(r.text)
        for who in (op, tenant_reader):  # the attack: scrape without metrics/read at / -> 403, nothing disclosed
            with httpx.Client(base_url=srv.url, verify=_ctx(who.cert_path, who.key_path, h.sd.ca_cert)) as c:
                denied = c.get("/metrics")
                assert denied.status_code == 403 and "bulkhead_vm" not in denied.text
    assert _value(fams["bulkhead_api_requests"], "_total", method="GET", route="/v1/whoami", status="200") == 1
    assert _value(fams["bulkhead_api_request_duration_seconds"], "_count", method="GET", route="/v1/whoami") == 1
    assert _value(fams["bulkhead_vms"], state="stopped") == 1
    assert _value(fams["bulkhead_vms"], state="running") == 0
    lab = {"vm": vm, "name": "web", "tenant": "acme"}
    assert _value(fams["bulkhead_vm_exits"], "_total", vcpu="0", **lab) == 41
    assert _value(fams["bulkhead_vm_device_io_bytes"], "_total", device="virtio-blk0", direction="read", **lab) == 8192
    assert _value(fams["bulkhead_vm_device_io_bytes"], "_total", device="virtio-net-tap0", direction="tx", **lab) == 60
    assert _value(fams["bulkhead_vm_virtqueue_faults"], "_total", reason="desc-chain-loop", **lab) == 1
    assert _value(fams["bulkhead_vm_throttled"], "_total", direction="rx", **lab) == 4
    assert _value(fams["bulkhead_vm_contained_accesses"], "_total", bus="pio", op="read", **lab) == 3
    assert _value(fams["bulkhead_audit_records"]) > 0
    assert _value(fams["bulkhead_audit_appends"], "_total") >= 2  # tenant + VM creation at least
    assert _value(fams["bulkhead_audit_verify_ok"]) == 1
    assert _value(fams["bulkhead_host_trusted"]) == 0  # the harness runs with the gate off
    assert str(_value(fams["bulkhead_attestation_age_seconds"])) == "nan"
    with h.client() as c:  # the denials were audited like every request
        recs = c.get("/v1/audit", params={"limit": 1000}).json()
    assert [r for r in recs if r["action"] == "metrics/read" and r["decision"] == "deny" and r["result"] == "403"]


def test_one_structured_log_line_per_request(harness: Harness) -> None:
    buf = io.StringIO()
    configure("logfmt", stream=buf)
    try:
        h = harness
        bob = h.principal("bob")
        with h.client() as c:
            assert c.get("/v1/tenants").status_code == 200
        with h.client(bob) as c:
            assert c.get("/v1/vms/00000000-0000-4000-8000-000000000000").status_code == 404
        lines = [ln for ln in buf.getvalue().splitlines() if "event=request" in ln]
        assert len(lines) == 2
        assert "principal=root@local" in lines[0] and "route=/v1/tenants" in lines[0] and "status=200" in lines[0]
        assert "route=/v1/vms/{vm_id}" in lines[1] and "status=404" in lines[1] and "principal=bob" in lines[1]
        assert all("latency_ms=" in ln and "request_id=" in ln for ln in lines)
        configure("json", stream=(jbuf := io.StringIO()))
        with h.client() as c:
            c.get("/v1/whoami")
        rec = json.loads(jbuf.getvalue().splitlines()[-1])
        assert rec["event"] == "request" and rec["status"] == 200 and rec["route"] == "/v1/whoami"
    finally:
        configure("logfmt")
        logging.getLogger("bulkhead").handlers.clear()


def test_log_values_cannot_forge_a_line() -> None:
    buf = io.StringIO()
    configure("logfmt", stream=buf)
    try:
        from bulkhead.daemon.logsetup import lifecycle

        lifecycle("vm.state", name='evil\nts=0 level=info event=request principal="admin"')
        out = buf.getvalue()
        assert out.count("\n") == 1 and out.endswith("\n") and "name=\"evil\\\\nts=0" in out
    finally:
        logging.getLogger("bulkhead").handlers.clear()


def test_vm_stats_api_and_cli(harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    h = harness
    t = h.tenant("acme")
    vm = h.vm(t, "web")
    other = h.vm(h.tenant("other"), "x")
    eve = h.principal("eve", ("Reader", f"/tenants/{t}"))
    with h.client() as c:
        r = c.get(f"/v1/vms/{vm}/stats").json()
        assert r["available"] is False and r["tenant_name"] == "acme"
    h.backend.counters[vm] = COUNTERS  # type: ignore[attr-defined]
    with h.client(eve) as c:
        r = c.get(f"/v1/vms/{vm}/stats").json()
        assert r["exits_total"] == 48 and r["io_bytes"]["virtio-blk0"] == {"read": 8192, "write": 512}
        assert c.get(f"/v1/vms/{other}/stats").status_code == 404  # another tenant's VM: invisible
    with ServerThread(h) as srv:
        from bulkhead.daemon.cli import vm_main

        common = ["--socket", str(h.sd.socket)]
        assert srv.port
        assert vm_main(["stats", "web", *common]) == 0
        out = capsys.readouterr().out
        assert "exits            48 (vcpu0 41, vcpu1 7)" in out and "virtio-blk0: read 8192, write 512" in out
        assert "None" not in out and "{" not in out
        assert vm_main(["stats", "web", "--json", *common]) == 0
        assert json.loads(capsys.readouterr().out)["counters"]["vcpu_exits"] == [41, 7]


def _wait_state(c: Any, vm: str, state: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while c.get(f"/v1/vms/{vm}").json()["state"] != state:
        assert time.monotonic() < end, state
        time.sleep(0.05)


@pytest.mark.root
@pytest.mark.kvm
@pytest.mark.timeout(240)
def test_a_real_guests_counters_come_from_its_jailed_worker(tmp_path: Path) -> None:
    """The `unclaimed` payload touches I/O nobody claims (contained, counted) and ends; the `echo` payload
    polls COM1 for a few seconds: its counters are read from the running worker and grow."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vmrun import payload

    from bulkhead.daemon.backend import make_backend

    h = Harness(tmp_path / "s", backend=make_backend("jail"))
    try:
        for name in ("unclaimed", "echo"):
            (h.root / "images" / name).write_bytes(payload(name).read_bytes())
        t = h.tenant("real")
        with h.client() as c:
            vm = c.post("/v1/vms", json={"tenant": t, "name": "g", "kernel": "unclaimed", "mem_mib": 16}).json()["id"]
            assert c.get(f"/v1/vms/{vm}/stats").json()["available"] is False
            assert c.post(f"/v1/vms/{vm}/start").status_code == 200
            _wait_state(c, vm, "exited")
            st = c.get(f"/v1/vms/{vm}/stats").json()
            assert st["available"] and st["exits_total"] >= 1, st
            assert st["contained_accesses"]["pio"]["read"] >= 6 and st["contained_accesses"]["pio"]["write"] >= 6, st
            fams = _families(c.get("/metrics").text)
            assert _value(fams["bulkhead_vm_exits"], "_total", vm=vm, vcpu="0") == st["exits"][0]
            assert _value(fams["bulkhead_vm_contained_accesses"], "_total", vm=vm, bus="pio", op="read") >= 6
            assert _value(fams["bulkhead_vms"], state="exited") == 1

            live = c.post("/v1/vms", json={"tenant": t, "name": "e", "kernel": "echo", "mem_mib": 16}).json()["id"]
            assert c.post(f"/v1/vms/{live}/start").status_code == 200
            samples = []
            while (s := c.get(f"/v1/vms/{live}/stats").json())["state"] == "running" and len(samples) < 3:
                if s["available"]:
                    samples.append(s["exits_total"])
                time.sleep(0.2)
            assert len(samples) >= 2 and samples[-1] > samples[0], samples  # read from the running worker
            c.post(f"/v1/vms/{live}/stop")
    finally:
        h.close()
