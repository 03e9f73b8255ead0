"""Shared helpers for the virtio payload tests on QEMU and on bulkhead (same payloads, same checks).

The payloads (tests/payloads/virtio_*.c, bench/payloads/blk_bench.c) are built with the guest driver
tests/payloads/virtio_lib.c; `Vmm` builds the command line of one VMM (QEMU microvm with virtio-mmio,
or `bulkhead run`) for a set of drives / a NIC / an rng, so each test body runs unchanged on both.
Output format: tests/payloads/README.md, section "virtio payloads".
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bulkhead.guests.build import build
from bulkhead.guests.report import GuestReport, parse_report

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "tests" / "payloads"
BENCH_PAYLOADS = ROOT / "bench" / "payloads"
CACHE = ROOT / "tests" / ".build" / "guests"
MASK64 = (1 << 64) - 1
GUEST_MAC = "52:54:00:12:34:56"
ETHERTYPE = 0x88B5


def build_virtio(name: str) -> Path:
    """Build a virtio payload (tests/payloads/NAME.c or bench/payloads/NAME.c) with the guest driver.

    virtio.h is found through -I; its digest goes into the flags so a changed header rebuilds.
    """
    src = PAYLOADS / f"{name}.c"
    if not src.is_file():
        src = BENCH_PAYLOADS / f"{name}.c"
    digest = hashlib.sha256(b"".join((PAYLOADS / h).read_bytes() for h in ("virtio.h", "vsock.h"))).hexdigest()[:16]
    return build(
        str(src),
        "elf",
        extra_sources=[PAYLOADS / "virtio_lib.c"],
        cflags=[f"-I{PAYLOADS}", f"-DBH_VIRTIO_H_DIGEST=0x{digest}"],
    )


def pattern(seed: int, nbytes: int, first_sector: int = 0) -> bytes:
    """The bytes vio_pattern() writes: word at disk offset o = (seed * K1) ^ (o * K2), little endian."""
    s = (seed * 0x9E3779B97F4A7C15) & MASK64
    out = bytearray()
    for o in range(first_sector * 512, first_sector * 512 + nbytes, 8):
        out += ((s ^ (o * 0xFF51AFD7ED558CCD)) & MASK64).to_bytes(8, "little")
    return bytes(out)


@dataclass
class Devices:
    drives: list[tuple[Path, bool]] = field(default_factory=list)  # (image, read_only)
    tap: str | None = None
    mac: str = GUEST_MAC
    rng: bool = False
    serials: list[str] = field(default_factory=list)  # QEMU only: drive serials for GET_ID


class Vmm:
    """Builds the argv that boots `image` with `append` and `devices` on one VMM."""

    name = "?"

    def argv(self, image: Path, append: str, devices: Devices, mem_mib: int = 128) -> list[str]:
        raise NotImplementedError

    def exit_status(self, code: int) -> int:
        """Process status for debug-exit `code` ((code << 1) | 1 on both)."""
        return ((code << 1) | 1) & 0xFF


class Qemu(Vmm):
    name = "qemu"

    def argv(self, image: Path, append: str, devices: Devices, mem_mib: int = 128) -> list[str]:
        cmd = [
            "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-global", "virtio-mmio.force-legacy=false",
            "-m", f"{mem_mib}M", "-kernel", str(image), "-append", append,
        ]  # fmt: skip
        for i, (path, ro) in enumerate(devices.drives):
            ro_opt = ",readonly=on" if ro else ""
            serial = f",serial={devices.serials[i]}" if i < len(devices.serials) else ""
            cmd += ["-drive", f"id=d{i},file={path},format=raw,if=none{ro_opt}"]
            cmd += ["-device", f"virtio-blk-device,drive=d{i}{serial}"]
        if devices.tap:
            cmd += ["-netdev", f"tap,id=n0,ifname={devices.tap},script=no,downscript=no"]
            cmd += ["-device", f"virtio-net-device,netdev=n0,mac={devices.mac}"]
        if devices.rng:
            cmd += ["-device", "virtio-rng-device"]
        return cmd


class Bulkhead(Vmm):
    name = "bulkhead"

    def __init__(self, extra: tuple[str, ...] = (), *, jail: bool = False) -> None:
        self.extra = extra
        self.jail = jail

    def argv(self, image: Path, append: str, devices: Devices, mem_mib: int = 128) -> list[str]:
        cmd = [sys.executable, "-m", "bulkhead", "run", *(() if self.jail else ("--no-jail",))]
        cmd += ["-q", "--kernel", str(image)]
        cmd += ["--cmdline", append, "--mem", str(mem_mib), *self.extra]
        for path, ro in devices.drives:
            cmd += ["--drive", f"{path},ro" if ro else str(path)]
        if devices.tap:
            cmd += ["--net", f"tap={devices.tap},mac={devices.mac}"]
        if devices.rng:
            cmd += ["--rng"]
        return cmd


@dataclass
class Result:
    status: int
    report: GuestReport
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.report.lines

    def first(self, prefix: str) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r} in {self.lines}")

    def fields(self, prefix: str) -> dict[str, str]:
        """key=value words of the first line starting with prefix."""
        return dict(w.split("=", 1) for w in self.first(prefix).split() if "=" in w)


def run(argv: list[str], *, netns: str | None = None, timeout: float = 120) -> Result:
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    p = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return Result(
        p.returncode, parse_report(p.stdout.decode("ascii", "replace")), p.stderr.decode(errors="replace")
    )


def stream_lines(
    argv: list[str], *, timeout: float, until: str | None = None
) -> tuple[subprocess.Popen[bytes], list[tuple[float, str]]]:
    """Start argv and collect (monotonic time, line) as lines arrive, until EOF, `until` (a line
    prefix) or the timeout. Returns the (possibly still running) process and the lines."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    out: list[tuple[float, str]] = []
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode("ascii", "replace").rstrip("\r")
                out.append((now, line))
                if until is not None and line.startswith(until):
                    return proc, out
    finally:
        sel.close()
    return proc, out


def kill(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the process (no chance to flush anything) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


# ---- network namespace with a tap and a responder -------------------------------------------------

RESPONDER = r"""
import socket, sys
tap, timeout = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((tap, 0x88b5))
s.settimeout(timeout)
print("READY", flush=True)
while True:
    frame = s.recv(4096)
    if frame[12:14] == b"\x88\xb5":
        break
dst, src, payload = frame[:6], frame[6:12], frame[14:].rstrip(b"\0")
print("PING", dst.hex(":"), src.hex(":"), payload.decode("ascii", "replace"), flush=True)
reply = src + bytes.fromhex("026268000001") + b"\x88\xb5" + payload.replace(b"ping", b"pong")
s.send(reply.ljust(60, b"\0"))
print("SENT", flush=True)
"""

RESPONDER_MAC = "02:62:68:00:00:01"

SNIFFER = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
print("READY", flush=True)
while True:
    frame = s.recv(1 << 18)
    print(len(frame), frame[12:14].hex(), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def netns_with_tap() -> Iterator[tuple[str, str]]:
    """A fresh network namespace holding a persistent, up tap with IPv6 off; yields (netns, tap)."""
    ns = f"bhvt-{uuid.uuid4().hex[:8]}"
    tap = "bhvt0"
    _ip("netns", "add", ns)
    try:
        _ip("netns", "exec", ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
        subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{tap}.disable_ipv6=1"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        _ip("netns", "exec", ns, "ip", "link", "set", tap, "up")
        yield ns, tap
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


@contextmanager
def responder(ns: str, tap: str, timeout: float = 60) -> Iterator[subprocess.Popen[str]]:
    """The host end: answers the first 0x88b5 frame on the tap with "ping" replaced by "pong"."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", RESPONDER, tap, str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        assert ready == "READY", (ready, proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@contextmanager
def sniffer(ns: str, tap: str) -> Iterator[list[tuple[int, str]]]:
    """Records (length, ethertype hex) of every frame the guest sends on the tap; the list is filled
    when the block exits."""
    frames: list[tuple[int, str]] = []
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SNIFFER, tap],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        yield frames
        time.sleep(0.3)
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        for line in out.splitlines():
            n, _, etype = line.partition(" ")
            frames.append((int(n), etype))


# ---- checks shared by both VMMs --------------------------------------------------------------------

BLK_LINE = re.compile(r"^BLK (\d) capacity=(\d+) ro=(\d) ")


def check_blk(res: Result, vmm: Vmm, *, seed: int, img0: Path, img1: Path, img1_before: bytes) -> None:
    """Assertions for virtio_blk.c with drive 0 writable (img0) and drive 1 read-only (img1)."""
    assert res.status == vmm.exit_status(0), (res.status, res.lines, res.stderr[-2000:])
    assert res.report.passed and not res.report.failures, res.lines
    drives = {int(m[1]): (int(m[2]), int(m[3])) for m in map(BLK_LINE.match, res.lines) if m}
    assert drives == {0: (img0.stat().st_size // 512, 0), 1: (img1.stat().st_size // 512, 1)}
    assert f"BLK 0 write sectors=0..7 seed={seed} status=0" in res.lines
    assert "BLK 0 flush status=0" in res.lines
    assert "BLK 0 read sectors=0..7 status=0 match=1" in res.lines
    cap = img0.stat().st_size // 512
    assert f"BLK 0 read_past_end sector={cap} status=1" in res.lines
    assert f"BLK 0 read_across_end sector={cap - 1} status=1" in res.lines
    assert f"BLK 0 write_past_end sector={cap} status=1" in res.lines
    assert "BLK 0 unknown_type status=2" in res.lines
    assert "BLK 1 write_ro status=1" in res.lines
    assert "BLK 1 unchanged status=0 match=1" in res.lines
    # the guest's writes are in the image file, the read-only image is untouched
    assert img0.read_bytes()[:4096] == pattern(seed, 4096)
    assert img1.read_bytes() == img1_before
    isr = int(res.fields("BLK interrupt_status_seen")["interrupt_status_seen"], 16)
    assert isr & 1  # the device raised the used-buffer interrupt status


def check_rng(res: Result, vmm: Vmm) -> None:
    assert res.status == vmm.exit_status(0), (res.status, res.lines, res.stderr[-2000:])
    assert res.report.passed, res.lines
    r1, r2 = res.fields("RNG read1"), res.fields("RNG read2")
    assert r1["bytes"] == r2["bytes"] == "64"
    assert r1["all_zero"] == r2["all_zero"] == "0"
    assert r1["head"] != r2["head"] and len(r1["head"]) == 32
    assert "RNG differ=1" in res.lines


def check_net(res: Result, vmm: Vmm, resp: subprocess.Popen[str], seed: int) -> None:
    out, err = resp.communicate(timeout=60)
    assert res.status == vmm.exit_status(0), (res.status, res.lines, res.stderr[-2000:], out, err)
    assert res.report.passed, res.lines
    assert res.fields("NET features")["mac"] == GUEST_MAC
    # the host end saw the guest's broadcast with the configured MAC as source
    assert f"PING ff:ff:ff:ff:ff:ff {GUEST_MAC} bulkhead-ping {seed}" in out.splitlines(), (out, err)
    rx = res.fields("NET rx len")
    assert rx["dst"] == GUEST_MAC and rx["src"] == RESPONDER_MAC
    assert res.first("NET rx len").endswith(f"payload=bulkhead-pong {seed}")


def abuse_results(res: Result) -> dict[str, tuple[str, str]]:
    """ABUSE lines as name -> (result, recovery)."""
    out = {}
    for line in res.lines:
        words = line.split()
        if words[0] == "ABUSE" and len(words) >= 4:
            out[words[1]] = (words[2], words[3])
    return out


ABUSE_CASES = (
    "desc_oob", "desc_mmio", "desc_self", "chain_loop", "next_oob", "head_oob", "huge_len", "avail_jump",
    "qsize_npot", "qsize_too_big", "used_overlap", "ring_unaligned", "ring_oob", "config_oob",
    "notify_unset", "status_order", "features_no_v1", "indirect_ok", "indirect_nested", "indirect_len",
    "indirect_next", "status_readonly", "hdr_writable", "len_odd", "config_write_ro", "queue_sel_oob",
    "queue_change_live",
)  # fmt: skip
RNG_ABUSE_CASES = (
    "rng_desc_oob", "rng_desc_mmio", "rng_desc_readonly", "rng_huge_len", "rng_chain_loop", "rng_avail_jump",
)  # fmt: skip
NET_ABUSE_CASES = (
    "net_tx_oob", "net_tx_writable", "net_tx_short", "net_tx_huge", "net_chain_loop", "net_avail_jump",
)  # fmt: skip
# Driver errors run on every device (blk, rng, net TX), after that device's own cases: the queue
# configuration at QueueReady / DRIVER_OK / first notify, and out-of-order status and queue writes.
QUEUE_CONFIG_CASES = (
    "qsize_zero", "qsize_npot_any", "qsize_over_max", "desc_unaligned", "avail_unaligned", "used_unaligned",
    "desc_in_hole", "used_in_device", "avail_past_ram", "desc_beyond_ram", "desc_wraps",
    "desc_avail_overlap", "avail_used_overlap", "desc_used_overlap",
)  # fmt: skip
STATUS_CASES = (
    "status_clear_bits", "status_driver_ok_early", "status_set_needs_reset", "features_unoffered",
    "queue_after_driver_ok", "queue_ready_again", "queue_resize_ready", "queue_disable_live",
)  # fmt: skip
ANY_ABUSE_CASES = QUEUE_CONFIG_CASES + STATUS_CASES


def bench_phases(lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """PHASE start/end lines -> name -> {seconds (host wall time between the lines), bytes, requests,
    errors, tsc}."""
    starts: dict[str, float] = {}
    out: dict[str, dict[str, float]] = {}
    for t, line in lines:
        w = line.split()
        if len(w) >= 3 and w[0] == "PHASE":
            if w[2] == "start":
                starts[w[1]] = t
            elif w[2] == "end" and w[1] in starts:
                kv = {k: float(v) for k, v in (x.split("=", 1) for x in w[3:])}
                kv["seconds"] = t - starts[w[1]]
                out[w[1]] = kv
    return out


def flush_syscalls(vmm: Vmm, tmp: Path, seed: int, *, flush: bool = True) -> tuple[list[str], str, bytes]:
    """Boot virtio_blk.c in `blk=write-flush-hang` mode (`write-hang` without flush) under `strace -f`,
    SIGKILL the VMM once the guest printed FLUSHED (WRITTEN), and return (guest lines,
    fdatasync/fsync calls on the image, image head).

    The kill alone cannot tell a flushed write from one left in the page cache (both survive SIGKILL);
    the trace shows the FLUSH reached the disk file as fdatasync/fsync before the guest saw it complete.
    """
    img = tmp / "flush.img"
    with open(img, "wb") as f:
        f.truncate(MIB_1)
    trace = tmp / "strace.txt"
    mode = "write-flush-hang" if flush else "write-hang"
    inner = vmm.argv(build_virtio("virtio_blk"), f"seed={seed} blk={mode}", Devices(drives=[(img, False)]))
    argv = [
        "strace",
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fdatasync,fsync,sync_file_range",
        "-o",
        str(trace),
        *inner,
    ]
    proc, lines = stream_lines(argv, timeout=120, until="FLUSHED" if flush else "WRITTEN")
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)  # the VMM, not strace: strace then writes its log and exits
        proc.wait(timeout=60)
    finally:
        kill(proc)
    path = re.escape(str(img.resolve()))
    calls = []
    unfinished: dict[str, str] = {}  # pid -> call line, for `<unfinished ...>` / `<... resumed>` pairs
    for line in trace.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if re.match(rf"(fdatasync|fsync|sync_file_range)\(\d+<{path}>", rest):
            if rest.endswith("<unfinished ...>"):
                unfinished[pid] = rest
            elif re.search(r"\) += 0$", rest):
                calls.append(line)
        elif pid in unfinished and re.match(r"<\.\.\. \w+ resumed>.*\) += 0$", rest):
            calls.append(f"{pid} {unfinished.pop(pid)} {rest}")
    return [text for _, text in lines], "\n".join(calls), img.read_bytes()[:4096]


MIB_1 = 1 << 20
