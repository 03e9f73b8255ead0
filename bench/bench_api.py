"""Management-plane benchmarks: API requests/s and p50/p99 latency over mTLS with connection reuse
(authorized `vm get`, `vm create` of a stopped VM, audit enabled), the same against a bare ASGI app on an
identical uvicorn + TLS 1.3 server (the peer: what the transport alone costs), audit appends/s (one
writer and eight concurrent writers: group commit), `audit verify` time for 1 million records, and RBAC
decision cost (pycasbin vs the plain-Python reference evaluator).

    .venv/bin/python bench/bench_api.py                 # full run, prints markdown, writes JSON
    .venv/bin/python bench/bench_api.py --quick         # smaller counts (smoke test)
    .venv/bin/python bench/bench_api.py --peer          # issue 16 item 5 only: vs a bare FastAPI app

`--peer` (issue 16 item 5): bulkhead against a bare FastAPI app on the same uvicorn + mTLS setup whose POST
does one fsync'd SQLite commit per request (WAL, synchronous=FULL: the honest minimum for a durable
write), alternating, GET/s and POST/s with 1 and 8 keep-alive clients, medians of `--rounds` (>= 5).
bulkhead's GET is an authorized `vm get` (audited), its POST a `tenant create` (state + audit, durable).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from bulkhead.daemon.testkit import fake_kernel, wait_serve_info  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ctx(root: Path) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(root / "ca.pem"))
    c.load_cert_chain(str(root / "admin.pem"), str(root / "admin.key"))
    return c


def timed(fn, n: int) -> dict[str, float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    return {"n": n, "req_per_s": n / total, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


def concurrent(make_fn, n_per: int, threads: int) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        fn, close = make_fn(w)
        mine = []
        for i in range(n_per):
            s = time.perf_counter()
            fn(i)
            mine.append(time.perf_counter() - s)
        close()
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = time.perf_counter() - t0
    return {"n": len(lat), "threads": threads, "req_per_s": len(lat) / total,
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


_SERVE = r"""sslctx = make_server_ssl(sd)
cfg = uvicorn.Config(app, host="127.0.0.1", port=0, http=TlsProtocol, ssl_context_factory=lambda c, f: sslctx,
                     lifespan="off", log_level="warning", access_log=False)
server = _Server(cfg)
async def main():
    sock = _tcp_socket("127.0.0.1", 0)  # the daemon's own listener setup
    port = sock.getsockname()[1]
    t = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    (sd.root / "baseline.json").write_text(json.dumps({"pid": os.getpid(), "port": port}))
    await t
asyncio.run(main())
"""  # the TLS listener tail both baseline servers share

BASELINE = r"""
import sys, ssl, json, os, asyncio
sys.path.insert(0, sys.argv[2])
from bulkhead.daemon.server import make_server_ssl, _Server, TlsProtocol, _tcp_socket
from bulkhead.daemon.daemon import StateDir
import uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"id": "x", "state": "stopped"}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
sd = StateDir(__import__("pathlib").Path(sys.argv[1]))
""" + _SERVE


class Target:
    """One running server and a prepared client: a bulkhead daemon (casbin or pure) or the bare peer."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        if kind == "baseline":
            (root / "baseline.json").unlink(missing_ok=True)
            self.proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(root), str(ROOT / "src")])
            for _ in range(600):
                if (root / "baseline.json").exists():
                    break
                time.sleep(0.05)
            self.url = f"https://127.0.0.1:{json.loads((root / 'baseline.json').read_text())['port']}"
            self.get_path = "/x"
            self.client = httpx.Client(base_url=self.url, verify=ctx(root))
            return
        # The API benchmark measures the API, not VM starts: VM-less fake backend, integrity gate off (allowed
        # only with the fake backend, loud and audited), code check skipped explicitly.
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BULKHEAD_DEV_SKIP_INTEGRITY": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bulkhead", "serve", "--state-dir", str(root), "--port", "0", "--backend",
             "fake", "--engine", kind, "--integrity", "off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env)
        info = wait_serve_info(root, self.proc)
        self.url = f"https://127.0.0.1:{info['port']}"
        self.client = httpx.Client(base_url=self.url, verify=ctx(root))
        self.tenant = self.client.post("/v1/tenants", json={"name": f"b-{kind}"}).json()["id"]
        vm = self.client.post("/v1/vms", json={"tenant": self.tenant, "name": "target", "kernel": "vmlinux"})
        self.get_path = f"/v1/vms/{vm.json()['id']}"
        self.created = 0

    def get(self, i: int) -> None:
        r = self.client.get(self.get_path)
        assert r.status_code == 200, r.text

    def create(self, i: int) -> None:
        self.created += 1
        r = self.client.post("/v1/vms", json={"tenant": self.tenant, "name": f"v{self.created}", "kernel": "vmlinux"})
        assert r.status_code == 201, r.text

    def close(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _merge(parts: list[dict[str, float]], lat_key: str = "") -> dict[str, float]:
    rates = sorted(p["req_per_s"] for p in parts)
    return {"rounds": len(parts), "n": sum(int(p["n"]) for p in parts), "req_per_s_median": rates[len(rates) // 2],
            "req_per_s_min": rates[0], "req_per_s_max": rates[-1],
            "p50_ms_median": sorted(p["p50_ms"] for p in parts)[len(parts) // 2],
            "p99_ms_median": sorted(p["p99_ms"] for p in parts)[len(parts) // 2]}


def api_bench(base: Path, n_get: int, n_create: int, rounds: int) -> dict[str, object]:
    """All three servers run at once; rounds interleave them so the shared machine's noise hits each
    equally. Reported: median over rounds of req/s, p50, p99."""
    from bulkhead.daemon.setup import init_state_dir

    targets = {}
    for kind in ("casbin", "pure", "baseline"):
        root = base / kind
        init_state_dir(root)
        (root / "images" / "vmlinux").write_bytes(fake_kernel())
        targets[kind] = Target(kind, root)
    res: dict[str, dict[str, list[dict[str, float]]]] = {k: {} for k in targets}
    try:
        for t in targets.values():
            timed(t.get, 100)  # warm up
        for _ in range(rounds):
            for kind, t in targets.items():
                res[kind].setdefault("vm_get", []).append(timed(t.get, n_get))
                if kind != "baseline":
                    res[kind].setdefault("vm_create", []).append(timed(t.create, n_create))

                def make(w: int, t: Target = t):
                    cl = httpx.Client(base_url=t.url, verify=ctx(t.root))
                    return (lambda i: cl.get(t.get_path)), cl.close

                res[kind].setdefault("vm_get_4conn", []).append(concurrent(make, n_get // 4, 4))
    finally:
        for t in targets.values():
            t.close()
    return {kind: {op: _merge(parts) for op, parts in ops.items()} for kind, ops in res.items()}


PEER = r"""
import sys, json, os, asyncio, sqlite3, threading
sys.path.insert(0, sys.argv[2])
from bulkhead.daemon.server import make_server_ssl, _Server, TlsProtocol, _tcp_socket
from bulkhead.daemon.daemon import StateDir
from fastapi import FastAPI
import uvicorn
app = FastAPI()
db = os.path.join(sys.argv[1], "peer.db")
init = sqlite3.connect(db)
init.execute("PRAGMA journal_mode=WAL")
init.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
init.close()
local = threading.local()
def conn():
    c = getattr(local, "c", None)
    if c is None:
        c = local.c = sqlite3.connect(db, isolation_level=None, timeout=30)
        c.execute("PRAGMA synchronous=FULL")
    return c
@app.get("/x")
def get_x():
    row = conn().execute("SELECT COUNT(*) FROM t").fetchone()
    return {"id": "x", "state": "stopped", "n": row[0]}
@app.post("/x", status_code=201)
def post_x(body: dict):
    c = conn()
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(name) VALUES (?)", (str(body.get("name", "")),))
    c.execute("COMMIT")
    return {"id": "x", "name": body.get("name")}
sd = StateDir(__import__("pathlib").Path(sys.argv[1]))
""" + _SERVE


def peer_bench(base: Path, n: int, rounds: int) -> dict[str, object]:
    """bulkhead vs the bare FastAPI peer, alternating; GET/s and POST/s with 1 and 8 clients."""
    from bulkhead.daemon.setup import init_state_dir

    roots = {k: base / f"peer-{k}" for k in ("bulkhead", "fastapi")}
    for root in roots.values():
        init_state_dir(root)
        (root / "images" / "vmlinux").write_bytes(fake_kernel())
    targets = {"bulkhead": Target("casbin", roots["bulkhead"])}
    (roots["fastapi"] / "baseline.json").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(roots["fastapi"]), str(ROOT / "src")])
    for _ in range(600):
        if (roots["fastapi"] / "baseline.json").exists():
            break
        time.sleep(0.05)
    port = json.loads((roots["fastapi"] / "baseline.json").read_text())["port"]
    counter = iter(range(10**9))

    def ops(kind: str) -> tuple[str, str, str, Any]:
        if kind == "bulkhead":
            t = targets["bulkhead"]
            return t.url, t.get_path, "/v1/tenants", t.root
        return f"https://127.0.0.1:{port}", "/x", "/x", roots["fastapi"]

    def run(kind: str, method: str, clients: int) -> dict[str, float]:
        url, get_path, post_path, root = ops(kind)

        def make(w: int) -> Any:
            cl = httpx.Client(base_url=url, verify=ctx(root), timeout=60)
            cl.get(get_path)  # the keep-alive connection is up before the clock starts

            def one(i: int) -> None:
                if method == "GET":
                    r = cl.get(get_path)
                else:
                    r = cl.post(post_path, json={"name": f"p{next(counter)}"})
                assert r.status_code in (200, 201), r.text
            return one, cl.close

        return concurrent(make, max(1, n // clients), clients)

    res: dict[str, dict[str, list[dict[str, float]]]] = {k: {} for k in ("bulkhead", "fastapi")}
    try:
        for kind in res:
            run(kind, "GET", 1)  # warm up
        for _ in range(rounds):
            for method in ("GET", "POST"):
                for clients in (1, 8):
                    for kind in res:  # alternating: the shared machine's noise hits both alike
                        res[kind].setdefault(f"{method}_{clients}", []).append(run(kind, method, clients))
    finally:
        targets["bulkhead"].close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out: dict[str, object] = {k: {op: _merge(parts) for op, parts in v.items()} for k, v in res.items()}
    out["ratio_bulkhead_over_fastapi"] = {
        op: round(out["bulkhead"][op]["req_per_s_median"] / out["fastapi"][op]["req_per_s_median"], 3)  # type: ignore[index]
        for op in res["bulkhead"]}
    return out


def audit_bench(tmp: Path, n: int) -> dict[str, object]:
    """Append throughput of the audit log (bench/bench_audit.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_audit import append_bench

    return append_bench(tmp, n)


def verify_bench(tmp: Path, n: int) -> dict[str, object]:
    """`audit verify` of n records from scratch, plus proof costs (bench/bench_audit.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_audit import verify_bench as vb

    return vb(tmp, n)


def rbac_bench(n: int) -> dict[str, object]:
    from bulkhead.control.rbac import (
        BUILTIN_ROLES,
        Assignment,
        CasbinEvaluator,
        PureEvaluator,
        RoleDef,
        vm_scope,
    )

    roles = [RoleDef(str(uuid.uuid4()), r.name, r.actions, r.not_actions, r.assignable_scopes, "", True)
             for r in BUILTIN_ROLES]
    t, v = str(uuid.uuid4()), str(uuid.uuid4())
    out: dict[str, object] = {}
    for k in (1, 10, 100):
        asg = [Assignment(str(i), "p", roles[i % 5].id, vm_scope(str(uuid.uuid4()), str(uuid.uuid4())))
               for i in range(k - 1)] + [Assignment("x", "p", roles[3].id, vm_scope(t, v))]
        for cls in (CasbinEvaluator, PureEvaluator):
            ev = cls()
            ev.load(roles, asg)
            ev.allowed("p", "vm/start", vm_scope(t, v))
            t0 = time.perf_counter()
            for _ in range(n):
                ev.allowed("p", "vm/start", vm_scope(t, v))
            out[f"{cls.__name__}_{k}_assignments_us"] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--verify-records", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--peer", action="store_true", help="only bulkhead vs the bare FastAPI app (issue 16)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=400, help="per measurement (--peer)")
    a = p.parse_args()
    if a.peer:
        with tempfile.TemporaryDirectory() as d:
            results = peer_bench(Path(d), a.requests, a.rounds)
        print(json.dumps(results, indent=2))
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
        return 0
    n_get, n_create, n_audit, rounds = (200, 60, 500, 2) if a.quick else (1000, 300, 3000, 5)
    n_verify = a.verify_records or (20000 if a.quick else 1_000_000)
    results: dict[str, object] = {"quick": a.quick, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        results["api"] = api_bench(Path(d), n_get, n_create, rounds)
        results["audit"] = audit_bench(Path(d), n_audit)
        results["verify"] = verify_bench(Path(d), n_verify)
    results["rbac"] = rbac_bench(5000)
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
