"""Start rate and density through the daemon, jail backend (issue 16.2), side by side with QEMU.

    # as root, after install.sh (the installed, verified launchers; a software TPM for the gate):
    .venv/bin/python bench/bench_daemon.py [--starts 30] [--inflight 4] [--density 50] [--json OUT]

1. start rate: a real `bulkheadd --backend jail --dev-tpm` (mTLS API on 127.0.0.1). Each VM is created
   and started through the API (bench/payloads/hello_exit.c, 16 MiB); per VM: start request latency,
   time from the start request to the guest's first console line, to `exited`. Sequential (one in
   flight) and with --inflight VMs in flight: VMs/s to exit, and per core (os.cpu_count()).
   Peer: sequential cold starts of `qemu-system-x86_64 -M microvm` for the same payload (start-to-exit).
2. density: --density idle VMs (bench/payloads/idle.c: PIC masked, `sti; hlt` for ever) started
   through the API, then, once each printed IDLE, the RSS and PSS of all processes of each VM (the
   daemon's children: reaper + worker) minus the resident part of the guest-RAM mapping (the anonymous
   mapping of exactly the guest's size). The same for as many `qemu-system-x86_64` processes (-m 16).
   Reported: median per VM, bulkhead/QEMU ratio (target <= 0.5x by RSS).

BULKHEAD_BENCH_LAUNCHER names the `bulkhead` launcher (default: the one on PATH); `bulkheadd` is taken
from the same directory. A smoke run on a loaded machine: `--starts 4 --inflight 2 --density 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from bulkhead.guests.build import build  # noqa: E402

LAUNCHER = os.environ.get("BULKHEAD_BENCH_LAUNCHER") or shutil.which("bulkhead") or str(ROOT / ".venv/bin/bulkhead")
DAEMON = str(Path(LAUNCHER).with_name("bulkheadd"))
MEM_MIB = 16
QEMU = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-nodefaults",
        "-no-user-config", "-nographic", "-serial", "stdio", "-m", str(MEM_MIB),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]  # fmt: skip


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        subprocess.run([LAUNCHER, "init", "--state-dir", str(root)], check=True, capture_output=True)
        self.proc = subprocess.Popen([DAEMON, "--state-dir", str(root), "--port", "0", "--backend", "jail",
                                      "--dev-tpm"], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "bulkheadd.log", "wb"))  # noqa: SIM115 - a pipe nobody reads fills and blocks the daemon's logging
        deadline = time.monotonic() + 60
        while True:
            try:
                info = json.loads((root / "serve.json").read_text())
                if info.get("pid") == self.proc.pid:
                    break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bulkheadd did not start: {(root / 'bulkheadd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        ctx = ssl.create_default_context(cafile=str(root / "ca.pem"))
        ctx.load_cert_chain(str(root / "admin.pem"), str(root / "admin.key"))
        self.url = f"https://127.0.0.1:{info['port']}" if "port" in info else str(info["url"])
        self.ctx = ctx
        with self.client() as c:
            self.tenant = c.post("/v1/tenants", json={"name": "bench"}).json()["id"]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.ctx, timeout=120)

    def image(self, name: str, path: Path) -> None:
        """Install the guest image and add its launch digest to the policy's golden values (what an operator
        does for a new guest: docs/INTEGRITY.md "VM start"); the daemon rereads the policy file."""
        shutil.copyfile(path, self.root / "images" / name)
        with self.client() as c:
            r = c.post("/v1/vms", json={"tenant": self.tenant, "name": f"measure-{name}", "kernel": name,
                                        "mem_mib": MEM_MIB})
            r.raise_for_status()
            vm = r.json()["id"]
            digest = c.get(f"/v1/vms/{vm}/measurement").json()["digest"]
            c.delete(f"/v1/vms/{vm}")
        policy = self.root / "integrity" / "policy.json"
        doc = json.loads(policy.read_text())
        doc.setdefault("allowed", {}).setdefault("vm-launch", [])
        if digest not in doc["allowed"]["vm-launch"]:
            doc["allowed"]["vm-launch"].append(digest)
            tmp = policy.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, policy)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_start(c: httpx.Client, tenant: str, name: str, image: str, marker: str, until_exit: bool) -> dict[str, float]:
    r = c.post("/v1/vms", json={"tenant": tenant, "name": name, "kernel": image, "mem_mib": MEM_MIB})
    r.raise_for_status()
    vm = r.json()["id"]
    t0 = time.perf_counter()
    r = c.post(f"/v1/vms/{vm}/start")
    if r.status_code >= 400:
        raise RuntimeError(f"start of {name} refused: {r.status_code} {r.text[:500]}")
    out = {"vm": vm, "start_request_s": time.perf_counter() - t0}
    while "first_output_s" not in out or (until_exit and "exit_s" not in out):
        if "first_output_s" not in out and marker in c.get(f"/v1/vms/{vm}/console").json().get("data", ""):
            out["first_output_s"] = time.perf_counter() - t0
        if until_exit and "exit_s" not in out and c.get(f"/v1/vms/{vm}").json()["state"] == "exited":
            out["exit_s"] = time.perf_counter() - t0
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"VM {vm} did not reach {marker!r}/exit in 120 s")
        time.sleep(0.002)
    return out


_ROWS_LOCK = threading.Lock()


def _loop(d: Daemon, prefix: str, n: int, rows: list[dict[str, float]]) -> None:
    with d.client() as c:
        for i in range(n):
            row = one_start(c, d.tenant, f"{prefix}-{i}", "hello", "HELLO", True)
            with _ROWS_LOCK:
                rows.append(row)


def bench_rate(d: Daemon, starts: int, inflight: int) -> dict[str, Any]:
    d.image("hello", build(str(ROOT / "bench/payloads/hello_exit.c")))
    res: dict[str, Any] = {}
    for label, k in (("sequential", 1), (f"inflight_{inflight}", inflight)):
        rows: list[dict[str, float]] = []
        per = max(1, starts // k)
        threads = [threading.Thread(target=_loop, args=(d, f"{label.replace('_', '-')}-{w}", per, rows))
                   for w in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        res[label] = {"vms": len(rows), "vms_per_s_to_exit": len(rows) / wall,
                      "vms_per_s_per_core": len(rows) / wall / (os.cpu_count() or 1),
                      **{k2: spread([r[k2] for r in rows]) for k2 in ("start_request_s", "first_output_s", "exit_s")}}
    hello = build(str(ROOT / "bench/payloads/hello_exit.c"))
    q = []
    for _ in range(max(5, starts // 3)):
        t0 = time.perf_counter()
        subprocess.run([*QEMU, "-kernel", str(hello)], capture_output=True, timeout=60)
        q.append(time.perf_counter() - t0)
    res["qemu_cold_start_to_exit_s"] = spread(q)
    res["ratio_sequential_exit_over_qemu"] = res["sequential"]["exit_s"]["median"] / res["qemu_cold_start_to_exit_s"]["median"]
    return res


def _smaps(pid: int, guest_bytes: int) -> tuple[int, int, int]:
    """(Rss, Pss, Rss of the guest-RAM mapping) in KiB of one process."""
    rss = pss = guest = size = 0
    anon = False
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                size = hi - lo
                anon = len(head) < 6
            elif head[0] == "Rss:":
                kib = int(head[1])
                rss += kib
                if anon and size == guest_bytes:
                    guest += kib
            elif head[0] == "Pss:":
                pss += int(head[1])
    return rss, pss, guest


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                continue
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _per_vm(groups: list[list[int]]) -> dict[str, Any]:
    rows = []
    for pids in groups:
        rss = pss = guest = 0
        for p in pids:
            r, s, g = _smaps(p, MEM_MIB << 20)
            rss, pss, guest = rss + r, pss + s, guest + g
        rows.append({"rss_kib": rss, "pss_kib": pss, "guest_kib": guest, "overhead_rss_kib": rss - guest,
                     "overhead_pss_kib": pss - guest})
    return {k: spread([float(r[k]) for r in rows]) for k in rows[0]} if rows else {}


def bench_density(d: Daemon, n: int) -> dict[str, Any]:
    idle = build(str(ROOT / "bench/payloads/idle.c"))
    d.image("idle", idle)
    vms = []
    with d.client() as c:
        for i in range(n):
            vms.append(one_start(c, d.tenant, f"idle-{i}", "idle", "IDLE", False)["vm"])
        time.sleep(1.0)
        # each VM's processes: a daemon child (the reaper) and its descendants
        groups = [[p, *_children(p)] for p in sorted(set(_children(d.proc.pid)) & set(_direct(d.proc.pid)))]
        bh = _per_vm([g for g in groups if len(g) >= 2])
        for vm in vms:
            c.post(f"/v1/vms/{vm}/stop")
    procs = []
    try:
        for _ in range(n):
            p = subprocess.Popen([*QEMU, "-kernel", str(idle)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL)
            assert p.stdout is not None
            while b"IDLE" not in p.stdout.readline():
                pass
            procs.append(p)
        time.sleep(1.0)
        qe = _per_vm([[p.pid] for p in procs])
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = {"vms": n, "bulkhead_per_vm_kib": bh, "qemu_per_vm_kib": qe}
    if bh and qe:
        out["ratio_overhead_rss"] = bh["overhead_rss_kib"]["median"] / qe["overhead_rss_kib"]["median"]
        out["ratio_overhead_pss"] = bh["overhead_pss_kib"]["median"] / qe["overhead_pss_kib"]["median"]
    return out


def _direct(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--density", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon: the jail backend needs root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp) / "state")
        try:
            result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "launcher": LAUNCHER,
                      "start_rate": bench_rate(d, a.starts, a.inflight),
                      "density": bench_density(d, a.density) if a.density else "skipped"}
        finally:
            d.close()
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
