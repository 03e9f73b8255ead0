"""Test fleet: a controller and host agents as real processes on a real etcd cluster (docs/FLEET.md).

Each agent has its own state dir, host id and software TPM; the controller has the agents' enrollments
and policies (provisioned as an operator would with `bulkhead fleet enroll`). Agents may run in their
own network namespaces (netns=...), reaching etcd over a veth on a test bridge.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bulkhead.daemon.client import ApiClient, resolve_endpoint
from bulkhead.daemon.setup import init_state_dir
from bulkhead.daemon.testkit import fake_kernel
from bulkhead.fleet.agent import agent_config_digest
from bulkhead.fleet.etcdrun import EtcdCluster
from bulkhead.fleet.store import EtcdStore
from bulkhead.integrity.eventlog import UNVERIFIED_MANIFEST_DIGEST
from bulkhead.integrity.policy import POLICY_FORMAT, parse_enrollment

PY = sys.executable


class Fleet:
    def __init__(self, etcd: EtcdCluster, root: Path, ttl: float = 3.0, grace: float = 1.0) -> None:
        self.etcd, self.root, self.ttl, self.grace = etcd, root, ttl, grace
        self.ns = "/t" + uuid.uuid4().hex[:10]
        self.shared = root / "shared"
        (self.shared / "images").mkdir(parents=True)
        (self.shared / "images" / "k.elf").write_bytes(fake_kernel())
        self.ctl_dir = root / "ctl"
        init_state_dir(self.ctl_dir)
        self.tls = etcd.client_tls("t" + uuid.uuid4().hex[:8])
        self.store = EtcdStore(etcd.endpoints, self.tls, namespace=self.ns)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.controllers: list[subprocess.Popen[bytes]] = []
        self.netns: dict[str, str] = {}
        self.backends: dict[str, str] = {}
        self.users: dict[str, list[str]] = {}  # controller id / host -> its --etcd-user flags (etcd auth on)

    def _etcd_flags(self, endpoints: list[str] | None = None) -> list[str]:
        return ["--etcd-ca", self.tls.ca, "--etcd-cert", self.tls.cert, "--etcd-key", self.tls.key,
                "--etcd-namespace", self.ns, "--ttl", str(self.ttl), "--grace", str(self.grace)]

    def _log(self, name: str) -> Any:
        return open(self.root / f"{name}.log", "ab")

    # ---- controllers -------------------------------------------------------------------------------
    def start_controller(self, ident: str = "c1", extra: list[str] | None = None,
                         netns: str | None = None) -> subprocess.Popen[bytes]:
        argv = [PY, "-m", "bulkhead", "fleet", "serve", "--etcd", ",".join(self.etcd.endpoints),
                "--state-dir", str(self.ctl_dir), "--shared-dir", str(self.shared), "--port", "0",
                "--id", ident, *self._etcd_flags(), *self.users.get(ident, []), *(extra or [])]
        if netns:
            argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
        with self._log(ident) as log:
            p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.controllers.append(p)
        return p

    def leader(self) -> str | None:
        kv = self.store.get("/bulkhead/leader")
        return json.loads(kv.value)["id"] if kv else None

    def client(self) -> ApiClient:
        sd = self.ctl_dir
        ep = resolve_endpoint(sd, cert=str(sd / "admin.pem"), key=str(sd / "admin.key"), ca=str(sd / "ca.pem"))
        return ApiClient(ep)

    def wait_api(self, timeout: float = 30.0, leader: str | None = None) -> None:
        def up() -> bool:
            info = self.ctl_dir / "serve.json"
            if not info.exists() or (leader and json.loads(info.read_text()).get("controller") != leader):
                return False
            try:
                with self.client() as c:
                    c.get("/whoami")
                return True
            except Exception:
                return False
        wait(up, timeout, "the controller API")

    # ---- agents -------------------------------------------------------------------------------------
    def agent_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def start_agent(self, host: str, *, mem: int = 1024, slots: int = 8, enroll: bool = True,
                    netns: str | None = None, endpoints: list[str] | None = None,
                    backend: str = "fake", extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        sd = self.agent_dir(host)
        sd.mkdir(parents=True, exist_ok=True)
        argv = [PY, "-m", "bulkhead", "serve", "--fleet", ",".join(endpoints or self.etcd.endpoints),
                "--host-id", host, "--state-dir", str(sd), "--shared-dir", str(self.shared), "--backend", backend,
                "--mem", str(mem), "--vcpus", "8", "--slots", str(slots), "--dev-tpm", *self._etcd_flags(), *self.users.get(host, []), *(extra or [])]
        if netns:
            # nsenter enters only the network namespace: `ip netns exec` would also remount /sys, hiding the
            # cgroup hierarchies the jail needs
            argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
            self.netns[host] = netns
        with self._log(host) as log:
            p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.agents[host] = p
        self.backends[host] = backend
        if enroll:
            self.enroll(host)
        return p

    def enroll(self, host: str, allowed_config: str | None = None, backend: str | None = None) -> None:
        """The operator's provisioning: this host's AK enrollment and a policy naming what it may run."""
        sd = self.agent_dir(host)
        wait((sd / "integrity" / "enrollment.json").exists, 30, f"{host}'s TPM enrollment")
        enr_text = (sd / "integrity" / "enrollment.json").read_text()
        enr = parse_enrollment(enr_text)
        digest = allowed_config or agent_config_digest(
            {"host": host, "backend": backend or self.backends.get(host, "fake"), "shared_dir": str(self.shared.resolve()), "ttl": str(float(self.ttl))})
        policy = {"format": POLICY_FORMAT, "ek_sha256": enr.ek_sha256, "pcrs": {"host": 14, "vm": 15},
                  "allowed": {"manifest": [UNVERIFIED_MANIFEST_DIGEST], "config": [digest], "vm-launch": []},
                  "max_age_s": 300, "interval_s": 30, "running_vms_when_untrusted": "keep"}
        d = self.ctl_dir / "hosts" / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "enrollment.json").write_text(enr_text)
        (d / "policy.json").write_text(json.dumps(policy))
        wait((sd / "audit.vkey").exists, 30, f"{host}'s audit log key")  # witnessing (docs/FLEET.md)
        (d / "audit.vkey").write_text((sd / "audit.vkey").read_text())

    def kill_agent(self, host: str) -> None:
        p = self.agents[host]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def running_on(self, host: str) -> dict[str, int]:
        """The VMs an agent reports running (its agent.json), {} when it is dead."""
        p = self.agents.get(host)
        if p is None or p.poll() is not None:
            return {}
        try:
            info = json.loads((self.agent_dir(host) / "agent.json").read_text())
        except (OSError, ValueError):
            return {}
        return dict(info.get("vms", {})) if info.get("pid") == p.pid else {}  # not a dead predecessor's file

    def hosts(self) -> dict[str, dict[str, Any]]:
        with self.client() as c:
            return {h["host"]: h for h in c.get("/hosts")}

    def close(self) -> None:
        for p in [*self.agents.values(), *self.controllers]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.agents.values(), *self.controllers]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        from bulkhead.fleet.cli import stop_stale_dev_tpm

        for host in self.agents:  # the dev TPMs of SIGKILLed agents
            stop_stale_dev_tpm(self.agent_dir(host))
        self.store.get_prefix("/")  # still reachable: nothing else to clean (keys live in our namespace)


def wait(pred: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_vm(c: ApiClient, tenant: str, name: str, **kw: Any) -> dict[str, Any]:
    body = {"tenant": tenant, "name": name, "kernel": "k.elf", "mem_mib": kw.pop("mem_mib", 64), "cpus": 1,
            "drives": kw.pop("drives", []), **kw}
    vm: dict[str, Any] = c.post("/vms", body)
    return vm





class NoDoubleRun:
    """Samples every live agent's running VMs and disk claims continuously; records any VM seen on two hosts
    at one sample, or any disk attached writable by two (the invariant of docs/FLEET.md "Fencing")."""

    def __init__(self, fleet: Fleet, interval: float = 0.05) -> None:
        import threading

        self.fleet, self.interval = fleet, interval
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            seen: dict[str, str] = {}
            disks: dict[str, str] = {}
            for host in list(self.fleet.agents):
                p = self.fleet.agents[host]
                if p.poll() is not None:
                    continue
                try:
                    info = json.loads((self.fleet.agent_dir(host) / "agent.json").read_text())
                except (OSError, ValueError):
                    continue
                if info.get("pid") != p.pid:  # written by a killed predecessor: that process runs nothing
                    continue
                for vm in info.get("vms", {}):
                    if vm in seen:
                        self.violations.append(f"{vm} on {seen[vm]} and {host}")
                    seen[vm] = host
                for ds in info.get("disks", {}).values():
                    for d in ds:
                        if d in disks:
                            self.violations.append(f"disk {d} attached by {disks[d]} and {host}")
                        disks[d] = host
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> NoDoubleRun:
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join(5)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Underlay:
    """A bridge in the root namespace (10.77.N.1/24, where etcd listens) and one namespace per host."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.tag = tag
        self.net = f"10.77.{int(tag[:2], 16) % 200 + 20}"
        self.bridge = f"bhfb{tag}"
        self.hosts: dict[str, str] = {}
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    @property
    def address(self) -> str:
        return f"{self.net}.1"

    def add_host(self, host: str) -> str:
        i = len(self.hosts) + 10
        ns, a, b = f"bhf{self.tag}{host}", f"bhfa{self.tag}{i}", f"bhfz{self.tag}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "master", self.bridge, "up")
        sh("ip", "link", "set", b, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{self.net}.{i}/24", "dev", b)
        sh("ip", "-n", ns, "link", "set", b, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")  # the dev TPM listens on loopback
        self.hosts[host] = ns
        return ns

    def cut(self, host: str) -> None:
        """Drop every underlay packet of `host` (both ways), loopback excepted."""
        ns = self.hosts[host]
        rules = ("table inet bhfpart {\n"
                 " chain i { type filter hook input priority -10; policy accept; iifname != \"lo\" drop; }\n"
                 " chain o { type filter hook output priority -10; policy accept; oifname != \"lo\" drop; }\n}\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.encode(), check=True,
                       capture_output=True, timeout=30)

    def heal(self, host: str) -> None:
        sh("ip", "netns", "exec", self.hosts[host], "nft", "delete", "table", "inet", "bhfpart")

    def close(self) -> None:
        for ns in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


@contextlib.contextmanager
def underlay_fleet_of(root: Path, after: Any = None) -> Iterator[tuple[Fleet, Underlay]]:
    """A fleet whose etcd listens on a test bridge, agents to be placed in namespaces on it. `after(fleet)`
    runs once the agents are stopped (e.g. to clean their jails)."""
    u = Underlay()
    cluster = fleet = None
    try:
        cluster = EtcdCluster(root / "etcd", 3, host=u.address).start()
        fleet = Fleet(cluster, root / "fleet")
        yield fleet, u
    finally:
        if fleet is not None:
            fleet.close()
            if after is not None:
                after(fleet)
        if cluster is not None:
            cluster.stop()
        u.close()
