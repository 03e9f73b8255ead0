"""Authorization through the API: per-role VM endpoint matrix (hand-written expected statuses), tenant
isolation (404 not 403, filtered lists, disks only within a tenant), nobody grants what they do not
hold, scoped audit reading, and the audit record of every request."""

from __future__ import annotations

import uuid

import pytest

from bulkhead.daemon.testkit import Harness

OPS = ["get", "console", "events", "start", "pause", "resume", "stop", "delete"]
# Hand-written: statuses for a principal holding the role at the VM's tenant, ops applied in order.
OWN_TENANT = {
    "Owner": [200, 200, 200, 200, 200, 200, 200, 204],
    "Contributor": [200, 200, 200, 200, 200, 200, 200, 204],
    "Reader": [200, 403, 200, 403, 403, 403, 403, 403],
    "VM Operator": [200, 200, 403, 200, 403, 403, 200, 403],
    "Auditor": [404] * 8,
}


def _call(c, vm_id: str, op: str):
    if op == "get":
        return c.get(f"/v1/vms/{vm_id}")
    if op in ("console", "events"):
        return c.get(f"/v1/vms/{vm_id}/{op}")
    if op == "delete":
        return c.delete(f"/v1/vms/{vm_id}")
    return c.post(f"/v1/vms/{vm_id}/{op}")


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("authz"))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def tenants(h):
    return h.tenant("acme"), h.tenant("globex")


@pytest.mark.parametrize("role", list(OWN_TENANT))
def test_vm_endpoint_matrix(h, tenants, role):
    t, u = tenants
    who = h.principal(f"m-{role.replace(' ', '')}", (role, f"/tenants/{t}"))
    mine = h.vm(t, f"own-{role.replace(' ', '')}")
    other = h.vm(u, f"other-{role.replace(' ', '')}")
    with h.client(who) as c:
        got = [_call(c, mine, op).status_code for op in OPS]
        assert got == OWN_TENANT[role], list(zip(OPS, got, strict=True))
        # another tenant's VM: indistinguishable from a VM that does not exist
        for op in OPS:
            r1 = _call(c, other, op)
            r2 = _call(c, str(uuid.uuid4()), op)
            assert (r1.status_code, r1.json()) == (404, {"detail": "not found"}) == (r2.status_code, r2.json()), op


def test_vm_scoped_assignment_reaches_only_that_vm(h, tenants):
    t, _ = tenants
    v1, v2 = h.vm(t, "scoped-1"), h.vm(t, "scoped-2")
    op = h.principal("vmop-one", ("VM Operator", f"/tenants/{t}/vms/{v1}"))
    with h.client(op) as c:
        assert c.post(f"/v1/vms/{v1}/start").status_code == 200
        assert c.post(f"/v1/vms/{v2}/start").status_code == 404
        assert [v["id"] for v in c.get("/v1/vms").json()] == [v1]
        assert c.get(f"/v1/tenants/{t}").status_code == 403  # it knows the tenant, may not read it
        assert [x["id"] for x in c.get("/v1/tenants").json()] == [t]
        assert c.post(f"/v1/vms/{v1}/stop").status_code == 200


def test_lists_are_filtered_by_tenant(h, tenants):
    t, u = tenants
    h.vm(u, "hidden-vm")
    owner = h.principal("acme-owner", ("Owner", f"/tenants/{t}"))
    with h.client(owner) as c:
        assert [x["id"] for x in c.get("/v1/tenants").json()] == [t]
        vms = c.get("/v1/vms").json()
        assert vms and all(v["tenant"] == t for v in vms)
        assert c.get("/v1/vms", params={"tenant": u}).json() == []
        assert c.get(f"/v1/tenants/{u}").status_code == 404
        assert c.get(f"/v1/tenants/{uuid.uuid4()}").status_code == 404
        r = c.post("/v1/vms", json={"tenant": u, "name": "intruder", "kernel": "vmlinux"})
        assert (r.status_code, r.json()) == (404, {"detail": "not found"})
        assert c.post(f"/v1/tenants/{u}/disks", json={"name": "d", "size_mib": 1}).status_code == 404
    with h.client() as c:  # the bootstrap admin sees both
        assert {t, u} <= {x["id"] for x in c.get("/v1/tenants").json()}


def test_disks_attach_only_within_their_tenant(h, tenants):
    t, u = tenants
    with h.client() as c:
        other_disk = c.post(f"/v1/tenants/{u}/disks", json={"name": "secret", "size_mib": 1}).json()["id"]
        own_disk = c.post(f"/v1/tenants/{t}/disks", json={"name": "data", "size_mib": 2}).json()["id"]
    owner = h.principal("acme-owner2", ("Owner", f"/tenants/{t}"))
    with h.client(owner) as c:
        body = {"tenant": t, "name": "steal", "kernel": "vmlinux", "drives": [{"disk": other_disk}]}
        r_other = c.post("/v1/vms", json=body)
        body["drives"] = [{"disk": str(uuid.uuid4())}]
        r_missing = c.post("/v1/vms", json=body)
        assert r_other.status_code == r_missing.status_code == 422
        assert "was not found in tenant" in r_other.json()["detail"][0]["msg"]
        assert c.get(f"/v1/disks/{other_disk}").status_code == 404
        body["drives"] = [{"disk": own_disk}]
        body["name"] = "user-a"
        assert c.post("/v1/vms", json=body).status_code == 201
        body["name"] = "user-b"
        assert c.post("/v1/vms", json=body).status_code == 409  # writable disk is already attached
        assert c.delete(f"/v1/disks/{own_disk}").status_code == 409


def test_nobody_grants_what_they_do_not_hold(h, tenants):
    t, u = tenants
    bob = h.principal("bob")
    owner = h.principal("acme-owner3", ("Owner", f"/tenants/{t}"))
    contrib = h.principal("acme-contrib", ("Contributor", f"/tenants/{t}"))
    with h.client() as c:
        deleg = c.post("/v1/roles", json={"name": "Delegator", "actions": ["role/assign", "vm/read"],
                                          "assignable_scopes": [f"/tenants/{t}"]}).json()
        viewer = c.post("/v1/roles", json={"name": "VmViewer", "actions": ["vm/read"],
                                           "assignable_scopes": [f"/tenants/{t}"]}).json()
        assert c.post("/v1/assignments", json={"principal": "acme-owner3", "role": "Delegator",
                                               "scope": f"/tenants/{t}"}).status_code == 201
    d = h.principal("delegate", ("Delegator", f"/tenants/{t}"))
    with h.client(owner) as c:
        ok = c.post("/v1/assignments", json={"principal": "bob", "role": "Reader", "scope": f"/tenants/{t}"})
        assert ok.status_code == 201, ok.text
        assert c.post("/v1/assignments", json={"principal": "bob", "role": "Owner", "scope": "/"}).status_code == 403
        assert c.post("/v1/assignments", json={"principal": "bob", "role": "Reader",
                                               "scope": f"/tenants/{u}"}).status_code == 404
        r = c.post("/v1/roles", json={"name": "Global", "actions": ["*"], "assignable_scopes": ["/"]})
        assert r.status_code == 403
    with h.client(contrib) as c:
        r = c.post("/v1/assignments", json={"principal": "bob", "role": "Reader", "scope": f"/tenants/{t}"})
        assert r.status_code == 403
    with h.client(d) as c:
        r = c.post("/v1/assignments", json={"principal": "bob", "role": "Owner", "scope": f"/tenants/{t}"})
        assert r.status_code == 403 and "do not hold" in r.json()["detail"]
        r = c.post("/v1/assignments", json={"principal": "bob", "role": "Reader", "scope": f"/tenants/{t}"})
        assert r.status_code == 403 and "tenant/read" in r.json()["detail"]
        r = c.post("/v1/assignments", json={"principal": "bob", "role": viewer["id"], "scope": f"/tenants/{t}"})
        assert r.status_code == 201, r.text
        # not assignable outside the role's assignable scopes
        r = c.post("/v1/assignments", json={"principal": "bob", "role": deleg["id"], "scope": "/"})
        assert r.status_code == 403
    with h.client(bob) as c:  # bob now holds what was granted, and nothing more
        assert c.get(f"/v1/tenants/{t}").status_code == 200
        assert c.post(f"/v1/tenants/{t}/disks", json={"name": "x", "size_mib": 1}).status_code == 403


def test_auditor_reads_only_its_scope(h, tenants):
    t, u = tenants
    v = h.vm(t, "audited")
    h.vm(u, "audited-elsewhere")
    aud = h.principal("acme-auditor", ("Auditor", f"/tenants/{t}"))
    nobody = h.principal("nobody")
    with h.client(aud) as c:
        recs = c.get("/v1/audit", params={"limit": 10000}).json()
        assert recs and all(r["scope"].startswith(f"/tenants/{t}") for r in recs)
        assert any(r["vm"] == v for r in recs)
        assert c.get(f"/v1/vms/{v}").status_code == 404  # audit/read does not show VMs
    with h.client(nobody) as c:
        assert c.get("/v1/audit").status_code == 404
        assert c.get("/v1/tenants").json() == []
        assert c.get("/v1/vms").json() == []


def test_every_request_is_audited_with_its_decision(h, tenants):
    t, u = tenants
    eve = h.principal("eve", ("Reader", f"/tenants/{t}"))
    v = h.vm(u, "eve-target")
    with h.client(eve) as c:
        r = c.post(f"/v1/vms/{v}/start")
        rid = r.headers["x-request-id"]
    from bulkhead.daemon.auditlog import query_records

    row = [(r["principal"], r["action"], r["scope"], r["decision"], r["result"], r["vm"])
           for r in query_records(h.root / "audit.db", limit=None) if r["request_id"] == rid]
    assert row == [(eve.principal_id, "vm/start", f"/tenants/{u}/vms/{v}", "deny", "404", v)]


def test_no_api_changes_audit_records(h):
    doc = h.app.app.openapi()
    assert set(doc["paths"]["/v1/audit"]) == {"get"}
    with h.client() as c:
        for method in ("delete", "put", "patch", "post"):
            assert c.request(method, "/v1/audit").status_code == 405
        assert c.delete("/v1/audit/1").status_code == 404


def test_concurrent_creates_and_attachments_do_not_race(h, tenants):
    import threading

    t, _ = tenants
    with h.client() as c:
        disk = c.post(f"/v1/tenants/{t}/disks", json={"name": "contended", "size_mib": 1}).json()["id"]
    results: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with h.client() as c:
            same = c.post("/v1/vms", json={"tenant": t, "name": "same-name", "kernel": "vmlinux"}).status_code
            disk_user = c.post("/v1/vms", json={"tenant": t, "name": f"disk-user-{i}", "kernel": "vmlinux",
                                                "drives": [{"disk": disk}]}).status_code
        with lock:
            results.extend([("same", same), ("disk", disk_user)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for kind in ("same", "disk"):
        codes = sorted(code for k, code in results if k == kind)
        assert codes == [201] + [409] * 7, (kind, codes)


def test_worker_security_events_are_audited_in_the_vms_scope(h, tenants):
    t, u = tenants
    v = h.vm(t, "faulty")
    seq = h.daemon.security_event(v, "seccomp-kill", {"syscall": "ptrace", "pid": 1234})
    mine = h.principal("sec-auditor", ("Auditor", f"/tenants/{t}"))
    theirs = h.principal("other-auditor", ("Auditor", f"/tenants/{u}"))
    with h.client(mine) as c:
        recs = c.get("/v1/audit", params={"vm": v}).json()
        ev = [r for r in recs if r["seq"] == seq]
        assert ev and ev[0]["kind"] == "security" and ev[0]["action"] == "security/seccomp-kill"
        assert "ptrace" in ev[0]["detail"]
    with h.client(theirs) as c:
        assert c.get("/v1/audit", params={"vm": v}).json() == []


@pytest.mark.parametrize(("status", "kind"), [(18, "seccomp-kill"), (14, "guest-fault"), (8, "triple-fault"),
                                              (159, "seccomp-kill"), (1, None), (0, None)])
def test_security_relevant_vmm_exits_become_security_events(h, tenants, status, kind):
    t, _ = tenants
    v = h.vm(t, f"exit-{status}")
    with h.client() as c:
        assert c.post(f"/v1/vms/{v}/start").status_code == 200
        h.backend.exit(v, status)
        assert c.get(f"/v1/vms/{v}").json()["exit_status"] == status
        recs = [r for r in c.get("/v1/audit", params={"vm": v}).json() if r["kind"] == "security"]
    assert [r["action"] for r in recs] == ([f"security/{kind}"] if kind else [])


def test_monitor_notices_exits_without_a_read(h, tenants):
    import time

    t, _ = tenants
    v = h.vm(t, "monitored")
    with h.client() as c:
        assert c.post(f"/v1/vms/{v}/start").status_code == 200
    h.backend.exit(v, 14)
    h.daemon.start_monitor(interval=0.05)
    try:
        deadline = time.monotonic() + 5
        state = "running"
        while state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            state = h.daemon.store.q1("SELECT state FROM vms WHERE id = ?", (v,))["state"]
    finally:
        h.daemon._monitor_stop.set()
        h.daemon._monitor.join(5)
    assert state == "exited"
    rows = h.daemon.store.q("SELECT event FROM vm_events WHERE vm = ? ORDER BY id", (v,))
    assert [r["event"] for r in rows][-1] == "exited"


def test_removing_an_assignment_takes_effect_on_the_next_request(h, tenants):
    t, _ = tenants
    v = h.vm(t, "revocable")
    frank = h.principal("frank")
    with h.client() as c:
        a = c.post("/v1/assignments", json={"principal": "frank", "role": "VM Operator",
                                            "scope": f"/tenants/{t}/vms/{v}"}).json()["id"]
    with h.client(frank) as f, h.client() as c:
        assert f.get(f"/v1/vms/{v}").status_code == 200
        assert c.delete(f"/v1/assignments/{a}").status_code == 204
        assert f.get(f"/v1/vms/{v}").status_code == 404
