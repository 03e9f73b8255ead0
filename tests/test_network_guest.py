"""A real guest (tests/payloads/virtio_net.c on `bulkhead run --net tap=NAME`) behind a tenant network.

The guest's tap is the NIC's persistent tap in the tenant namespace (create_persistent_tap); bulkhead runs
inside that namespace and opens it by name. The payload broadcasts one frame of ethertype 0x88b5 and
waits for a 0x88b5 frame addressed to its MAC. Expected: the broadcast is dropped at the bridge (only
IPv4/ARP/IPv6 may leave a VM) and counted against the guest's NIC, a stand-in VM on the same network
never sees it; a frame sent from the bridge to the guest's MAC arrives in the guest (RX path through the
bridge). With a MAC other than the pinned one, every frame of the guest is dropped as a MAC spoof.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest
from pyroute2 import netns as pnetns
from tests.test_network_host import _mac, sniffing
from tests.virtio_payloads import Bulkhead, Devices, build_virtio, run

from bulkhead.network import host
from bulkhead.network.model import attach_nic, make_network
from bulkhead.network.standin import GuestStandIn
from bulkhead.network.state import HostConfig

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(170)]


@contextlib.contextmanager
def bridge_sender(ns: str, bridge: str, dst_mac: str, payload: bytes) -> Iterator[None]:
    """Send a 0x88b5 frame from the bridge itself to dst_mac every 50 ms (the guest may not be up yet)."""
    stop = threading.Event()

    def body() -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        try:
            s.bind((bridge, 0x88B5))
            src = s.getsockname()[4]
            frame = (_mac(dst_mac) + src + b"\x88\xb5" + payload).ljust(60, b"\0")
            while not stop.wait(0.05):
                with contextlib.suppress(OSError):
                    s.send(frame)
        finally:
            s.close()

    t = threading.Thread(target=lambda: host.run_in_netns(f"/run/netns/{ns}", body), daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def test_real_guest_frames_go_through_the_bridge_filters() -> None:
    image = build_virtio("virtio_net")
    prefix = "r" + secrets.token_hex(1)
    hns = f"{prefix}host"
    pnetns.create(hns)
    cfg = HostConfig(prefix=prefix, state_dir=f"/run/bulkhead-test-{prefix}", host_netns=hns)
    peer_standin = None
    try:
        net = make_network("net-g", "tenant-g", "g", "10.5.0.0/24")
        guest = attach_nic("guest", "tenant-g", 0, net, [])
        peer = attach_nic("peer", "tenant-g", 0, net, [guest])
        host.reconcile([net], [guest, peer], cfg)
        ns, tap = host.create_persistent_tap(guest, cfg)
        peer_standin = GuestStandIn(peer, net, cfg)
        peer_standin.open()
        vmm = Bulkhead(jail=False)
        before = host.read_counters(cfg, "tenant-g")
        with sniffing(peer_standin) as seen, bridge_sender(ns, cfg.bridge(net.id), guest.mac, b"bulkhead-pong 7"):
            res = run(vmm.argv(image, "seed=7 net_timeout_ms=20000", Devices(tap=tap, mac=guest.mac)), netns=ns,
                      timeout=120)
        after = host.read_counters(cfg, "tenant-g")
        assert res.status == vmm.exit_status(0), (res.status, res.lines, res.stderr[-1500:])
        assert any(line.startswith("NET tx ") and "result=1" in line for line in res.lines), res.lines
        rx = res.fields("NET rx len=")
        assert rx["payload"].startswith("bulkhead-pong") and rx["dst"] == guest.mac, rx
        assert after[f"{tap}_proto"][0] - before[f"{tap}_proto"][0] >= 1  # the guest's 0x88b5 broadcast
        assert after[f"{tap}_mac"][0] == before[f"{tap}_mac"][0]
        assert not [f for f in seen["peer"] if f[6:12] == _mac(guest.mac)], "the guest's frame reached the peer"

        # the same guest with a MAC that is not the pinned one: everything it sends is a MAC spoof
        spoof = "02:00:00:00:be:ef"
        res = run(vmm.argv(image, "seed=8 net_timeout_ms=1500", Devices(tap=tap, mac=spoof)), netns=ns, timeout=120)
        final = host.read_counters(cfg, "tenant-g")
        assert any(line.startswith("NET tx ") and "result=1" in line for line in res.lines), res.lines
        assert final[f"{tap}_mac"][0] - after[f"{tap}_mac"][0] >= 1
        assert final[f"{tap}_proto"][0] == after[f"{tap}_proto"][0]
    finally:
        if peer_standin is not None:
            peer_standin.close()
        host.teardown(cfg)
        with contextlib.suppress(Exception):
            pnetns.remove(hns)
