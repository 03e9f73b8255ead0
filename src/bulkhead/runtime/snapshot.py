"""Save a stopped Machine to a snapshot file and rebuild a Machine from one (edge: KVM, files).

What is saved (the guest can observe all of it, so all of it must come back; issue 20):
- guest memory: every page the guest has written (mincore-resident and not all zero);
- each vCPU: regs, sregs, XSAVE (x87/SSE/AVX), XCRs, debug registers, LAPIC, MP state, pending events,
  every MSR of KVM_GET_MSR_INDEX_LIST, and the CPUID table and MCG_CAP it was given;
- the in-kernel chips: PIC master and slave, IOAPIC, PIT, kvmclock;
- the devices: the 16550A's registers and unread input, the i8042's registers.

- virtio-blk and virtio-rng: the virtio-mmio transport registers and each queue's configuration and ring
  positions (bulkhead.devices.virtio.state). In-flight requests are drained, not recorded: both devices
  complete a request before they release the transport lock, and every ready queue is run once more
  before the state is read, so the guest sees everything it had made available completed. The drives
  are reopened at restore from the paths the snapshot names, and must still be the same size.
VMs with virtio-net or virtio-vsock are refused with a clear error: their host-side state (tap, streams)
is not in the format yet (docs/SNAPSHOT.md, "Not yet").

Consistency: the vCPU threads have left KVM_RUN when Machine.run() returns. A vCPU that stopped right
after an I/O exit has that instruction half done (api.rst 4.3: "the corresponding operations are complete
(and guest state is consistent) only after userspace has re-entered the kernel with KVM_RUN"), so each vCPU
re-enters KVM_RUN once with immediate_exit set before its state is read. Without it, an `out` to the UART
is replayed after restore and the guest's output shows a character twice (tests/test_snapshot.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from bulkhead import __version__
from bulkhead.config import DriveConfig, NetConfig, RateLimit, VmConfig, parse_net
from bulkhead.devices import ged, i8042, serial
from bulkhead.devices.virtio import state as virtio_state
from bulkhead.errors import ConfigError, HostError, SnapshotError
from bulkhead.memory.layout import VIRTIO_MMIO_SLOTS
from bulkhead.snapshot.format import (
    CHUNK_PAGES,
    FORMAT,
    MAX_STATE,
    PAGE,
    SnapshotReader,
    b64,
    check_state,
    key_id,
    unb64,
    write_snapshot,
)

Machine = Any  # bulkhead.runtime.vm.Machine (which imports this module: no import back)
__all__ = ["Restore", "RestoreSource", "SnapshotTarget", "decrypt_into", "guest_memfds", "load_restore_state", "open_restore",
           "save_paused_state", "save_state", "scrub_memfd", "seal_snapshot"]

_ZERO = bytes(PAGE)
_CONFIG_KEYS = ("kernel", "initrd", "cmdline", "mem_mib", "cpus", "boot_protocol", "expected_digest", "drives", "nets",
                "rng")
_SCALAR_KEYS = _CONFIG_KEYS[:-3]
MAX_MSRS = 1024
MAX_CPUID = 256


def _complete_pending_io(machine: Machine) -> None:
    """Re-enter KVM_RUN with immediate_exit on each vCPU so a half-done I/O instruction completes."""
    from bulkhead.hypervisor.kvm import constants as c
    from bulkhead.hypervisor.kvm.system import _libc

    for runner in machine.runners:
        vcpu = runner.vcpu
        vcpu.run.immediate_exit = 1
        ret = _libc.ioctl(vcpu.fd, ctypes.c_ulong(c.KVM_RUN), ctypes.c_ulong(0))
        err = ctypes.get_errno()
        vcpu.run.immediate_exit = 0
        if ret == 0 or err not in (errno.EINTR, errno.EAGAIN):
            raise HostError(f"cannot quiesce vCPU {vcpu.index} for the snapshot (KVM_RUN {ret}, errno {err})")


def _state(machine: Machine) -> dict[str, Any]:
    from bulkhead.hypervisor.kvm.state import get_vcpu_state, get_vm_state, msr_index_list

    cfg = machine.config
    indices = msr_index_list(machine.kvm)
    vcpus = []
    for runner in machine.runners:
        st = get_vcpu_state(runner.vcpu, indices)
        vcpus.append({k: (b64(v) if isinstance(v, bytes) else v) for k, v in st.items()})
    return {
        "config": config_doc(cfg),
        "cpuid": {"mcg_cap": machine.mcg_cap, "entries": [list(map(list, e)) for e in machine.cpuid_tables]},
        "vcpus": vcpus,
        "vm": {k: b64(v) for k, v in get_vm_state(machine.vm).items()},
        "devices": {"serial": serial.save_state(machine.serial), "i8042": i8042.save_state(machine.i8042),
                    **({"ged": ged.save_state(machine.ged)} if getattr(machine, "ged", None) is not None else {}),
                    "virtio": [virtio_state.save_state(t) for t in machine.transports]},
        "memory": {"runs": []},
    }


def config_doc(cfg: VmConfig) -> dict[str, Any]:
    """The configuration a snapshot keeps: the scalar fields, the drives (path, read-only, id, rate), the NICs
    (tap name, MAC, rate; never a tap fd) and rng."""
    doc: dict[str, Any] = {k: getattr(cfg, k) for k in _SCALAR_KEYS}
    doc["drives"] = [{"path": os.path.abspath(d.path), "read_only": d.read_only, "drive_id": d.drive_id,
                      "rate": [d.rate.bytes_per_sec, d.rate.ops_per_sec]} for d in cfg.drives]
    doc["nets"] = [{"tap": n.tap, "mac": n.mac, "rate": [n.rate.bytes_per_sec, n.rate.ops_per_sec]} for n in cfg.nets]
    doc["rng"] = cfg.rng
    return doc


def refuse_unsupported_virtio(cfg: VmConfig) -> None:
    """virtio-vsock cannot be saved yet: ConfigError, one sentence."""
    if cfg.vsock is not None:
        raise ConfigError("snapshots of VMs with a virtio-vsock device are not supported yet "
                          "(virtio-blk, virtio-net and virtio-rng are; docs/SNAPSHOT.md)")


def _drain_virtio(machine: Machine) -> None:
    """Complete every request the guest made available (devices/virtio/state.py drain), vCPUs stopped."""
    refuse_unsupported_virtio(machine.config)
    for t in machine.transports:
        virtio_state.drain(t)


def save_state(machine: Machine, state_fd: int) -> None:
    """Worker side (jailed or not): quiesce the stopped machine and write its state document into
    `state_fd` (the memory is already in the host's memfd). The document is checked by the host."""
    _complete_pending_io(machine)
    _drain_virtio(machine)
    write_state_fd(state_fd, _state(machine))


def save_paused_state(machine: Machine, state_fd: int, timeout: float = 5.0) -> None:
    """Worker side, for a snapshot of a running VM (protocol SaveState): machine.pause() was called; wait
    until every vCPU thread is parked outside KVM_RUN (runtime/vcpu.py: it parks only after a KVM_RUN that
    returned EINTR, which completes a half-done I/O instruction, api.rst 4.3), flush the UART's output,
    then write the state document as save_state does. The VM stays paused. Raises ConfigError (virtio
    devices) or HostError (a vCPU that does not park in time)."""
    refuse_unsupported_virtio(machine.config)
    deadline = time.monotonic() + timeout
    while not all(r.paused or r.thread is None or not r.thread.is_alive() for r in machine.runners):
        if time.monotonic() > deadline:
            raise HostError("a vCPU did not pause for the snapshot in time")
        for r in machine.runners:
            if not r.paused:
                r.kick()
        time.sleep(0.001)
    if machine.serial is not None:
        machine.serial.flush()
    _complete_pending_io(machine)  # each parked vCPU: KVM_RUN with immediate_exit returns EINTR at once
    _drain_virtio(machine)
    write_state_fd(state_fd, _state(machine))


# -- memfds shared with the worker -------------------------------------------------------------------

def sealed_memfd(name: str, size: int) -> int:
    """A memfd of exactly `size` bytes that nobody (the worker included) can grow or shrink."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_state_fd(fd: int, doc: dict[str, Any]) -> None:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_STATE:
        raise SnapshotError(f"snapshot state is larger than {MAX_STATE} bytes")
    os.pwrite(fd, struct.pack("<Q", len(data)) + data, 0)


def read_state_fd(fd: int) -> dict[str, Any]:
    """Read a state document a worker (untrusted) or the host wrote. Raises SnapshotError."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise SnapshotError("the VM's state was not written")
    (n,) = struct.unpack("<Q", head)
    if not 0 < n <= MAX_STATE:
        raise SnapshotError(f"the VM's state document has an impossible length {n}")
    data = os.pread(fd, n, 8)
    try:
        doc = json.loads(data)
    except ValueError:
        raise SnapshotError("the VM's state document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise SnapshotError("the VM's state document is not an object")
    return doc


def _flat_regions(mem_bytes: int) -> list[tuple[int, int, int]]:
    """(guest base, size, offset in the memfd) per RAM region, as GuestMemory(fd=) maps them."""
    from bulkhead.memory.layout import ram_regions

    out, off = [], 0
    for base, size in sorted(ram_regions(mem_bytes)):
        out.append((base, size, off))
        off += size
    return out


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[data, hole) ranges of `fd` within [start, end): SEEK_DATA/SEEK_HOLE find what was ever written
    (swapped-out pages count as data, unlike mincore)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def memfd_runs(memory: memoryview, mem_bytes: int, fd: int) -> Iterator[tuple[int, int, memoryview]]:
    """(pfn, npages, view) runs of non-zero guest pages in the memfd, at most CHUNK_PAGES each.
    Within the memfd's data ranges (_data_ranges), all-zero pages are skipped."""
    for base, size, off in _flat_regions(mem_bytes):
        for data, hole in _data_ranges(fd, off, off + size):
            start = None
            for page in range(data - data % PAGE, hole, PAGE):
                nonzero = memory[page : page + PAGE] != _ZERO
                if nonzero and start is None:
                    start = page
                if start is not None and (not nonzero or page - start >= CHUNK_PAGES * PAGE):
                    yield (base + start - off) // PAGE, (page - start) // PAGE, memory[start:page]
                    start = page if nonzero else None
            if start is not None:
                yield (base + start - off) // PAGE, (hole - start) // PAGE, memory[start:hole]


@contextlib.contextmanager
def _mapped(fd: int, size: int) -> Iterator[memoryview]:
    """A shared read-write view of a memfd. Unmapped on the way out, unless a view of it is still held
    (by an exception being raised): then it goes with its last reference."""
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(m)
    try:
        yield view
    finally:
        try:
            view.release()
            m.close()
        except BufferError:
            pass


def scrub_memfd(fd: int, size: int) -> None:
    """Zero every page of a guest-RAM memfd that holds data, then free them (the worker does not scrub
    memory it does not own: bulkhead/memory/guest.py)."""
    with _mapped(fd, size) as view, contextlib.suppress(OSError):  # best effort, as before
        for data, hole in _data_ranges(fd, 0, size):
            view[data:hole] = bytes(hole - data)
    # the pages themselves go when the last fd of the memfd is closed


class RestoreSource(NamedTuple):
    """A snapshot decrypted into memfds (decrypt_into) and its checked (header, state)."""

    header: dict[str, Any]
    state: dict[str, Any]
    memory_fd: int
    state_fd: int
    on_built: Callable[[], object]


class SnapshotTarget(NamedTuple):
    """Where to save the VM when the host stops it, with which host key, under which VM id; the memfds
    the VM's memory and state document live in (made by new_target)."""

    path: str
    host_key: bytes
    vm_id: str
    memory_fd: int
    state_fd: int


def guest_memfds(mem_bytes: int) -> tuple[int, int]:
    """(memory fd, state fd) for a VM whose host may snapshot or restore it."""
    memory = sealed_memfd("bulkhead-guest-ram", mem_bytes)
    try:
        state = sealed_memfd("bulkhead-vm-state", MAX_STATE + 8)
    except OSError:
        os.close(memory)
        raise
    return memory, state


def seal_snapshot(target: SnapshotTarget, *, config: VmConfig, launch_digest: str | None) -> dict[str, Any]:
    """Host side: check the state document the worker wrote, read guest memory from the memfd and write
    the authenticated, encrypted snapshot file. Nothing the worker wrote is believed about the VM's
    identity: VM id, launch digest, memory size and vCPU count come from the host."""
    header = {
        "format": FORMAT,
        "bulkhead": __version__,
        "snapshot_id": uuid.uuid4().hex,
        "vm_id": target.vm_id,
        "launch_digest": launch_digest,
        "host_key_id": key_id(target.host_key),
        "created": int(time.time()),
        "mem_bytes": config.mem_bytes,
        "cpus": config.cpus,
    }
    state = read_state_fd(target.state_fd)
    if isinstance(state.get("config"), dict):  # the drives as the host opened them (a jailed worker sees /vm/...)
        host = config_doc(config)
        for part in ("drives", "nets", "rng"):
            state["config"][part] = host[part]
    frames = max(b + s for b, s, _ in _flat_regions(config.mem_bytes)) // PAGE
    probe = json.loads(json.dumps(state))
    check_state(probe, header, page_frames=frames)
    check_vcpus(probe)
    check_vm(probe["vm"])
    _check_config(probe["config"], header, "none")
    with _mapped(target.memory_fd, config.mem_bytes) as view:
        runs = list(memfd_runs(view, config.mem_bytes, target.memory_fd))
        state["memory"] = {"runs": [[pfn, n] for pfn, n, _ in runs]}
        parts = write_snapshot(header, state, runs, host_key=target.host_key, dek=os.urandom(32),
                               key_nonce=os.urandom(12))
        size = _write_file(target.path, parts)
        pages = sum(n for _, n, _ in runs)
        del runs, parts
    return {"path": target.path, "snapshot_id": header["snapshot_id"], "bytes": size, "pages": pages}


def _write_file(path: str, parts: Iterator[bytes]) -> int:
    """A temporary file in the same directory, fsynced, then renamed: a crash or a full disk never leaves
    a half snapshot under `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the snapshot {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
                size += len(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        _unlink(tmp)
        raise HostError(f"cannot write the snapshot {path}: {exc.strerror}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Restore(NamedTuple):
    """An opened, authenticated snapshot: header, checked state, and the reader for its memory."""

    header: dict[str, Any]
    state: dict[str, Any]
    raw: dict[str, Any]
    config: VmConfig
    reader: SnapshotReader
    close: Any


def _drive(doc: object, i: int) -> DriveConfig:
    what = f"snapshot state: config.drives[{i}]"
    if not isinstance(doc, dict) or set(doc) != {"path", "read_only", "drive_id", "rate"}:
        raise SnapshotError(f"{what} has the wrong fields")
    path, ident, rate = doc["path"], doc["drive_id"], doc["rate"]
    if not isinstance(path, str) or not 0 < len(path.encode()) <= 4096 or "\0" in path:
        raise SnapshotError(f"{what}.path is not a path")
    if not isinstance(ident, str) or len(ident.encode()) > 20:
        raise SnapshotError(f"{what}.drive_id is not a string of at most 20 bytes")
    if not isinstance(doc["read_only"], bool):
        raise SnapshotError(f"{what}.read_only is not a boolean")
    return DriveConfig(path, doc["read_only"], ident, _rate(rate, what))


def _rate(rate: object, what: str) -> RateLimit:
    if not isinstance(rate, list) or len(rate) != 2:
        raise SnapshotError(f"{what}.rate is not [bytes per second, operations per second]")
    return RateLimit(_u(rate[0], 64, f"{what}.rate"), _u(rate[1], 64, f"{what}.rate"))


def _net(doc: object, i: int) -> NetConfig:
    """A NIC of the snapshot's config, checked as `--net` would check it (config.parse_net)."""
    what = f"snapshot state: config.nets[{i}]"
    if not isinstance(doc, dict) or set(doc) != {"tap", "mac", "rate"}:
        raise SnapshotError(f"{what} has the wrong fields")
    tap, mac = doc["tap"], doc["mac"]
    if not isinstance(tap, str) or not isinstance(mac, str) or "," in tap + mac or "=" in tap + mac:
        raise SnapshotError(f"{what} has a tap or MAC that is not a plain string")
    try:
        checked = parse_net(f"tap={tap}" + (f",mac={mac}" if mac else ""))
    except ConfigError as exc:
        raise SnapshotError(f"{what}: {exc}") from None
    return checked._replace(rate=_rate(doc["rate"], what))


def _check_config(doc: dict[str, Any], header: dict[str, Any], serial: str) -> VmConfig:
    if set(doc) != set(_CONFIG_KEYS):
        raise SnapshotError("snapshot state: config has the wrong fields")
    if (not isinstance(doc["drives"], list) or not isinstance(doc["nets"], list) or not isinstance(doc["rng"], bool)
            or len(doc["drives"]) + len(doc["nets"]) > VIRTIO_MMIO_SLOTS):
        raise SnapshotError("snapshot state: config.drives or config.nets is not a list, or config.rng is not a boolean")
    try:
        cfg = VmConfig(**{k: doc[k] for k in _SCALAR_KEYS}, drives=tuple(_drive(d, i) for i, d in enumerate(doc["drives"])),
                       nets=tuple(_net(n, i) for i, n in enumerate(doc["nets"])), rng=doc["rng"], serial=serial)
    except (ConfigError, TypeError) as exc:
        raise SnapshotError(f"snapshot state: config is invalid: {exc}") from None
    if cfg.mem_bytes != header["mem_bytes"] or cfg.cpus != header["cpus"]:
        raise SnapshotError("snapshot state: config disagrees with the header")
    return cfg


def _u(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise SnapshotError(f"snapshot state: {what} is not an unsigned {bits}-bit integer")
    return value


def check_vcpus(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every vCPU part: exact blob sizes (linux/kvm.h), MP state, MSR pairs, CPUID entries."""
    from bulkhead.hypervisor.kvm.state import VCPU_BLOBS

    cpuid = state["cpuid"]
    if not isinstance(cpuid, dict) or set(cpuid) != {"mcg_cap", "entries"}:
        raise SnapshotError("snapshot state: cpuid has the wrong fields")
    _u(cpuid["mcg_cap"], 64, "cpuid.mcg_cap")
    tables = cpuid["entries"]
    if not isinstance(tables, list) or len(tables) != len(state["vcpus"]):
        raise SnapshotError("snapshot state: one CPUID table per vCPU is needed")
    out = []
    for i, (vs, table) in enumerate(zip(state["vcpus"], tables, strict=True)):
        want = {*VCPU_BLOBS, "mp_state", "msrs"}
        if not isinstance(vs, dict) or set(vs) != want:
            raise SnapshotError(f"snapshot state: vcpus[{i}] has the wrong fields")
        checked: dict[str, Any] = {n: unb64(vs[n], f"vcpus[{i}].{n}", size) for n, (size, _, _) in VCPU_BLOBS.items()}
        checked["mp_state"] = vs["mp_state"]
        if _u(vs["mp_state"], 32, f"vcpus[{i}].mp_state") > 8:
            raise SnapshotError(f"snapshot state: vcpus[{i}].mp_state is not a KVM MP state")
        msrs = vs["msrs"]
        if not isinstance(msrs, list) or len(msrs) > MAX_MSRS:
            raise SnapshotError(f"snapshot state: vcpus[{i}].msrs is not a list of at most {MAX_MSRS}")
        pairs = []
        for m in msrs:
            if not isinstance(m, list) or len(m) != 2:
                raise SnapshotError(f"snapshot state: vcpus[{i}].msrs has an entry that is not [index, value]")
            pairs.append((_u(m[0], 32, "an MSR index"), _u(m[1], 64, "an MSR value")))
        checked["msrs"] = pairs
        if not isinstance(table, list) or not 0 < len(table) <= MAX_CPUID:
            raise SnapshotError(f"snapshot state: the CPUID table of vCPU {i} is empty or too long")
        entries = []
        for e in table:
            if not isinstance(e, list) or len(e) != 7:
                raise SnapshotError(f"snapshot state: a CPUID entry of vCPU {i} is not 7 integers")
            entries.append(tuple(_u(x, 32, "a CPUID field") for x in e))
        checked["cpuid"] = entries
        out.append(checked)
    return out


def check_vm(doc: dict[str, Any]) -> dict[str, bytes]:
    from bulkhead.hypervisor.kvm.state import IRQCHIP_SIZE, IRQCHIPS, VM_BLOBS

    sizes = {**{n: v[0] for n, v in VM_BLOBS.items()}, **dict.fromkeys(IRQCHIPS, IRQCHIP_SIZE)}
    if set(doc) != set(sizes):
        raise SnapshotError("snapshot state: vm has the wrong fields")
    return {n: unb64(doc[n], f"vm.{n}", size) for n, size in sizes.items()}


def open_restore(
    path: str, *, host_key: bytes | Callable[[], bytes], serial: str, expected_digest: str | None = None
) -> Restore:
    """Open, authenticate and check a snapshot (memory chunks are checked as they are read: Restore.reader).
    Raises SnapshotError with the reason for anything wrong with the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path} does not exist") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SnapshotError(f"snapshot {path} is empty")
        data = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    except OSError as exc:
        raise SnapshotError(f"cannot map the snapshot {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        reader = SnapshotReader(data)
        header = reader.header
        if header["bulkhead"] != __version__:
            raise SnapshotError(
                f"snapshot was made by bulkhead {header['bulkhead']}, this is {__version__}: a snapshot restores "
                "only on the version that made it"
            )
        if expected_digest is not None and header["launch_digest"] != expected_digest.strip().lower():
            raise SnapshotError(
                f"snapshot's launch digest {header['launch_digest']} is not the expected {expected_digest}"
            )
        raw = reader.open(host_key if isinstance(host_key, bytes) else host_key())
        original = json.loads(json.dumps(raw))
        from bulkhead.memory.layout import ram_regions

        frames = max(base + size for base, size in ram_regions(header["mem_bytes"])) // PAGE
        state = check_state(raw, header, page_frames=frames)
        config = _check_config(state["config"], header, serial)
        state["vcpus"] = check_vcpus(state)
        state["vm"] = check_vm(state["vm"])

        def close() -> None:
            reader.release()
            _close_map(data)

        return Restore(header, state, original, config, reader, close)
    except BaseException:
        _close_map(data)
        raise


def _close_map(data: mmap.mmap) -> None:
    """Unmap now if no view of it is left; otherwise (a view held by an exception being raised) the
    mapping goes with its last reference. It is a private read-only map: nothing is lost either way."""
    try:
        data.close()
    except BufferError:
        pass


def decrypt_into(restore: Restore, memory_fd: int, state_fd: int) -> None:
    """Host side: decrypt and authenticate every memory chunk into the guest-RAM memfd, check the end
    block, and write the checked state document for the machine (in this process or a jailed worker).
    Nothing reaches the memfds that failed authentication is ever run: a failure here raises before any
    vCPU exists."""
    mem_bytes = restore.config.mem_bytes
    flat = _flat_regions(mem_bytes)
    with _mapped(memory_fd, mem_bytes) as view:
        for pfn, npages, plain in restore.reader.chunks(restore.state["memory"]["runs"]):
            addr = pfn * PAGE
            for base, size, off in flat:
                if base <= addr and addr + npages * PAGE <= base + size:
                    view[off + addr - base : off + addr - base + len(plain)] = plain
                    break
            else:
                raise SnapshotError(f"snapshot memory run at page {pfn:#x} (+{npages}) is outside guest RAM")
        restore.reader.finish()
    write_state_fd(state_fd, {"header": restore.header, "state": restore.raw})


def load_restore_state(state_fd: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Machine side: the (header, checked state) the host wrote with decrypt_into. Checked again here:
    the same functions, so the machine never depends on the host having called them."""
    doc = read_state_fd(state_fd)
    if set(doc) != {"header", "state"}:
        raise SnapshotError("the restore document has the wrong fields")
    from bulkhead.snapshot.format import check_header

    header = check_header(doc["header"])
    state = check_state(doc["state"], header, page_frames=max(b + s for b, s, _ in _flat_regions(header["mem_bytes"])) // PAGE)
    state["vcpus"] = check_vcpus(state)
    state["vm"] = check_vm(state["vm"])
    return header, state


def restore_devices(machine: Machine, state: dict[str, Any]) -> None:
    devices = state["devices"]
    if not isinstance(devices, dict) or set(devices) - {"ged"} != {"serial", "i8042", "virtio"}:
        raise SnapshotError("snapshot state: devices has the wrong fields")
    if "ged" in devices and getattr(machine, "ged", None) is None:
        raise SnapshotError("snapshot state: it has an ACPI GED and this VM has none")
    docs = devices["virtio"]
    if not isinstance(docs, list) or len(docs) != len(machine.transports):
        raise SnapshotError(f"snapshot state: devices.virtio does not have one document per virtio device "
                            f"({len(machine.transports)})")
    try:
        serial.load_state(machine.serial, devices["serial"])
        i8042.load_state(machine.i8042, devices["i8042"])
        if "ged" in devices:  # older snapshots have none: no event was pending for them
            ged.load_state(machine.ged, devices["ged"])
        for i, (t, doc) in enumerate(zip(machine.transports, docs, strict=True)):
            virtio_state.load_state(t, doc, f"devices.virtio[{i}]")
    except ValueError as exc:
        raise SnapshotError(f"snapshot state: {exc}") from None


def restore_machine(machine: Machine, header: dict[str, Any], state: dict[str, Any],
                    on_built: Callable[[], object] | None = None) -> None:
    """Rebuild `machine` from a snapshot instead of a kernel (runtime/snapshot.py): guest RAM is
    the memfd the host decrypted it into (memory_fd); chips, vCPUs and device registers come from the
    checked `state`; the virtio devices are attached as the config says (the drives reopened) and get
    their transport state. Then `on_built` (the restore ledger: it may still refuse), and only then the
    virtio queues are run once (devices/virtio/state.py kick), so a refused restore never touches a drive.
    Raises SnapshotError, ConfigError or HostError; no vCPU runs yet."""
    from bulkhead.hypervisor.kvm import Kvm
    from bulkhead.hypervisor.kvm.state import set_vcpu_state, set_vm_state

    cfg = machine.config
    refuse_unsupported_virtio(cfg)
    if machine.memory_fd < 0:
        raise HostError("a restore needs the guest memory the host decrypted (memory_fd)")
    machine.launch_digest = header["launch_digest"]
    machine.kvm = Kvm()
    machine.add_closer(machine.kvm.close)
    if cfg.cpus > machine.kvm.max_vcpus():
        raise HostError(f"the snapshot has {cfg.cpus} vCPUs, more than this host's KVM allows")
    machine.platform()
    machine.attach_virtio_devices()  # the same slots, IRQs and order as at boot (runtime/virtio.py)
    set_vm_state(machine.vm, state["vm"])
    machine.mcg_cap = state["cpuid"]["mcg_cap"]
    for index, vstate in enumerate(state["vcpus"]):
        vcpu = machine.vm.create_vcpu(index)
        if machine.mcg_cap:
            vcpu.setup_mce(machine.mcg_cap)
        vcpu.set_cpuid(vstate["cpuid"])
        machine.cpuid_tables.append(vstate["cpuid"])
        refused = set_vcpu_state(vcpu, vstate)
        if refused:
            machine.record("msr-refused", msrs=[f"{i:#x}" for i in refused])
        machine.add_runner(vcpu)
    restore_devices(machine, state)
    if on_built is not None:
        on_built()
    for t in machine.transports:  # the vCPUs have not run yet; their IOAPIC and LAPICs are restored
        virtio_state.kick(t)
    machine.record("vm-restored", snapshot=header["snapshot_id"], cpus=cfg.cpus, mem_mib=cfg.mem_mib)
