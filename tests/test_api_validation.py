"""Request validation and robustness: schemathesis against the served OpenAPI document (no 5xx, responses
conform to the schema), size limits, clear 4xx for bad input, fail closed when the audit log fails,
and that the repo copy of the OpenAPI document is current."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from bulkhead.daemon.app import MAX_BODY, inject_peer, openapi_document
from bulkhead.daemon.testkit import Harness

warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("valid"))
    yield harness
    harness.close()


def test_repo_openapi_document_is_current():
    repo = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert openapi_document(None) == repo, "regenerate: python -m bulkhead.daemon.app > docs/openapi.json"


def test_oversized_body_is_413_and_audited(h):
    with h.client() as c:
        r = c.post("/v1/tenants", content=b"{" + b" " * (MAX_BODY + 10) + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        rid = r.headers["x-request-id"]
        recs = c.get("/v1/audit", params={"limit": 10000}).json()
    assert any(x["request_id"] == rid and x["result"] == "413" for x in recs)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"name": ""}', b'{"name": "a b"}', b'{"name": "x", "extra": 1}',
    json.dumps({"name": "x" * 65}).encode(), b'{"name": 5}', b"\xff\xfe", b'{"name": "\\u0000"}',
])
def test_bad_tenant_bodies_are_422(h, body):
    with h.client() as c:
        r = c.post("/v1/tenants", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)


@pytest.mark.parametrize("patch", [
    {"mem_mib": 1}, {"mem_mib": 1 << 20}, {"cpus": 0}, {"cpus": 33}, {"kernel": "../etc/passwd"},
    {"kernel": "/boot/vmlinuz"}, {"cmdline": "a" * 5000}, {"cmdline": "a\x00b"}, {"drives": [{"disk": "x"}]},
    {"nics": [{"tap": "t0"}]}, {"nics": [{"network": "x"}]},
    {"nics": [{"network": str(uuid.uuid4()), "mac": "01:00:5e:00:00:01"}]},
    {"nics": [{"network": str(uuid.uuid4()), "rate": {"bytes_per_sec": -1}}]},
    {"nics": [{"network": str(uuid.uuid4()), "ipv4": "10.0.0.1/24"}]},
    {"nics": [{"network": str(uuid.uuid4())}]},
    {"drives": [{"disk": str(uuid.uuid4())}] * 9}, {"tenant": "not a uuid/nor a name"},
])
def test_bad_vm_bodies_are_4xx_with_a_reason(h, patch):
    t = h.tenant(f"t-{uuid.uuid4().hex[:8]}")
    body = {"tenant": t, "name": "v", "kernel": "vmlinux", **patch}
    with h.client() as c:
        r = c.post("/v1/vms", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_kernel_must_be_an_image_name_not_a_path(h):
    t = h.tenant("paths")
    with h.client() as c:
        r = c.post("/v1/vms", json={"tenant": t, "name": "v", "kernel": "missing-image"})
    assert r.status_code == 422 and "image directory" in r.json()["detail"][0]["msg"]


def test_lifecycle_conflicts_are_409(h):
    t = h.tenant("life")
    v = h.vm(t, "v")
    with h.client() as c:
        assert c.post(f"/v1/vms/{v}/stop").status_code == 409
        assert c.post(f"/v1/vms/{v}/resume").status_code == 409
        assert c.post(f"/v1/vms/{v}/start").status_code == 200
        r = c.delete(f"/v1/vms/{v}")
        assert r.status_code == 409 and "stop it first" in r.json()["detail"]
        assert c.post(f"/v1/vms/{v}/start").status_code == 409
        h.backend.exit(v, 7)  # the guest ends on its own
        got = c.get(f"/v1/vms/{v}").json()
        assert (got["state"], got["exit_status"]) == ("exited", 7)
        events = [e["event"] for e in c.get(f"/v1/vms/{v}/events").json()]
        assert events == ["created", "running", "exited"]
        assert c.delete(f"/v1/vms/{v}").status_code == 204


def test_fail_closed_when_the_audit_log_fails(h, monkeypatch):
    t = h.tenant("fc")
    v = h.vm(t, "fc-vm")
    monkeypatch.setenv("BULKHEAD_AUDIT_FAIL", "1")
    with h.client() as c:
        r = c.post("/v1/tenants", json={"name": "never"})
        assert r.status_code == 503 and "nothing was changed" in r.json()["detail"]
        r = c.post(f"/v1/vms/{v}/start")
        assert r.status_code == 503
        r = c.get(f"/v1/vms/{v}")  # a read whose record cannot be written discloses nothing
        assert r.status_code == 503 and "fc-vm" not in r.text
    assert ("start", v) not in h.backend.calls
    monkeypatch.delenv("BULKHEAD_AUDIT_FAIL")
    with h.client() as c:
        assert "never" not in [x["name"] for x in c.get("/v1/tenants").json()]
        assert c.get(f"/v1/vms/{v}").json()["state"] == "stopped"


# ---------------------------------------------------------------------- schemathesis
def _schema(h: Harness):
    import schemathesis

    app = inject_peer(h.app, {"kind": "local", "uid": 0})
    return schemathesis.openapi.from_asgi("/v1/openapi.json", app)


def test_schemathesis_no_5xx_and_conformant_responses(h):
    """Every operation, bounded examples: no 5xx, responses match the documented schemas and codes."""
    from hypothesis import given
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = _schema(h)
    t = h.tenant("fuzzed")
    h.vm(t, "fuzz-target")
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    ran = 0
    for result in schema.get_all_operations():
        strategy = result.ok().as_strategy()

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            case.call_and_validate(checks=checks)

        run()
        ran += 1
    assert ran >= 25
    h.backend.shutdown()


def test_oversized_chunked_body_is_413(h):
    def gen():
        yield b'{"name": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    with h.client() as c:
        r = c.post("/v1/tenants", content=gen(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/tenants", content=iter([b'{"name": ', b'"chunked-ok"}']),
                   headers={"content-type": "application/json"})
        assert r.status_code == 201
