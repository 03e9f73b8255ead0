"""Real TLS handshakes against the real uvicorn server on 127.0.0.1 (ephemeral port): no certificate, a
certificate from another CA, expired, revoked, unknown-to-the-daemon, TLS 1.2, and a valid one; and the
local Unix socket (mode 0600, SO_PEERCRED: a non-root peer gets nothing)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat

import httpx
import pytest

from bulkhead.daemon import pki
from bulkhead.daemon.testkit import Harness, ServerThread

REQ = b"GET /v1/whoami HTTP/1.1\r\nHost: bulkheadd\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("tls"))
    with ServerThread(h) as s:
        yield h, s
    h.close()


def _ctx(h: Harness, cert=None, key=None, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(h.sd.ca_cert))
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = max_version
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _raw(h: Harness, s: ServerThread, ctx: ssl.SSLContext) -> bytes:
    """Handshake, send one request, return whatever comes back (b'' when the server hung up)."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(REQ)
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                return data
            data += chunk


def _refused(h, s, ctx) -> str:
    """Refused in the TLS layer: no HTTP response at all, and no request reached the application
    (an application-level refusal would be a 401 with an audit record)."""
    before = h.daemon.audit.size
    try:
        data = _raw(h, s, ctx)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        why = type(exc).__name__ + ": " + str(exc)
    else:
        assert data == b"", data[:200]
        why = "closed"
    assert h.daemon.audit.size == before
    return why


def test_valid_certificate_is_accepted_over_tls13(srv):
    h, s = srv
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw, \
            _ctx(h, h.sd.admin_cert, h.sd.admin_key).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(REQ)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"name":"admin"' in data


def test_no_client_certificate_is_refused(srv):
    h, s = srv
    _refused(h, s, _ctx(h))


def test_certificate_from_another_ca_is_refused(srv, tmp_path):
    h, s = srv
    rogue = pki.make_ca(cn="bulkhead CA")  # same name, different key
    key = pki.new_key()
    issued = pki.issue_client(rogue, "admin", key.public_key())
    (tmp_path / "r.pem").write_bytes(pki.cert_pem(issued.cert))
    (tmp_path / "r.key").write_bytes(pki.key_pem(key))
    _refused(h, s, _ctx(h, tmp_path / "r.pem", tmp_path / "r.key"))


def test_expired_certificate_is_refused(srv, tmp_path):
    h, s = srv
    ca = pki.CertBundle(pki.load_key(h.sd.ca_key), pki.load_cert(h.sd.ca_cert))
    key = pki.new_key()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    issued = pki.issue_client(ca, "old", key.public_key(), days=30, not_before=start)
    pid = h.daemon.store.add_principal("old")
    h.daemon.store.add_cert(pid, issued.fingerprint, issued.serial, issued.not_after)
    (tmp_path / "o.pem").write_bytes(pki.cert_pem(issued.cert))
    (tmp_path / "o.key").write_bytes(pki.key_pem(key))
    _refused(h, s, _ctx(h, tmp_path / "o.pem", tmp_path / "o.key"))


def test_revoked_certificate_is_refused_even_on_a_live_connection(srv):
    h, s = srv
    carol = h.principal("carol", ("Reader", "/"))
    ctx = _ctx(h, carol.cert_path, carol.key_path)
    admin = _ctx(h, h.sd.admin_cert, h.sd.admin_key)
    with httpx.Client(base_url=s.url, verify=ctx) as c, httpx.Client(base_url=s.url, verify=admin) as a:
        assert c.get("/v1/whoami").status_code == 200
        assert a.post(f"/v1/principals/{carol.principal_id}/revoke").status_code == 200
        r = c.get("/v1/whoami")  # same keep-alive connection: checked per request
        assert r.status_code == 401 and r.json()["detail"] == "client certificate revoked"
    with httpx.Client(base_url=s.url, verify=ctx) as c:
        assert c.get("/v1/tenants").status_code == 401
    from bulkhead.daemon.auditlog import query_records

    rows = [r["detail"] for r in query_records(h.root / "audit.db", limit=None)
            if r["kind"] == "security" and r["result"] == "401"]
    assert any("revoked" in r for r in rows)


def test_certificate_unknown_to_the_daemon_is_refused(srv):
    h, s = srv
    ghost = h.principal("ghost", register=False)  # signed by our CA, never registered
    with httpx.Client(base_url=s.url, verify=_ctx(h, ghost.cert_path, ghost.key_path)) as c:
        r = c.get("/v1/whoami")
    assert r.status_code == 401 and "unknown" in r.json()["detail"]


def test_tls12_is_refused(srv):
    h, s = srv
    ctx = _ctx(h, h.sd.admin_cert, h.sd.admin_key, max_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        _raw(h, s, ctx)


def test_served_openapi_requires_a_client_certificate_and_matches_the_repo(srv):
    import json
    from pathlib import Path

    h, s = srv
    with httpx.Client(base_url=s.url, verify=_ctx(h, h.sd.admin_cert, h.sd.admin_key)) as c:
        served = c.get("/v1/openapi.json").json()
    repo = json.loads((Path(__file__).resolve().parents[1] / "docs" / "openapi.json").read_text())
    assert served == repo, "docs/openapi.json is stale: python -m bulkhead.daemon.app > docs/openapi.json"


def test_unix_socket_is_root_only(srv):
    h, _s = srv
    path = h.sd.socket
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://x") as c:
        assert c.get("/v1/whoami").json()["name"] == "root@local"
    # a non-root peer: open the file mode up so only SO_PEERCRED stands in the way
    os.chmod(path, 0o666)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(REQ)
                data = sock.recv(1024)
                os.write(w, b"GOT:" + data[:40] if data else b"EMPTY")
            except OSError as exc:
                os.write(w, f"ERR:{exc}".encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        out = os.read(r, 1024)
        os.close(r)
    finally:
        os.chmod(path, 0o600)
    assert out == b"EMPTY" or out.startswith(b"ERR:"), out
