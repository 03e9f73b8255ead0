"""Cross-host overlay smoke benchmark (root): TCP throughput and ping latency across WireGuard + VXLAN.

Two namespace "hosts" on a veth underlay (as in tests/test_network_overlay.py), one tenant network
spanning both, three stand-in VMs (veth mode, so the per-NIC guard rules apply): v1 and v2 on host 1,
v3 on host 2. Measured in the same run: v1 -> v2 (the same host: the single-host bridge, the peer) and
v1 -> v3 (across the overlay: VXLAN in userspace wireguard-go on these machines), iperf3 TCP for
`--seconds` and `busybox ping` RTT (20 pings), interleaved `--runs` times, medians and their ratio.

    .venv/bin/python bench/bench_overlay.py [--runs 3] [--seconds 3] [--json out.json]

A smoke figure: the machine is shared, so compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT), str(ROOT / "src")]

from bulkhead.network import host, overlay  # noqa: E402
from bulkhead.network.model import attach_nic, make_network  # noqa: E402
from bulkhead.network.overlay_model import OverlayNetwork, OverlayPeer, make_overlay  # noqa: E402
from bulkhead.network.standin import GuestStandIn  # noqa: E402
from bulkhead.network.state import HostConfig  # noqa: E402


def sh(ns: str, *argv: str) -> str:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *argv], capture_output=True, text=True,
                       timeout=120, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{argv}: {r.stderr.strip()}")
    return r.stdout


def iperf(src: GuestStandIn, dst: GuestStandIn, seconds: int) -> float:
    srv = dst.popen(["iperf3", "-s", "-1", "-B", str(dst.nic.ipv4)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.4)
        out = src.run(["iperf3", "-J", "-c", str(dst.nic.ipv4), "-t", str(seconds)], timeout=seconds + 30).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        srv.wait(timeout=10)


def rtt(src: GuestStandIn, dst: GuestStandIn) -> float:
    out = src.run(["busybox", "ping", "-c20", "-i", "0.05", "-W2", str(dst.nic.ipv4)], timeout=60).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise SystemExit(f"ping failed: {out}")
    return float(m.group(1)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tag = secrets.token_hex(1)
    sw = f"b{tag}sw"
    hns = [f"b{tag}h1", f"b{tag}h2"]
    stands: list[GuestStandIn] = []
    cfgs = [HostConfig(prefix=f"b{tag}{i}", state_dir=f"/run/bulkhead-bench-b{tag}{i}", host_netns=hns[i - 1])
            for i in (1, 2)]
    for ns in [sw, *hns]:
        host.netns_create(ns)
    try:
        sh(sw, "ip", "link", "add", "br0", "type", "bridge")
        sh(sw, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(hns, 1):
            sh(sw, "ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(sw, "ip", "link", "set", f"p{i}", "master", "br0", "up")
            sh(ns, "ip", "addr", "add", f"198.19.8.{i}/24", "dev", "eth0")
            sh(ns, "ip", "link", "set", "eth0", "up")
        net = make_network("bench-net", "tenant-a", "a", "10.30.0.0/24")
        nics = []
        for vm in ("v1", "v2", "v3"):
            nics.append(attach_nic(vm, "tenant-a", 0, net, nics))
        keys = [overlay.generate_keypair() for _ in hns]
        peers = [OverlayPeer(f"h{i}", f"198.19.8.{i}", keys[i - 1][1]) for i in (1, 2)]
        local = [nics[:2], nics[2:]]
        for i, cfg in enumerate(cfgs):
            host.reconcile([net], local[i], cfg)
            spec = make_overlay(f"h{i + 1}", f"198.19.8.{i + 1}", keys[i][0], peers, [OverlayNetwork(net, 4242)],
                                local_nics=local[i])
            overlay.reconcile(spec, cfg)
        for i, cfg in enumerate(cfgs):
            for nic in local[i]:
                g = GuestStandIn(nic, net, cfg, mode="veth")
                stands.append(g)
                g.open()
        v1, v2, v3 = stands
        v1.run(["busybox", "ping", "-c3", "-W2", str(v3.nic.ipv4)], timeout=30)  # handshake, ARP
        res: dict[str, list[float]] = {"local_mbps": [], "overlay_mbps": [], "local_rtt_us": [], "overlay_rtt_us": []}
        for _ in range(args.runs):
            res["local_mbps"].append(iperf(v1, v2, args.seconds))
            res["overlay_mbps"].append(iperf(v1, v3, args.seconds))
            res["local_rtt_us"].append(rtt(v1, v2))
            res["overlay_rtt_us"].append(rtt(v1, v3))
        med = {k: statistics.median(v) for k, v in res.items()}
        summary = {"runs": res, "median": med, "backend": overlay.status(cfgs[0])["backend"],
                   "throughput_ratio_overlay_vs_local": med["overlay_mbps"] / med["local_mbps"],
                   "rtt_ratio_overlay_vs_local": med["overlay_rtt_us"] / med["local_rtt_us"]}
        print(json.dumps(summary, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        for g in stands:
            g.close()
        for cfg in cfgs:
            with contextlib.suppress(Exception):
                overlay.teardown(cfg)
            with contextlib.suppress(Exception):
                host.teardown(cfg)
        for ns in [sw, *hns]:
            host.netns_remove(ns)


if __name__ == "__main__":
    main()
