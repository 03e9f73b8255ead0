"""Guest stand-ins for tests and benchmarks: a network namespace that plays a VM behind a NIC.

    with GuestStandIn(nic, config, mode="tap") as g:
        g.run(["ping", "-c1", "10.0.0.3"])     # a command inside the guest's namespace
        g.send_raw(frame)                      # a raw Ethernet frame, written on the NIC's tap as a VMM would

mode "tap" (default): the NIC's real tap from `create_tap_for_nic`, relayed frame by frame (vnet header
included) to and from a tap "eth0" inside the guest namespace, so the guest namespace's kernel stack
speaks through exactly the fd a VMM would get. mode "veth": a veth pair whose bridge end carries the
tap's name (same filter rules apply); kernel-only path, used by the throughput benchmark.

The guest interface has the NIC's MAC, IPv4 and IPv6 addresses. Everything is removed on close(), even
after a failure. Raises HostError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from bulkhead.errors import HostError
from bulkhead.network import host
from bulkhead.network.model import Network, Nic
from bulkhead.network.state import HostConfig

__all__ = ["VNET_HDR", "GuestStandIn", "sniffing"]

VNET_HDR = bytes(12)

# AF_PACKET recorder: every frame arriving at interface argv[2] for argv[1] seconds or until stdin speaks
_SNIFF = r"""
import socket, sys, json, time, select
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[2], 0))
end = time.time() + float(sys.argv[1])
print("ready", flush=True)
out = []
def take():
    data, addr = s.recvfrom(65535)
    if addr[2] != socket.PACKET_OUTGOING:
        out.append(data.hex())
while time.time() < end:
    r, _, _ = select.select([s, sys.stdin], [], [], max(0.0, end - time.time()))
    if s in r:
        take()
    elif r:
        time.sleep(0.4)  # stragglers still in flight
        while select.select([s], [], [], 0)[0]:
            take()
        break
print(json.dumps(out), flush=True)
"""


@contextlib.contextmanager
def sniffing(targets: dict[str, tuple[str, str]], seconds: float = 60.0) -> Iterator[dict[str, list[bytes]]]:
    """Record every frame arriving at each target {label: (named netns, interface)} while the with-body
    runs; the dict yielded is filled with {label: [frames]} when the body ends. Raises HostError."""
    procs = {k: subprocess.Popen(["nsenter", f"--net={host.NETNS_DIR}/{ns}", "--", sys.executable, "-c", _SNIFF,
                                  str(seconds), ifname], text=True, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, (ns, ifname) in targets.items()}
    result: dict[str, list[bytes]] = {}
    try:
        for p in procs.values():
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                raise HostError(f"sniffer did not start: {p.stderr.read() if p.stderr else ''}")
        yield result
        for k, p in procs.items():
            out, _ = p.communicate(timeout=30)
            result[k] = [bytes.fromhex(h) for h in json.loads(out.strip().splitlines()[-1])]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


class GuestStandIn:
    def __init__(self, nic: Nic, net: Network, config: HostConfig, *, mode: str = "tap") -> None:
        self.nic, self.net, self.config, self.mode = nic, net, config, mode
        self.netns = f"{config.prefix}g{hashlib.sha256(nic.key.encode()).hexdigest()[:10]}"
        self.tap = config.tap(nic.vm_id, nic.index)
        self.nic_fd = -1
        self.guest_fd = -1
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        self.relayed = 0

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> GuestStandIn:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        host.netns_create(self.netns)
        path = f"{host.NETNS_DIR}/{self.netns}"
        if self.mode == "tap":
            self.nic_fd = host.create_tap_for_nic(self.nic, self.config)
            self.guest_fd = host._open_tap_in(path, "eth0", persistent=False)
        elif self.mode == "veth":
            tenant_ns = self.config.netns(self.nic.tenant)
            with host.ipr_in(f"{host.NETNS_DIR}/{tenant_ns}") as ipr:
                ipr.link("add", ifname=self.tap, kind="veth", peer="eth0")
                ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], net_ns_fd=self.netns)
                br = ipr.link_lookup(ifname=self.config.bridge(self.nic.network_id))[0]
                ipr.link("set", index=ipr.link_lookup(ifname=self.tap)[0], master=br, state="up")
        else:
            raise HostError(f"unknown stand-in mode {self.mode!r}")
        host._sysctl(self.netns, self.config, "net.ipv6.conf.eth0.accept_dad", "0")
        host._sysctl(self.netns, self.config, "net.ipv6.conf.eth0.dad_transmits", "0")
        with host.ipr_in(path) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=idx, address=self.nic.mac)
            ipr.addr("add", index=idx, address=str(self.nic.ipv4), prefixlen=self.net.ipv4.prefixlen)
            if self.nic.ipv6 is not None:
                ipr.addr("add", index=idx, address=str(self.nic.ipv6), prefixlen=64, flags=0x02)  # IFA_F_NODAD
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if self.net.egress:
                ipr.route("add", dst="0.0.0.0/0", gateway=str(self.net.gateway4))
        if self.mode == "tap":
            self._stop_r, self._stop_w = os.pipe()
            self._thread = threading.Thread(target=self._relay, name=f"standin-{self.tap}", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(10)
            self._thread = None
        for fd in (self.nic_fd, self.guest_fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self.nic_fd = self.guest_fd = self._stop_r = self._stop_w = -1
        if self.mode == "veth":
            with contextlib.suppress(Exception):
                host._link_delete(self.config.netns(self.nic.tenant), self.tap, self.config)
        with contextlib.suppress(OSError):
            host.netns_remove(self.netns)

    # --- traffic -------------------------------------------------------------------------------------
    def _relay(self) -> None:
        pairs = {self.nic_fd: self.guest_fd, self.guest_fd: self.nic_fd}
        poller = select.poll()
        for fd in (*pairs, self._stop_r):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
                for _ in range(64):
                    try:
                        frame = os.read(fd, 65550 + 12)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        return
                    with contextlib.suppress(OSError):
                        os.write(pairs[fd], frame)
                        self.relayed += 1

    def send_raw(self, frame: bytes) -> None:
        """Write one Ethernet frame on the NIC's tap exactly as a VMM does for a guest (tap mode only)."""
        if self.nic_fd < 0:
            raise HostError("send_raw needs a tap-mode stand-in")
        os.write(self.nic_fd, VNET_HDR + frame)

    def run(self, argv: list[str], timeout: float = 20, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the guest's namespace."""
        return subprocess.run(["nsenter", f"--net={host.NETNS_DIR}/{self.netns}", "--", *argv], capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["nsenter", f"--net={host.NETNS_DIR}/{self.netns}", "--", *argv], text=True, **kw)
