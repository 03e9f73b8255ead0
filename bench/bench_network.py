"""Tenant network benchmarks (root): the cost of the anti-spoofing rules, and frames/s through virtio-net.

1. Bridge path, kernel only: two stand-in VMs (veth mode: the bridge port carries the NIC's tap name, so
   the same per-NIC nftables chains apply) on one tenant network; iperf3 TCP throughput and UDP packets/s
   (64-byte datagrams, unlimited rate) from one to the other, WITH the guard table and WITHOUT it
   (the bridge-family table deleted), interleaved runs, medians.
2. virtio-net TX (if KVM works): a guest payload (embedded below) sends `count` 60-byte UDP frames, one
   request in flight, through bulkhead's virtio-net into the NIC's tap, across the filtered bridge to a
   stand-in VM that counts what arrives; the same with QEMU's virtio-net on the same tap as the peer.

    .venv/bin/python bench/bench_network.py [--runs 3] [--seconds 3] [--frames 20000] [--json out.json]

Everything lives in namespaces the benchmark creates (a named namespace plays the host) and is torn down
at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT), str(ROOT / "src")]

from pyroute2 import netns as pnetns  # noqa: E402

from bulkhead.network import host  # noqa: E402
from bulkhead.network.model import attach_nic, make_network  # noqa: E402
from bulkhead.network.standin import GuestStandIn  # noqa: E402
from bulkhead.network.state import HostConfig  # noqa: E402

TX_PAYLOAD = r"""
/* virtio-net TX benchmark: `count` UDP frames (60 bytes) from the NIC's pinned MAC/IP to dmac/dst:9. */
#include "virtio.h"
#define HDR_LEN 12
int main(const struct bh_bootinfo *bi) {
    vio_arena_init(bi);
    struct vio_dev devs[VIO_MAX_DEVS];
    static struct vio_queue rxq, txq;
    uint64_t count = vio_cmdline_u64(bi, "count", 20000);
    uint64_t src = vio_cmdline_u64(bi, "src", 0), dst = vio_cmdline_u64(bi, "dst", 0);
    uint64_t smac = vio_cmdline_u64(bi, "smac", 0), dmac = vio_cmdline_u64(bi, "dmac", 0);
    int n = vio_find(bi->cmdline, devs, VIO_MAX_DEVS);
    struct vio_dev *d = vio_nth(devs, n, VIRTIO_ID_NET, 0);
    if (!d || vio_init(d, 1ULL << 5) != 0 || vio_queue_setup(d, &rxq, 0, 16) != 0 ||
        vio_queue_setup(d, &txq, 1, 16) != 0) { printf("FAIL setup\n"); return 1; }
    vio_driver_ok(d);
    uint64_t tx = vio_alloc(HDR_LEN + 64, 64);
    uint8_t *p = (uint8_t *)tx;
    memset(p, 0, HDR_LEN + 64);
    uint8_t *f = p + HDR_LEN;
    for (int i = 0; i < 6; i++) { f[i] = (uint8_t)(dmac >> (40 - 8 * i)); f[6 + i] = (uint8_t)(smac >> (40 - 8 * i)); }
    f[12] = 0x08; f[13] = 0x00;
    uint8_t *ip = f + 14;
    ip[0] = 0x45; ip[3] = 46; ip[6] = 0x40; ip[8] = 64; ip[9] = 17;
    for (int i = 0; i < 4; i++) { ip[12 + i] = (uint8_t)(src >> (24 - 8 * i)); ip[16 + i] = (uint8_t)(dst >> (24 - 8 * i)); }
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2) sum += (uint32_t)ip[i] << 8 | ip[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    ip[10] = (uint8_t)(~sum >> 8); ip[11] = (uint8_t)~sum;
    uint8_t *u = ip + 20;
    u[0] = 0x9c; u[1] = 0x40; u[3] = 9; u[5] = 26;
    memcpy(u + 8, "bulkhead-net-bench", 18);
    struct vio_buf b = {tx, HDR_LEN + 60, 0};
    uint64_t errors = 0;
    uint32_t used = 0;
    printf("PHASE tx start\n");
    for (uint64_t i = 0; i < count; i++)
        if (vio_xfer(&txq, &b, 1, 1000000, &used) != VIO_DONE) errors++;
    printf("PHASE tx end bytes=%lu requests=%lu errors=%lu\n", count * 60, count, errors);
    printf("PASS\n");
    return 0;
}
"""

COUNTER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", 9))
s.settimeout(float(sys.argv[1]))
print("ready", flush=True)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
        s.settimeout(2.0)
except socket.timeout:
    pass
print(n, flush=True)
"""


def iperf(client: GuestStandIn, server: GuestStandIn, seconds: float, udp: bool) -> float:
    srv = server.popen(["iperf3", "-s", "-1", "-B", str(server.nic.ipv4)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        argv = ["iperf3", "-c", str(server.nic.ipv4), "-t", str(seconds), "-J"]
        if udp:
            argv += ["-u", "-b", "0", "-l", "64"]
        r = client.run(argv, timeout=seconds + 30)
        data = json.loads(r.stdout)
        end = data["end"]
        if udp:
            s = end["sum"]
            return (s["packets"] - s["lost_packets"]) / s["seconds"]
        return float(end["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.kill()
        srv.wait()


def guest_tx(vmm_name: str, image: Path, ns: str, tap: str, mac: str, src: str, dst: str, dmac: str,
             frames: int, receiver: GuestStandIn) -> dict[str, float]:
    from tests.virtio_payloads import Bulkhead, Devices, Qemu, bench_phases, stream_lines

    # "bulkhead" is the default path, jailed when run as root; "bulkhead_unjailed" is --no-jail
    vmm = (Bulkhead(jail=os.geteuid() == 0) if vmm_name == "bulkhead"
           else Bulkhead(jail=False) if vmm_name == "bulkhead_unjailed" else Qemu())
    ip = lambda a: int.from_bytes(bytes(int(x) for x in a.split(".")), "big")  # noqa: E731
    append = (f"count={frames} src={ip(src)} dst={ip(dst)} smac=0x{mac.replace(':', '')} "
              f"dmac=0x{dmac.replace(':', '')}")
    cnt = receiver.popen([sys.executable, "-c", COUNTER, "60"], stdout=subprocess.PIPE)
    assert cnt.stdout is not None and cnt.stdout.readline().strip() == "ready"
    argv = ["nsenter", f"--net=/run/netns/{ns}", "--", *vmm.argv(image, append, Devices(tap=tap, mac=mac))]
    proc, lines = stream_lines(argv, timeout=300)
    status = proc.wait(timeout=60)
    got = int(cnt.communicate(timeout=30)[0].strip().splitlines()[-1])
    if status != vmm.exit_status(0):
        raise RuntimeError(f"{vmm_name} exited {status}: {lines[-5:]}")
    ph = bench_phases(lines)["tx"]
    return {"frames_per_s": ph["requests"] / ph["seconds"], "delivered_fraction": got / ph["requests"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--no-guest", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    prefix = "b" + secrets.token_hex(1)
    hns = f"{prefix}host"
    cfg = HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-bench-{prefix}", host_netns=hns)
    res: dict[str, list[float]] = {}
    guest: dict[str, dict[str, list[float]]] = {}
    pnetns.create(hns)
    stands: list[GuestStandIn] = []
    try:
        net = make_network("bench-net", "bench-tenant", "bench", "10.7.0.0/24")
        nics = [attach_nic("v1", "bench-tenant", 0, net, [])]
        nics.append(attach_nic("v2", "bench-tenant", 0, net, nics))
        gnic = attach_nic("g1", "bench-tenant", 0, net, nics)
        host.reconcile([net], [*nics, gnic], cfg)
        ns = cfg.netns("bench-tenant")
        for nic in nics:
            stands.append(GuestStandIn(nic, net, cfg, mode="veth"))
            stands[-1].open()
        c, s = stands
        for _ in range(a.runs):
            for filt in (True, False):
                if filt:
                    host.reconcile([net], [*nics, gnic], cfg)
                else:
                    host._nft_delete(host.NftTable(ns, "bridge", f"{prefix}_guard", ""), cfg)
                tag = "filtered" if filt else "unfiltered"
                res.setdefault(f"tcp_gbps_{tag}", []).append(iperf(c, s, a.seconds, udp=False))
                res.setdefault(f"udp64_pps_{tag}", []).append(iperf(c, s, a.seconds, udp=True))
        host.reconcile([net], [*nics, gnic], cfg)
        if not a.no_guest:
            from tests.virtio_payloads import PAYLOADS

            from bulkhead.guests.build import build

            with tempfile.TemporaryDirectory() as d:
                src = Path(d) / "net_tx_bench.c"
                src.write_text(TX_PAYLOAD)
                image = build(str(src), "elf", extra_sources=[PAYLOADS / "virtio_lib.c"], cflags=[f"-I{PAYLOADS}"])
            gns, tap = host.create_persistent_tap(gnic, cfg)
            for _ in range(a.runs):
                for vmm in ("bulkhead", "qemu", "bulkhead_unjailed"):
                    r = guest_tx(vmm, image, gns, tap, gnic.mac, str(gnic.ipv4), str(s.nic.ipv4), s.nic.mac,
                                 a.frames, s)
                    for k, v in r.items():
                        guest.setdefault(vmm, {}).setdefault(k, []).append(v)
    finally:
        for st in stands:
            with contextlib.suppress(Exception):
                st.close()
        host.teardown(cfg)
        with contextlib.suppress(Exception):
            pnetns.remove(hns)
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": a.runs, "seconds": a.seconds, "raw": res, "medians": med,
        "ratios": {"tcp_filtered_over_unfiltered": med["tcp_gbps_filtered"] / med["tcp_gbps_unfiltered"],
                   "udp64_filtered_over_unfiltered": med["udp64_pps_filtered"] / med["udp64_pps_unfiltered"]},
    }
    if guest:
        gmed = {vmm: {k: statistics.median(v) for k, v in kv.items()} for vmm, kv in guest.items()}
        out["virtio_net_tx"] = {"frames": a.frames, "medians": gmed, "raw": guest,
                                "jailed": os.geteuid() == 0,
                                "bulkhead_over_qemu": gmed["bulkhead"]["frames_per_s"] / gmed["qemu"]["frames_per_s"],
                                "unjailed_over_qemu": (gmed["bulkhead_unjailed"]["frames_per_s"]
                                                       / gmed["qemu"]["frames_per_s"])}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
