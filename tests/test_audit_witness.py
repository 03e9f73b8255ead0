"""Witnesses (C2SP tlog-witness / tlog-cosignature): the witness's decisions (404, 403, 409 with its size,
422, 400, 200 + cosignature, durable across restarts, audited in its own log); the real mTLS server with
the daemon's pusher; rollback to an older genuine signed state and wipe + re-init detected by
`audit verify --witness`; the quorum policy (fail closed by default, grace)."""

from __future__ import annotations

import sqlite3
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bulkhead.control.audit import Record
from bulkhead.control.merkle import Frontier, leaf_hash
from bulkhead.control.note import Checkpoint, Verifier, format_add_checkpoint, sign_note, verify_cosignature
from bulkhead.daemon.auditlog import AuditLog, load_audit_key, now_iso, query_records
from bulkhead.daemon.cli import audit_main
from bulkhead.daemon.witness import WitnessOptions, WitnessPusher, make_witness_server
from bulkhead.daemon.witness_cli import _server_ssl, init_witness, make_client, open_service, witness_main

ORIGIN = "bulkhead.test/audit/feedfacecafebeef"


class Log:
    """A tree of n leaves with signed checkpoints, for driving a witness by hand."""

    def __init__(self, key: Ed25519PrivateKey, n: int, tag: bytes = b"") -> None:
        self.key, self.f, self.nodes = key, Frontier(), {}
        for i in range(n):
            lh = leaf_hash(tag + i.to_bytes(4, "big"))
            self.nodes[(0, i)] = lh
            for level, idx, h in self.f.append(lh):
                self.nodes[(level, idx)] = h

    def node(self, level: int, index: int) -> bytes:
        return self.nodes[(level, index)]

    def note(self, size: int) -> str:
        root = Frontier.restore(size, self).root()
        return sign_note(Checkpoint(ORIGIN, size, root).text(), ORIGIN, self.key)

    def body(self, old: int, new: int) -> bytes:
        from bulkhead.control.merkle import consistency_proof

        proof = consistency_proof(self, old, new) if 0 < old <= new else []
        return format_add_checkpoint(old, proof, self.note(new))


@pytest.fixture
def wdir(tmp_path: Path) -> Path:
    init_witness(tmp_path / "w")
    return tmp_path / "w"


def test_witness_protocol_decisions(wdir):
    key = Ed25519PrivateKey.generate()
    log = Log(key, 40)
    svc = open_service(wdir)
    assert svc.add_checkpoint(log.body(0, 10))[0] == 404  # unknown origin
    svc.add_log(str(Verifier.for_key(ORIGIN, key)))
    wv = Verifier.parse((wdir / "witness.vkey").read_text())
    other = Log(Ed25519PrivateKey.generate(), 40)
    assert svc.add_checkpoint(other.body(0, 10))[0] == 403  # not signed by the log's key
    assert svc.add_checkpoint(b"old 0\nnot base64!\n\nx")[0] == 400
    status, ctype, sig = svc.add_checkpoint(log.body(0, 10))
    assert status == 200
    assert verify_cosignature(log.note(10) + sig.decode(), wv) > 0
    status, ctype, body = svc.add_checkpoint(log.body(0, 20))  # stale old size: told what it knows
    assert (status, ctype, body) == (409, "text/x.tlog.size", b"10\n")
    bad = bytearray(log.body(10, 20))
    bad[10] ^= 1  # inside the first proof line
    assert svc.add_checkpoint(bytes(bad))[0] in (400, 422)
    fork = Log(key, 40, tag=b"forked")  # the same key signing another history
    assert svc.add_checkpoint(fork.body(10, 20))[0] == 422
    assert svc.add_checkpoint(fork.body(10, 10))[0] == 422  # same size, another root
    assert svc.add_checkpoint(log.body(20, 10))[0] in (400, 409)  # shrinking
    assert svc.add_checkpoint(log.body(10, 20))[0] == 200
    svc.audit.close()
    svc.close()
    svc = open_service(wdir)  # durable: after a restart it still knows 20
    assert svc.add_checkpoint(log.body(10, 30))[:3] == (409, "text/x.tlog.size", b"20\n")
    assert svc.add_checkpoint(log.body(20, 30))[0] == 200
    svc.audit.close()
    svc.close()
    actions = [r["action"] for r in query_records(wdir / "audit.db", limit=None)]
    assert actions[0] == "witness.init" and actions.count("witness.add-checkpoint") == 12
    assert audit_main(["verify", "--state-dir", str(wdir)]) == 0  # the witness's own log verifies


class WitnessThread:
    def __init__(self, wdir: Path) -> None:
        self.svc = open_service(wdir)
        self.srv = make_witness_server(self.svc, "127.0.0.1", 0, _server_ssl(wdir))
        self.url = f"https://127.0.0.1:{self.srv.server_address[1]}"
        self.t = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.t.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.svc.audit.close()
        self.svc.close()


@pytest.fixture
def host(tmp_path, wdir):
    """A log host state dir with a witness registered, the witness serving over mTLS."""
    from bulkhead.daemon.setup import init_state_dir

    sd = init_state_dir(tmp_path / "sd")
    vk = (sd.root / "audit.vkey").read_text().strip()
    assert witness_main(["add-log", vk, "--state-dir", str(wdir)]) == 0
    w = WitnessThread(wdir)
    bundle = make_client(wdir, "host1", w.url)
    assert witness_main(["add", str(bundle), "--state-dir", str(sd.root)]) == 0
    yield sd.root, w
    w.close()


def _log(root: Path, every: int = 5) -> AuditLog:
    return AuditLog(root / "audit.db", load_audit_key(root / "audit.key"), root / "audit.checkpoint",
                    checkpoint_every=every)


def _append(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(Record.make(now_iso(), "system", {"i": i}, action="test"))


def test_the_witness_refuses_clients_without_its_certificate(host):
    root, w = host
    ctx = ssl.create_default_context(cafile=str(root / "witnesses" / next(iter(
        p.name for p in (root / "witnesses").iterdir())) / "ca.pem"))
    with pytest.raises((ssl.SSLError, OSError), match=r"(?i)certificate|alert|reset|closed|EOF"):
        urllib.request.urlopen(urllib.request.Request(w.url + "/add-checkpoint", data=b"old 0\n\n"),
                               context=ctx, timeout=5).read()


def test_push_then_rollback_to_an_older_signed_state_is_detected(host, capsys):
    root, _w = host
    log = _log(root)
    pusher = WitnessPusher(log, WitnessOptions.registered(root / "witnesses"))
    assert pusher.push_once() and not pusher.refusal(), pusher.errors
    _append(log, 13)
    assert pusher.push_once()
    sizes = dict(pusher.cosigned)
    log.close()
    assert list(sizes.values()) == [14]
    assert audit_main(["verify", "--state-dir", str(root), "--witness", "all"]) == 0
    assert "1 from witnesses" in capsys.readouterr().out
    # roll back database AND checkpoint file to the genuine signed state at 10 records
    conn = sqlite3.connect(root / "audit.db", isolation_level=None)
    old = conn.execute("SELECT note FROM checkpoints WHERE size = 10").fetchone()[0]
    for t in ("records", "nodes", "checkpoints"):
        conn.execute(f"DROP TRIGGER {t}_no_delete")
    conn.execute("DELETE FROM records WHERE seq > 10")
    conn.execute("DELETE FROM checkpoints WHERE size > 10")
    conn.execute("DELETE FROM nodes WHERE (idx + 1) << level > 10")
    conn.execute("UPDATE head SET note = ?", (old,))
    conn.close()
    (root / "audit.checkpoint").write_text(old)
    assert audit_main(["verify", "--state-dir", str(root)]) == 0  # locally self-consistent: that is the attack
    capsys.readouterr()
    assert audit_main(["verify", "--state-dir", str(root), "--witness", "all"]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and "witness" in out
    # and the rolled-back daemon cannot get a new cosignature for the old state
    log = _log(root)
    p2 = WitnessPusher(log, WitnessOptions.registered(root / "witnesses"))
    assert not p2.push_once() and "rollback" in " ".join(p2.errors.values())
    log.close()


def test_wipe_and_reinit_with_the_same_key_is_detected(host, capsys):
    root, _w = host
    log = _log(root)
    _append(log, 5)
    assert WitnessPusher(log, WitnessOptions.registered(root / "witnesses")).push_once()
    origin = log.origin
    log.close()
    for s in ("", "-wal", "-shm"):
        Path(f"{root / 'audit.db'}{s}").unlink(missing_ok=True)
    fresh = AuditLog(root / "audit.db", load_audit_key(root / "audit.key"), root / "audit.checkpoint",
                     create=True, origin=origin)  # a well-formed new log, signed with the host's key
    _append(fresh, 8)
    fresh.close()
    assert audit_main(["verify", "--state-dir", str(root)]) == 0
    capsys.readouterr()
    assert audit_main(["verify", "--state-dir", str(root), "--witness", "all"]) == 1
    assert "differ from the signed checkpoint" in capsys.readouterr().out
    log = _log(root)
    p = WitnessPusher(log, WitnessOptions.registered(root / "witnesses"))
    assert not p.push_once()  # the witness will not cosign the fork
    log.close()


def test_quorum_policy_fails_closed_by_default_with_a_grace_option(tmp_path, wdir):
    from bulkhead.daemon.setup import init_state_dir
    from bulkhead.daemon.testkit import Harness

    sd = init_state_dir(tmp_path / "sd")
    bundle = make_client(wdir, "host1", "https://127.0.0.1:9")  # nothing listens there
    assert witness_main(["add", str(bundle), "--state-dir", str(sd.root)]) == 0
    h = Harness(sd.root)
    try:
        with h.client() as c:
            r = c.post("/v1/tenants", json={"name": "refused"})
            assert r.status_code == 503 and "no witness quorum" in r.text
            assert c.get("/v1/tenants").status_code == 200  # reads go on
        assert not h.daemon.store.q1("SELECT 1 FROM tenants WHERE name = 'refused'")
        h.daemon.witnesses.opts.grace = 3600.0  # a configured grace: mutations go on while it lasts
        with h.client() as c:
            assert c.post("/v1/tenants", json={"name": "in-grace"}).status_code == 201
    finally:
        h.close()


def test_daemon_pushes_to_a_live_witness_and_mutations_flow(host):
    from bulkhead.daemon.testkit import Harness

    root, w = host
    h = Harness(root)
    try:
        deadline = time.monotonic() + 20
        while h.daemon.witnesses.refusal() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not h.daemon.witnesses.refusal()
        with h.client() as c:
            assert c.post("/v1/tenants", json={"name": "witnessed"}).status_code == 201
    finally:
        h.close()
    final = len(list(query_records(root / "audit.db", limit=None)))  # daemon.stop included
    assert w.svc.db.execute("SELECT size FROM logs").fetchone()[0] == final  # the shutdown checkpoint was pushed


def test_witness_serve_is_its_own_process_and_audits_itself(tmp_path, wdir):
    import json
    import os
    import signal
    import subprocess
    import sys

    from bulkhead.daemon.setup import init_state_dir
    from bulkhead.daemon.witness import WitnessSpec

    sd = init_state_dir(tmp_path / "sd")
    assert witness_main(["add-log", (sd.root / "audit.vkey").read_text().strip(), "--state-dir", str(wdir)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "bulkhead", "audit", "witness", "serve", "--state-dir", str(wdir),
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (wdir / "serve.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        port = json.loads((wdir / "serve.json").read_text())["port"]
        assert witness_main(["add-log", "x+00000000+AA==", "--state-dir", str(wdir)]) == 2  # one writer
        bundle = make_client(wdir, "host1", f"https://127.0.0.1:{port}")
        assert witness_main(["add", str(bundle), "--state-dir", str(sd.root)]) == 0
        log = _log(sd.root)
        assert WitnessPusher(log, WitnessOptions.registered(sd.root / "witnesses")).push_once()
        log.close()
        assert audit_main(["verify", "--state-dir", str(sd.root), "--witness", WitnessSpec.load(bundle).name]) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        proc.stdout.close()
    actions = [r["action"] for r in query_records(wdir / "audit.db", limit=None)]
    assert actions[-3:] == ["witness.start", "witness.add-checkpoint", "witness.stop"] or \
        {"witness.start", "witness.add-checkpoint", "witness.stop"} <= set(actions)
    assert audit_main(["verify", "--state-dir", str(wdir)]) == 0
    assert not (wdir / "serve.json").exists()


def test_serve_refuses_an_unregistered_witness(tmp_path, capsys):
    from bulkhead.daemon.cli import serve_main
    from bulkhead.daemon.setup import init_state_dir

    sd = init_state_dir(tmp_path / "sd")
    assert serve_main(["--state-dir", str(sd.root), "--backend", "fake", "--integrity", "off",
                       "--witness", "https://nowhere:1"]) == 2
    assert "not registered witnesses" in capsys.readouterr().err
