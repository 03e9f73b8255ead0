"""The soak's world: a real `bulkhead serve` (jail backend, host networks, --dev-tpm, a signed copy of the
package so the host attests as trusted and VMs really start), its state directory on a small tmpfs (so it
can be filled), the API clients, the host observation and the fault injectors (issue 12 point 7).

Shared by tests/test_soak.py (CI) and bench/soak.py (long run); see tests/soak_model.py for the model and
the driver. Everything found on the host is filtered by this daemon's own network prefix and its own VM
ids, so other engineers' daemons and tests running at the same time are never counted nor touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

IDLE_C = r"""/* soak guest: says hello, then idles with interrupts enabled (every vector returns at once, nothing is
 * programmed to interrupt it): the vCPU blocks in the host kernel's hlt and costs nothing. `cli; hlt`
 * would end the VM (the VMM stops a guest that can never wake, reason "halted"). */
#include "guest.h"
int bh_want_mptable = 0;
struct gate { uint16_t lo, sel; uint8_t ist, type; uint16_t mid; uint32_t hi, zero; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(16)));
extern char soak_iret[];
__asm__(".text\nsoak_iret: iretq\n");
int main(const struct bh_bootinfo *bi) {
    (void)bi;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t h = (uint64_t)soak_iret;
    for (int i = 0; i < 256; i++)
        idt[i] = (struct gate){(uint16_t)h, cs, 0, 0x8e, (uint16_t)(h >> 16), (uint32_t)(h >> 32), 0};
    struct { uint16_t l; uint64_t b; } __attribute__((packed)) d = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" : : "m"(d));
    outb(0x21, 0xff); /* mask both PICs */
    outb(0xa1, 0xff);
    printf("soak idle guest\n");
    for (;;)
        __asm__ volatile("sti; hlt");
    return 0;
}
"""


@dataclass
class Reply:
    status: int
    body: Any
    request_id: str
    elapsed: float


class Api:
    """One client connection (mTLS with its own identity, or the root socket)."""

    def __init__(self, base: str, *, uds: str | None = None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 60.0) -> None:
        if uds:
            self.http = httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://bulkheadd",
                                     timeout=timeout)
        else:
            from bulkhead.daemon.client import client_ssl

            assert ca and cert and key
            self.http = httpx.Client(base_url=base, verify=client_ssl(ca, cert, key), timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Reply:
        t0 = time.monotonic()
        try:
            r = self.http.request(method, "/v1" + path, json=body, params=params)
        except (httpx.TransportError, OSError) as exc:
            return Reply(-1, {"detail": f"transport: {exc!r}"}, "", time.monotonic() - t0)
        try:
            data = r.json() if r.content else None
        except ValueError:
            data = {"detail": r.text[:500]}
        return Reply(r.status_code, data, r.headers.get("x-request-id", ""), time.monotonic() - t0)

    def close(self) -> None:
        self.http.close()


def _signed_manifest(root: Path) -> dict[str, str]:
    """A release key of our own and a signed manifest of the package this interpreter imports (the jailed
    worker runs `python -I -m bulkhead`, so it imports the installed package, not a copy): a verified
    install, which the dev TPM's starting policy allows, so the host attests as trusted and VMs start.
    Returns the environment that points the daemon and its workers at them."""
    import bulkhead
    from bulkhead.integrity import manifest as mf

    pkg = Path(bulkhead.__file__).resolve().parent
    if not (root / "manifest.json").exists():
        priv, pub = mf.generate_key()
        (root / "release.pub").write_bytes(pub)
        (root / "manifest.json").write_text(json.dumps(mf.sign_manifest(mf.build_manifest(pkg), priv)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("BULKHEAD_DEV_SKIP_INTEGRITY", "BULKHEAD_TCTI", "PYTHONPATH")}
    env.update(BULKHEAD_MANIFEST=str(root / "manifest.json"), BULKHEAD_RELEASE_KEY=str(root / "release.pub"))
    return env


class World:
    """The daemon under test and the host it changes. `prefix` names this daemon's network objects."""

    def __init__(self, root: Path, prefix: str, fs_mib: int = 48, log: Any = print) -> None:
        from bulkhead.network.state import HostConfig

        self.root = root
        self.prefix = prefix
        self.state = root / "state"
        self.fs_mib = fs_mib
        self.cfg = HostConfig(prefix=prefix)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.mounted = False
        self.daemon_logs: list[str] = []
        self._policy_lock = threading.RLock()
        self._allowed: set[str] = set()
        self._pending: set[str] = set()

    # ------------------------------------------------------------------ setup / teardown
    def setup(self) -> None:
        from bulkhead.guests.build import build

        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.fs_mib}m,mode=0700", "soak", str(self.state)],
                       check=True)
        self.mounted = True
        self.env = _signed_manifest(self.root)
        self.bulkhead("init", "--state-dir", str(self.state), check=True)
        src = self.root / "soak_idle.c"
        src.write_text(IDLE_C)
        shutil.copy(build(str(src)), self.state / "images" / "idle")
        self.start_daemon()

    def bulkhead(self, *argv: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "bulkhead", *argv], env=self.env, cwd=str(self.root),
                             capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"bulkhead {' '.join(argv)} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def start_daemon(self, timeout: float = 60.0) -> None:
        from bulkhead.daemon.testkit import wait_serve_info

        logf = open(self.root / f"daemon-{len(self.daemon_logs)}.log", "wb")  # noqa: SIM115 (kept by the child)
        self.daemon_logs.append(logf.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bulkhead", "serve", "--state-dir", str(self.state), "--port", "0",
             "--backend", "jail", "--network", "host", "--net-prefix", self.prefix, "--dev-tpm"],
            stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.root))
        logf.close()
        self.info = wait_serve_info(self.state, self.proc, timeout)

    def daemon_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def daemon_tail(self, n: int = 30) -> str:
        if not self.daemon_logs:
            return ""
        lines = Path(self.daemon_logs[-1]).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Signal the daemon and wait for it; returns the seconds it took."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return time.monotonic() - t0

    def teardown(self) -> None:
        from bulkhead.network import host

        if self.proc is not None and self.proc.poll() is None:
            self.stop_daemon(signal.SIGTERM, 40)
        with contextlib.suppress(Exception):
            host.teardown(self.cfg)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.state)], check=False)
            self.mounted = False

    # ------------------------------------------------------------------ clients
    def root_api(self) -> Api:
        return Api("", uds=str(self.state / "bulkhead.sock"))

    def tls_api(self, name: str) -> Api:
        ids = self.root / "ids"
        return Api(f"https://127.0.0.1:{self.info['port']}", ca=str(self.state / "ca.pem"),
                   cert=str(ids / f"{name}.pem"), key=str(ids / f"{name}.key"))

    def issue_identity(self, api: Api, name: str) -> str:
        """A principal with its own key and certificate (CSR through the API); returns its id."""
        from bulkhead.daemon import pki

        key = pki.new_key()
        r = api.call("POST", "/principals", {"name": name, "csr_pem": pki.make_csr(key, name).decode(), "days": 30})
        assert r.status == 201, r
        ids = self.root / "ids"
        ids.mkdir(exist_ok=True)
        pki.write_private(ids / f"{name}.key", pki.key_pem(key))
        pki.write_private(ids / f"{name}.pem", r.body["certificate_pem"].encode(), 0o644)
        return str(r.body["principal"]["id"])

    def allow_launch(self, digest: str) -> None:
        """The operator's step: add a guest's launch digest to the policy (atomic replace; re-read by the
        daemon when the file changes)."""
        with self._policy_lock:
            if digest in self._allowed:
                return
            self._pending.add(digest)
            self.flush_policy()

    def flush_policy(self) -> None:
        """Write the pending digests (a full state filesystem keeps them pending: retried at the next call)."""
        with self._policy_lock:
            if not self._pending:
                return
            path = self.state / "integrity" / "policy.json"
            tmp = path.with_suffix(".tmp")
            try:
                doc = json.loads(path.read_text())
                doc["allowed"]["vm-launch"] += sorted(self._pending - set(doc["allowed"]["vm-launch"]))
                tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
            self._allowed |= self._pending
            self._pending.clear()

    def audit_verify(self) -> tuple[bool, str]:
        res = self.bulkhead("audit", "verify", "--state-dir", str(self.state))
        return res.returncode == 0, (res.stdout + res.stderr).strip()

    def audit_request_ids(self) -> set[str]:
        """The request ids of every record in audit.db (decoded from the leaves, as `audit query` does)."""
        from bulkhead.daemon.auditlog import query_records

        return {str(r.get("request_id") or "") for r in query_records(self.state / "audit.db", limit=None)}

    def _ip(self, ns: str | None, *argv: str) -> str:
        pre = ["ip", "-n", ns] if ns else ["ip"]
        return subprocess.run([*pre, *argv], capture_output=True, text=True, timeout=30, check=False).stdout

    def observe(self, vm_ids: set[str]) -> dict[str, Any]:
        """What exists on the host of this daemon: namespaces, links per namespace (ours only), nftables
        tables per namespace, live dnsmasq per bridge, and which of the given VM ids have a cgroup, a jail
        directory and worker processes (the processes in the VM's cgroup)."""
        from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
        from bulkhead.sandbox.stale import slot_of

        out: dict[str, Any] = {"netns": set(), "links": {}, "tables": {}, "dnsmasq": {}, "cgroups": set(),
                               "jails": set(), "workers": set()}
        for line in self._ip(None, "netns", "list").splitlines():
            name = line.split()[0] if line.strip() else ""
            if self.cfg.owns_netns(name):
                out["netns"].add(name)
        for ns in out["netns"]:
            links = set()
            for line in self._ip(ns, "-o", "link").splitlines():
                parts = line.split(": ")
                if len(parts) > 1:
                    name = parts[1].split("@")[0]
                    if self.cfg.owns_link(name):
                        links.add(name)
            out["links"][ns] = links
            res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"], capture_output=True,
                                 text=True, timeout=30, check=False).stdout
            data = json.loads(res or '{"nftables": []}')
            out["tables"][ns] = {f"{t['table']['family']} {t['table']['name']}" for t in data["nftables"]
                                 if "table" in t and t["table"]["name"].startswith(self.prefix + "_")}
        base = f"--conf-file={self.cfg.state_dir}/{self.prefix}b"
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"dnsmasq"):
                for a in argv:
                    s = a.decode(errors="replace")
                    if s.startswith(base) and s.endswith(".conf"):
                        bridge = s.rsplit("/", 1)[1][:-5]
                        out["dnsmasq"].setdefault(bridge, []).append(int(pid))
        for vm in vm_ids:
            jid = slot_of(vm) or vm  # a pooled VM's jail and cgroup carry its slot's id
            cg = VmCgroup(jid, CgroupLimits(0, 0, 0))
            if any(os.path.exists(d) for d in cg.dirs.values()):
                out["cgroups"].add(vm)
                if cg.pids():
                    out["workers"].add(vm)
            if os.path.exists(f"/run/bulkhead/jail/{jid}"):
                out["jails"].add(vm)
        return out

    def children(self, pid: int) -> list[int]:
        try:
            return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def _comm(self, pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def swtpm_pids(self) -> list[int]:
        needle = str(self.state / "integrity" / "devtpm")
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and "swtpm" in (c := self._comm(int(p)))
                and needle in c]

    # ------------------------------------------------------------------ fault primitives
    def kill_dnsmasq(self, bridge: str) -> int | None:
        pids = self.observe(set())["dnsmasq"].get(bridge, [])
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        return pids[0] if pids else None

    def kill_worker(self, vm: str) -> bool:
        """SIGKILL the worker processes of a VM (found through its cgroup)."""
        from bulkhead.sandbox.cgroups import CgroupLimits, VmCgroup
        from bulkhead.sandbox.stale import slot_of

        cg = VmCgroup(slot_of(vm) or vm, CgroupLimits(0, 0, 0))
        procs: set[int] = set()
        for d in cg.dirs.values():
            with contextlib.suppress(OSError, ValueError):
                procs.update(int(x) for x in Path(d, "cgroup.procs").read_text().split())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        return bool(procs)

    def delete_link(self, ns: str, name: str) -> bool:
        return subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True, check=False).returncode == 0

    def fill_disk(self) -> Path:
        """Fill the state filesystem with a ballast file until ENOSPC (unbuffered writes)."""
        ballast = self.state / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for size in (1 << 20, 4096, 512):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        return ballast

    def free(self) -> int:
        st = os.statvfs(self.state)
        return st.f_bavail * st.f_frsize

    def hold_exclusive(self, db: str, seconds: float) -> threading.Thread:
        """Another connection holds BEGIN EXCLUSIVE on <state>/<db> for `seconds` (in a thread)."""
        ready = threading.Event()

        def hold() -> None:
            conn = sqlite3.connect(self.state / db, isolation_level=None, timeout=30)
            try:
                conn.execute("BEGIN EXCLUSIVE")
                ready.set()
                time.sleep(seconds)
                conn.execute("ROLLBACK")
            finally:
                ready.set()
                conn.close()

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        ready.wait(30)
        return t
