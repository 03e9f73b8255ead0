"""The web console (issue 21, docs/UI.md) end to end in real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium through /usr/bin/chromedriver: nothing is downloaded), against the
real servers with real TLS (the mTLS listener and the console listener), the jailed backend and a real
guest (tests/payloads/console.c, which echoes what it is sent).

Screenshots of each view go to $BULKHEAD_UI_SCREENSHOTS (default: a temporary directory) at 1280 px,
at 400 px and at 200 % zoom; axe-core (ui/node_modules, from the npm registry) checks each view.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bulkhead.control import rbac
from bulkhead.daemon.testkit import Harness, Identity, ServerThread

pytestmark = [pytest.mark.root, pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
AXE = ROOT / "ui" / "node_modules" / "axe-core" / "axe.min.js"
BOOT_S = 120
SHOTS = Path(os.environ.get("BULKHEAD_UI_SCREENSHOTS") or tempfile.mkdtemp(prefix="bulkhead-ui-shots-"))


class Env:
    h: Harness
    s: ServerThread
    alice: Identity  # VM Operator + Auditor + Reader in tenant "acme"
    bob: Identity  # VM Operator in tenant "globex"
    acme_vm: str
    globex_vm: str
    driver: Any


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (install.sh installs them)")
    if os.geteuid() != 0 or not os.path.exists("/dev/kvm"):
        pytest.skip("needs root and /dev/kvm (the jailed backend runs the echoing guest)")
    if not AXE.exists():
        pytest.skip("needs ui/node_modules (install.sh runs `npm ci` in ui/)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from bulkhead.daemon.backend import make_backend
    sys.path.insert(0, str(ROOT))
    from tests.vmrun import payload

    e = Env()
    e.h = Harness(tmp_path_factory.mktemp("ui"), backend=make_backend("jail"))
    (e.h.root / "images" / "console").write_bytes(payload("console").read_bytes())
    acme, globex = e.h.tenant("acme"), e.h.tenant("globex")
    e.acme_vm = e.h.vm(acme, "acme-web", kernel="console", mem_mib=16)
    with e.h.client() as c:  # a tenant network with a pinned address, for the diagram (never started here)
        r = c.post(f"/v1/tenants/{acme}/networks", json={"name": "frontend", "ipv4_subnet": "10.20.0.0/24"})
        assert r.status_code == 201, r.text
    e.h.vm(acme, "acme-api", kernel="console", mem_mib=16, nics=[{"network": r.json()["id"], "ipv4": "10.20.0.10"}])
    e.globex_vm = e.h.vm(globex, "globex-db", kernel="console", mem_mib=16)
    ts = rbac.tenant_scope
    e.alice = e.h.principal("alice", ("VM Operator", ts(acme)), ("Auditor", ts(acme)), ("Reader", ts(acme)))
    e.bob = e.h.principal("bob", ("VM Operator", ts(globex)))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--ignore-certificate-errors", "--window-size=1280,900", "--no-first-run"):
        opts.add_argument(a)  # the test CA is not in the browser's store: the server is ours
    with ServerThread(e.h, ui=True) as e.s:
        e.driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        e.driver.set_page_load_timeout(30)
        try:
            yield e
        finally:
            e.driver.quit()
    e.h.close()


# ---------------------------------------------------------------- helpers
def _cli_login(e: Env, who: Identity) -> str:
    """`bulkhead ui login` as `who` over mTLS: the printed single-use link."""
    args = ["--state-dir", str(e.h.root), "--url", e.s.url, "--ca", str(e.h.sd.ca_cert), "--cert", str(who.cert_path),
            "--key", str(who.key_path), "--ui-url", e.s.ui_url, "--json"]
    p = subprocess.run([sys.executable, "-m", "bulkhead", "ui", "login", *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return str(json.loads(p.stdout)["url"])


def _login(e: Env, who: Identity) -> None:
    e.driver.delete_all_cookies()
    e.driver.get(_cli_login(e, who))
    assert e.driver.current_url.endswith("/ui/vms"), e.driver.current_url
    assert e.driver.find_element("id", "me").text == who.name


def _wait(cond: Any, what: str, timeout: float = BOOT_S) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    end = time.monotonic() + timeout
    while True:
        try:
            v = cond()
        except (StaleElementReferenceException, NoSuchElementException):  # the page is being replaced
            v = None
        if v:
            return v
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def _cookie(e: Env) -> str:
    return next(c["value"] for c in e.driver.get_cookies() if c["name"] == "bulkhead_session")


def _post(e: Env, path: str, form: str, cookie: str) -> int:
    """A POST as a forging page would send it (the victim's cookie, no or a wrong CSRF token)."""
    ctx = ssl.create_default_context(cafile=str(e.h.sd.ca_cert))
    req = urllib.request.Request(e.s.ui_url + path, data=form.encode(), method="POST", headers={
        "cookie": f"bulkhead_session={cookie}", "content-type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _vm_state(e: Env, vm: str) -> str:
    with e.h.client() as c:
        return str(c.get(f"/v1/vms/{vm}").json()["state"])


def _term_text(e: Env) -> str:
    return str(e.driver.execute_script(
        "const b = window.bulkheadTerm && window.bulkheadTerm.buffer.active; if (!b) return '';"
        "let s = ''; for (let i = 0; i < b.length; i++) s += b.getLine(i).translateToString(true) + '\\n'; return s;"))


def _axe(e: Env) -> list[dict[str, Any]]:
    e.driver.execute_script(AXE.read_text())
    res = e.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map("
        "v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3)}))));")
    return [v for v in res if v["impact"] in ("serious", "critical")]


def _shots(e: Env, name: str) -> None:
    """Save the view at 1280 px, 400 px and 200 % zoom (a 640 CSS px viewport at device scale 2)."""
    d = e.driver
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, width, scale in (("wide", 1280, 1), ("narrow", 400, 1), ("zoom200", 640, 2)):
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": 900, "deviceScaleFactor": scale, "mobile": False})
        time.sleep(0.3)
        overflow = d.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        d.save_screenshot(str(SHOTS / f"{name}-{label}.png"))
        assert overflow <= 2, f"{name} at {label}: the page scrolls sideways by {overflow} px"
    d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _check_view(e: Env, name: str) -> None:
    bad = _axe(e)
    assert bad == [], f"axe-core on {name}: {bad}"
    _shots(e, name)


# ---------------------------------------------------------------- tests
@contextmanager
def _cert_browser(e: Env, who: Identity | None) -> Iterator[Any]:
    """A second Chromium whose NSS database (in a HOME of the test's own: Chromium on Linux reads
    $HOME/.pki/nssdb) holds `who`'s certificate and key, imported with certutil/pk12util (libnss3-tools),
    and whose profile auto-selects a certificate for the console's origin (the content setting behind
    the AutoSelectCertificateForUrls policy, set in this profile only: no host-wide policy file).
    `who` None: the same browser with an empty database."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = Path(tempfile.mkdtemp(prefix="bulkhead-ui-cert-"))
    nss = root / "home" / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True, capture_output=True)
    if who is not None:
        key = serialization.load_pem_private_key(who.key_path.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(who.cert_path.read_bytes())
        p12 = root / "id.p12"
        p12.write_bytes(pkcs12.serialize_key_and_certificates(
            who.name.encode(), key, cert, None, serialization.BestAvailableEncryption(b"test")))
        subprocess.run(["pk12util", "-i", str(p12), "-d", f"sql:{nss}", "-W", "test"], check=True, capture_output=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--ignore-certificate-errors", "--window-size=1280,900", "--no-first-run",
              f"--user-data-dir={root / 'profile'}"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"profile.content_settings.exceptions.auto_select_certificate": {
        f"{e.s.ui_url},*": {"setting": {"filters": [{}]}}}})
    driver = webdriver.Chrome(service=Service(DRIVER, env=dict(os.environ, HOME=str(root / "home"))), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(root, ignore_errors=True)


def test_a_client_certificate_logs_in_chromium_without_a_link(env: Env) -> None:
    """mTLS login in the browser: Chromium presents alice's certificate from its NSS database, and the
    console listener authenticates it exactly as the API does (same Gate, same RBAC: alice's tenant only).
    The same browser without the certificate is not signed in, and a certificate never opens /v1 without
    the API's own mTLS check."""
    with _cert_browser(env, env.alice) as d:
        d.get(env.s.ui_url + "/ui/vms")
        assert d.find_element("id", "me").text == "alice"
        assert "acme-web" in d.page_source and "globex-db" not in d.page_source
        assert not d.get_cookies()  # no session cookie: the certificate itself is the credential
    with _cert_browser(env, None) as d:
        d.get(env.s.ui_url + "/ui/vms")
        assert not d.find_elements("id", "me") and "acme-web" not in d.page_source
    ctx = ssl.create_default_context(cafile=str(env.h.sd.ca_cert))  # the headers, read by a TLS client
    ctx.load_cert_chain(str(env.alice.cert_path), str(env.alice.key_path))
    with urllib.request.urlopen(env.s.ui_url + "/ui/vms", context=ctx, timeout=10) as r:
        assert r.status == 200 and r.headers["cache-control"] == "no-store"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    nocert = ssl.create_default_context(cafile=str(env.h.sd.ca_cert))
    with pytest.raises(urllib.error.HTTPError) as err:  # no certificate, no session: the API stays closed
        urllib.request.urlopen(env.s.ui_url + "/v1/vms", context=nocert, timeout=10)
    assert err.value.code == 401


def test_a_login_link_works_once_and_sets_a_strict_cookie(env: Env) -> None:
    url = _cli_login(env, env.alice)
    d = env.driver
    d.get(url)
    assert d.current_url.endswith("/ui/vms") and d.find_element("id", "me").text == "alice"
    c = next(c for c in d.get_cookies() if c["name"] == "bulkhead_session")
    assert c["httpOnly"] and c["secure"] and c["sameSite"] == "Strict" and c["path"] == "/ui"
    d.delete_all_cookies()
    d.get(url)  # the same link again: refused, and no session
    assert "unknown, used or expired" in d.find_element("tag name", "body").text
    d.get(env.s.ui_url + "/ui/vms")
    assert d.current_url.endswith("/ui/login")
    _check_view(env, "login")
    with pytest.raises(urllib.error.HTTPError) as err:  # the cookie never counts for the API
        req = urllib.request.Request(env.s.ui_url + "/v1/vms", headers={"cookie": f"bulkhead_session={c['value']}"})
        urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(env.h.sd.ca_cert)), timeout=10)
    assert err.value.code == 401


def test_another_tenants_vms_and_buttons_stay_invisible_and_forged_posts_fail(env: Env) -> None:
    _login(env, env.bob)
    d = env.driver
    body = d.find_element("tag name", "main").text
    assert "globex-db" in body and "acme-web" not in body
    assert d.find_elements("css selector", 'button[aria-label="start globex-db"]')
    d.get(f"{env.s.ui_url}/ui/vms/{env.acme_vm}")  # a deep link to alice's VM: not found, no buttons
    assert "acme-web" not in d.page_source and not d.find_elements("css selector", "button[data-op]")
    bob_cookie = _cookie(env)
    _login(env, env.alice)
    alice_cookie = _cookie(env)
    # forged: alice's cookie (a cross-site page cannot read her token), no token / bob's token
    assert _post(env, f"/ui/vms/{env.acme_vm}/start", "", alice_cookie) == 403
    d.get(f"{env.s.ui_url}/ui/vms/{env.acme_vm}")
    bobs = env.h.daemon.ui_auth.csrf_for("s:" + __import__("hashlib").sha256(bob_cookie.encode()).hexdigest())
    assert _post(env, f"/ui/vms/{env.acme_vm}/start", f"csrf={bobs}", alice_cookie) == 403
    assert _vm_state(env, env.acme_vm) != "running"
    # bob's own session cannot act on alice's VM even with his valid token (RBAC, as the API: 404)
    assert _post(env, f"/ui/vms/{env.acme_vm}/start", f"csrf={bobs}", bob_cookie) == 404
    assert _vm_state(env, env.acme_vm) != "running"


def test_start_from_the_page_then_the_console_echoes_typed_input(env: Env) -> None:
    _login(env, env.alice)
    d = env.driver
    d.get(f"{env.s.ui_url}/ui/vms/{env.acme_vm}")
    d.find_element("css selector", 'button[aria-label="start acme-web"]').click()
    _wait(lambda: d.find_element("id", "vm-state").text == "running", "the VM page to show running", 60)
    _wait(lambda: d.find_element("id", "s-exits").text not in ("", "—"), "live stats", 30)
    _check_view(env, "vm")
    d.find_element("id", "console-link").click()
    _wait(lambda: "CONSOLE READY" in _term_text(env), "the guest's banner in xterm.js")
    from selenium.webdriver.common.keys import Keys

    assert d.find_element("id", "console-status").text == "attached (rw)"
    d.find_element("css selector", ".xterm-helper-textarea").send_keys("hello from chromium" + Keys.ENTER)
    _wait(lambda: "GOT hello from chromium" in _term_text(env), "the guest's echo in xterm.js: " + _term_text(env)[-300:], 30)
    _shots(env, "console")
    assert not [v for v in _axe(env) if not v["nodes"] or "xterm" not in " ".join(v["nodes"])], \
        "axe-core on the console outside the terminal widget"
    d.get(f"{env.s.ui_url}/ui/vms")
    _check_view(env, "vms")


def test_the_audit_page_shows_the_start_and_proves_it(env: Env) -> None:
    _login(env, env.alice)
    d = env.driver
    d.get(f"{env.s.ui_url}/ui/audit?action=vm/start&resource={env.acme_vm}")
    assert d.find_element("id", "verify-state").text == "intact"
    rows = [r for r in d.find_elements("css selector", "#records tbody tr")
            if r.get_attribute("data-action") == "vm/start" and "alice" in r.text and "allow" in r.text]
    assert rows, d.find_element("id", "records").text
    rows[0].find_element("tag name", "a").click()
    assert d.find_element("id", "proof-state").text == "verified"
    _check_view(env, "audit")
    d.get(f"{env.s.ui_url}/ui/hosts")
    _check_view(env, "hosts")
    d.get(f"{env.s.ui_url}/ui/networks")  # the diagram: bridge, the VM with its pinned address
    diagram = d.find_element("css selector", "svg.diagram").get_attribute("innerHTML")
    assert "frontend" in diagram and "acme-api" in diagram and "10.20.0.10" in diagram
    _check_view(env, "networks")


def test_a_tampered_audit_log_shows_as_broken(env: Env) -> None:
    _login(env, env.alice)
    db = sqlite3.connect(env.h.daemon.audit.path)  # what an attacker with write access to the file does
    for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'records'").fetchall():
        db.execute(f"DROP TRIGGER {trigger}")
    seq, leaf = db.execute("SELECT seq, leaf FROM records WHERE seq = 2").fetchone()
    forged = bytes(leaf).replace(b"allow", b"alloW", 1) if b"allow" in bytes(leaf) else bytes(leaf)[:-1] + b"X"
    db.execute("UPDATE records SET leaf = ? WHERE seq = ?", (forged, seq))
    db.commit()
    db.close()
    env.driver.get(f"{env.s.ui_url}/ui/audit")
    assert env.driver.find_element("id", "verify-state").text == "BROKEN"
    assert "first bad record: 2" in env.driver.find_element("id", "verify-detail").text
    _shots(env, "audit-broken")
