"""Group commit of state and audit (issue 16 item 5; daemon/store.py): a SIGKILL of a real `bulkhead
serve` during a burst of 8 concurrent mTLS clients doing state-changing requests loses nothing that was
acknowledged, in the state and in the audit log; the log verifies; nothing is half-applied (no VM row
without its `created` event or without the audit record of its create). Plus the store's own contract:
concurrent bodies share one batch, a body that raises rolls back alone, reads see committed state only.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bulkhead.daemon.auditlog import query_records
from bulkhead.daemon.client import client_ssl
from bulkhead.daemon.setup import init_state_dir
from bulkhead.daemon.store import Store
from bulkhead.daemon.testkit import fake_kernel, spawn_daemon

CLIENTS = 8


def _ssl(root: Path) -> Any:
    return client_ssl(str(root / "ca.pem"), str(root / "admin.pem"), str(root / "admin.key"))


def _serve(root: Path, log: Path) -> tuple[Any, str]:
    (root / "serve.json").unlink(missing_ok=True)  # a killed daemon leaves its own behind
    with open(log, "ab") as f:
        proc, info = spawn_daemon(root, stdout=f)
    return proc, f"https://127.0.0.1:{info['port']}"


@pytest.mark.timeout(180)
def test_sigkill_during_a_burst_of_8_mtls_clients_loses_no_acknowledged_request(tmp_path: Path) -> None:
    root = tmp_path / "state"
    init_state_dir(root)
    (root / "images" / "k").write_bytes(fake_kernel())
    proc, url = _serve(root, tmp_path / "daemon.log")
    try:
        with httpx.Client(base_url=url, verify=_ssl(root), timeout=30) as c:
            tenant = c.post("/v1/tenants", json={"name": "acme"}).json()["id"]
        acked: list[tuple[str, str, str, str]] = []  # (kind, name, id, request id)
        lock = threading.Lock()
        go, stop = threading.Event(), threading.Event()

        def client(w: int) -> None:
            with httpx.Client(base_url=url, verify=_ssl(root), timeout=30) as c:  # one keep-alive connection each
                go.wait()
                i = 0
                while not stop.is_set():
                    i += 1
                    kind, name = ("tenant", f"t{w}-{i}") if i % 4 == 0 else ("vm", f"v{w}-{i}")
                    body = {"name": name} if kind == "tenant" else {"tenant": tenant, "name": name, "kernel": "k"}
                    try:
                        r = c.post(f"/v1/{kind}s", json=body)
                    except httpx.TransportError:
                        return  # the daemon is gone: this request was not acknowledged
                    if r.status_code == 201:
                        with lock:
                            acked.append((kind, name, r.json()["id"], r.headers["x-request-id"]))

        threads = [threading.Thread(target=client, args=(w,)) for w in range(CLIENTS)]
        for t in threads:
            t.start()
        go.set()
        deadline = time.monotonic() + 60
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()  # SIGKILL in the middle of the burst
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
        assert len(acked) >= 60, f"only {len(acked)} requests acknowledged before the kill"

        proc, url = _serve(root, tmp_path / "daemon.log")
        with httpx.Client(base_url=url, verify=_ssl(root), timeout=30) as c:
            vms = {v["id"]: v["name"] for v in c.get("/v1/vms", params={"tenant": tenant}).json()}
            tenants = {t["id"]: t["name"] for t in c.get("/v1/tenants").json()}
        lost = [a for a in acked if (vms if a[0] == "vm" else tenants).get(a[2]) != a[1]]
        assert not lost, f"{len(lost)} acknowledged creates are missing after the SIGKILL: {lost[:5]}"
        records = list(query_records(root / "audit.db", limit=None))
        by_rid = {r["request_id"]: r for r in records if r["kind"] == "api"}
        unaudited = [a for a in acked if by_rid.get(a[3], {}).get("result") != "201"]
        assert not unaudited, f"acknowledged without their audit record: {unaudited[:5]}"
        # nothing half-applied: every VM that exists has its created event (same transaction) and its audit
        created = {r["vm"] for r in records if r["kind"] == "api" and r["action"] == "vm/write" and r["result"] == "201"}
        assert set(vms) <= created, f"VMs without the audit record of their create: {set(vms) - created}"
        conn = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
        evented = {r[0] for r in conn.execute("SELECT vm FROM vm_events WHERE event = 'created'")}
        conn.close()
        assert set(vms) <= evented, f"VMs without their created event: {set(vms) - evented}"
    finally:
        proc.kill()
        proc.wait(30)
    from bulkhead.daemon.auditlog import load_verifier, verify_files

    rep = verify_files(root / "audit.db", load_verifier(None, root / "audit.db", root / "audit.pub"),
                       root / "audit.checkpoint")
    assert rep.ok, rep


def test_concurrent_bodies_share_one_batch_and_a_failing_body_rolls_back_alone(tmp_path: Path) -> None:
    """Store contract: 8 threads' bodies commit in fewer batches than bodies (one `durable` call per
    batch, records in body order); a body that raises leaves no trace; a reader sees a change only after
    the txn that made it returned (committed)."""
    store = Store(tmp_path / "s.db")
    batches: list[list[Any]] = []

    def durable(records: list[Any]) -> None:
        time.sleep(0.02)  # an fsync's worth: the others queue up behind it
        batches.append(list(records))

    store.durable = durable
    seen_uncommitted = []

    def body(i: int) -> None:
        try:
            with store.txn() as c:
                c.execute("INSERT INTO tenants VALUES (?,?,?)", (f"id{i}", f"n{i}", "now"))
                if store.q1("SELECT 1 FROM tenants WHERE id = ?", (f"id{i}",)) is None:
                    seen_uncommitted.append(("own change invisible in its body", i))
                store.add_durable(i)
                if i % 5 == 0:
                    raise RuntimeError("refused")
        except RuntimeError:
            pass

    threads = [threading.Thread(target=body, args=(i,)) for i in range(1, 41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = {r["id"] for r in store.q("SELECT id FROM tenants")}
    assert rows == {f"id{i}" for i in range(1, 41) if i % 5}
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(i for i in range(1, 41) if i % 5), "a refused body's record was made durable"
    assert len(batches) < len(flat), f"no group commit: {len(batches)} batches for {len(flat)} bodies"
    assert not seen_uncommitted
    # a reader in another thread does not see an open batch's change
    entered, release = threading.Event(), threading.Event()
    peek: list[Any] = []

    def slow() -> None:
        with store.txn() as c:
            c.execute("INSERT INTO tenants VALUES ('late','late','now')")
            entered.set()
            release.wait(10)

    t = threading.Thread(target=slow)
    t.start()
    entered.wait(10)
    peek.append(store.q1("SELECT 1 FROM tenants WHERE id = 'late'"))
    release.set()
    t.join()
    assert peek == [None] and store.q1("SELECT 1 FROM tenants WHERE id = 'late'") is not None
    store.close()


def test_a_failed_durable_step_fails_every_member_and_changes_nothing(tmp_path: Path) -> None:
    """Fail closed per batch: when the records cannot be made durable, no member's change commits and
    every member sees the error."""
    store = Store(tmp_path / "s.db")

    def durable(records: list[Any]) -> None:
        time.sleep(0.02)
        raise OSError("audit disk gone")

    store.durable = durable
    errors: list[str] = []

    def body(i: int) -> None:
        try:
            with store.txn() as c:
                c.execute("INSERT INTO tenants VALUES (?,?,?)", (f"id{i}", f"n{i}", "now"))
                store.add_durable(i)
        except OSError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["audit disk gone"] * 8
    assert store.q("SELECT id FROM tenants") == []
    store.close()
    assert os.path.exists(tmp_path / "s.db")
