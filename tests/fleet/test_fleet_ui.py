"""The fleet controller serves the web console too (issue 21, docs/UI.md "The fleet"): `bulkhead fleet serve
--ui-port PORT`. Real etcd, a real controller and agents; the console is read over real TLS with the
operator's client certificate, as the browser presents it (tests/test_ui_browser.py drives Chromium).

- /ui/hosts lists every fleet host with its state, VM count, free memory and attestation age, as
  `GET /v1/hosts` and `bulkhead fleet hosts` do; a host that fails attestation shows as unattested with its
  reason;
- /ui/vms lists the fleet's VMs (the same FleetVmService as the API, so the same RBAC);
- without a certificate or a session, nothing is shown.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request

import pytest
from tests.fleet.kit import Fleet, make_vm, wait

pytestmark = pytest.mark.slow


def _get(fleet: Fleet, path: str, cert: bool = True) -> str:
    info = json.loads((fleet.ctl_dir / "serve.json").read_text())
    ctx = ssl.create_default_context(cafile=str(fleet.ctl_dir / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(fleet.ctl_dir / "admin.pem"), str(fleet.ctl_dir / "admin.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{info['ui_port']}{path}", context=ctx, timeout=10) as r:
        assert r.headers["cache-control"] == "no-store"
        return str(r.read().decode())


def _vm(fleet: Fleet, vm: str) -> dict:
    with fleet.client() as c:
        return dict(c.get(f"/vms/{vm}"))


def _row(html: str, host: str) -> str:
    m = re.search(rf'<tr id="host-{host}">(.*?)</tr>', html, re.S)
    assert m, f"no row for {host}"
    return m.group(1)


def test_the_controller_console_shows_fleet_hosts_and_vms(fleet: Fleet) -> None:
    fleet.start_controller(extra=["--ui-port", "0"])
    fleet.wait_api()
    for h in ("h1", "h2"):
        fleet.start_agent(h)
    wait(lambda: len(hs := fleet.hosts()) == 2 and all(x["state"] == "ready" for x in hs.values()), 40, "hosts ready")
    with fleet.client() as c:
        t = str(c.post("/tenants", {"name": "acme"})["id"])
        vm = make_vm(c, t, "web")["id"]
        c.post(f"/vms/{vm}/start", {})
    where = wait(lambda: (s := _vm(fleet, vm))["state"] == "running" and s["host"], 30, "the VM running")
    html = wait(lambda: (h := _get(fleet, "/ui/hosts")) and ">1</td>" in _row(h, where) and h, 20, "the hosts view")
    assert "Fleet hosts" in html
    for h in ("h1", "h2"):
        row = _row(html, h)
        assert "state-ready" in row and "/ 1024" in row, row
    assert "web" in _get(fleet, "/ui/vms")
    # a host whose attestation fails: its policy allows another configuration digest
    fleet.enroll("h2", allowed_config="00" * 32)
    html = wait(lambda: (h := _get(fleet, "/ui/hosts")) and "state-unattested" in _row(h, "h2") and h, 60,
                "h2 unattested in the view")
    assert "state-ready" in _row(html, "h1")
    with pytest.raises(urllib.error.HTTPError) as err:  # no certificate, no session: the login page
        _get(fleet, "/v1/hosts", cert=False)
    assert err.value.code == 401
    assert "Fleet hosts" not in _fetch_no_cert(fleet, "/ui/hosts")


def _fetch_no_cert(fleet: Fleet, path: str) -> str:
    try:
        return _get(fleet, path, cert=False)
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())
