"""Fleet benchmarks (issue 18 targets, docs/FLEET.md, docs/PERFORMANCE_FLEET.md), on a real 3-member etcd:

- host loss -> the VM running elsewhere (target <= 10 s with a 3 s lease): real controller and agent
  processes (fake VM backend, dev TPMs), SIGKILL of the VM's agent, time until the API reports it running
  on the other host *and* that agent reports it;
- placement throughput through the controller with simulated agents (target >= 100 VMs/s with 100):
  the hosts' registrations (each under its own lease) and passing attestation verdicts are written by
  the benchmark (simulated agents: no TPM), then the in-process Controller places N pending VMs; each
  placement is one guarded etcd transaction;
- controller failover: SIGKILL of the leader, time until the standby holds the leader key (target <=
  one lease TTL after the leader's death, plus its poll).

Run (quiet machine): .venv/bin/python bench/bench_fleet.py --out bench/results/fleet.json
Smoke:              .venv/bin/python bench/bench_fleet.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BULKHEAD_DEV_SKIP_INTEGRITY", "1")

from bulkhead.fleet.controller import Controller  # noqa: E402
from bulkhead.fleet.etcdrun import EtcdCluster  # noqa: E402
from bulkhead.fleet.model import FleetTiming, encode, key  # noqa: E402
from bulkhead.fleet.store import EtcdStore  # noqa: E402


def placement(etcd: EtcdCluster, root: Path, hosts: int, vms: int) -> dict[str, Any]:
    store = EtcdStore(etcd.endpoints, etcd.client_tls("bench"), namespace="/b" + uuid.uuid4().hex[:8])
    now = time.time()
    for i in range(hosts):
        lease = store.grant(60)
        store.put(key("hosts", f"sim{i:03d}"), encode({"host": f"sim{i:03d}", "mem_mib": 65536, "vcpus": 64,
                                                       "slots": 64}), lease)
        store.put(key("attest", f"sim{i:03d}"), encode({"trusted": True, "reasons": [], "at": now,
                                                        "nonce": "simulated", "by": "bench"}))
        store.put(key("nonce", f"sim{i:03d}"), encode({"nonce": "simulated", "at": now}))
    (root / "ctl").mkdir(parents=True)
    ctl = Controller(store, "bench", root / "ctl", timing=FleetTiming(attest_max_age=7200, attest_interval=3600))
    for i in range(vms):
        vid = str(uuid.uuid4())
        store.put(key("vms", vid), encode({"id": vid, "tenant": f"t{i % 10}", "name": f"v{i}", "desired": "running",
                                           "spec": {"kernel": "k", "mem_mib": 64, "cpus": 1, "drives": []},
                                           "created": "", "updated": ""}))
    assert ctl.campaign()  # after the setup: the tick must not outlive the leader lease (Deposed)
    t0 = time.perf_counter()
    ticks = 0
    while True:
        assert ctl.renew()
        ctl.tick()
        ticks += 1
        placed = len(store.get_prefix(key("assign", ""))[0])
        if placed >= vms or ticks > 50:
            break
    dt = time.perf_counter() - t0
    ctl.resign()
    return {"hosts": hosts, "vms": vms, "placed": placed, "seconds": round(dt, 3), "ticks": ticks,
            "vms_per_s": round(placed / dt, 1), "target_vms_per_s": 100}


def host_loss_and_failover(etcd: EtcdCluster, root: Path, rounds: int) -> dict[str, Any]:
    from tests.fleet.kit import Fleet, make_vm, wait

    out: dict[str, Any] = {"lease_ttl_s": 3.0, "loss_s": [], "failover_s": []}
    f = Fleet(etcd, root)
    try:
        f.start_controller("c1")
        f.start_controller("c2")
        f.wait_api()
        hosts = [f"h{i}" for i in range(rounds + 1)]
        for h in hosts:
            f.start_agent(h)
        wait(lambda: len(hs := f.hosts()) == len(hosts) and all(x["state"] == "ready" for x in hs.values()), 60,
             "hosts ready")
        with f.client() as c:
            t = c.post("/tenants", {"name": "bench"})["id"]
            vm = make_vm(c, t, "v")["id"]
            c.post(f"/vms/{vm}/start", {})

        def where() -> str | None:
            with f.client() as c:
                s = c.get(f"/vms/{vm}")
            return str(s["host"]) if s["state"] == "running" and vm in f.running_on(s["host"]) else None

        for _ in range(rounds):
            first = wait(where, 30, "running")
            t0 = time.monotonic()
            f.kill_agent(first)
            wait(lambda first=first: (w := where()) is not None and w != first, 60, "moved")
            out["loss_s"].append(round(time.monotonic() - t0, 2))
        leader = f.leader()
        proc = f.controllers[0 if leader == "c1" else 1]
        t0 = time.monotonic()
        proc.kill()
        wait(lambda: f.leader() not in (None, leader), 30, "new leader")
        out["failover_s"].append(round(time.monotonic() - t0, 2))
    finally:
        f.close()
    out["target_loss_s"] = 10.0
    out["target_failover_s"] = "<= lease TTL (3 s) + standby poll (0.5 s)"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="host-loss rounds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.hosts, args.vms, args.rounds = 20, 60, 1
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = Path(tmp)
        etcd = EtcdCluster(root / "etcd", 3).start()
        try:
            result = {"smoke": args.smoke, "placement": placement(etcd, root / "p", args.hosts, args.vms),
                      "loss": host_loss_and_failover(etcd, root / "l", args.rounds)}
        finally:
            etcd.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
