"""virtio-mmio transport and virtqueue state in snapshots (devices/virtio/state.py, virtio 1.2 §4.2.2 and
§2.7), without KVM: a restored transport behaves exactly as the original would have, requests are
drained at pause, and every hostile transport document is refused before any field is set."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bulkhead.devices.virtio import mmio
from bulkhead.devices.virtio import state as vstate
from bulkhead.devices.virtio.block import BlockDevice
from bulkhead.devices.virtio.mmio import MmioTransport
from bulkhead.devices.virtio.queue import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from bulkhead.devices.virtio.rng import RngDevice
from bulkhead.errors import SnapshotError
from bulkhead.memory import GuestMemory
from bulkhead.snapshot.format import FORMAT, check_state
from bulkhead.testing import FakeIrq
from bulkhead.testing.virtqueue import MockVirtqueueDriver, setup_transport

MEM = 4 << 20
BLK_REQ = b"\x01\0\0\0\0\0\0\0" + (3).to_bytes(8, "little")  # VIRTIO_BLK_T_OUT, sector 3


class Rig:
    """One transport on its own guest memory, set up by the mock driver like a guest would."""

    def __init__(self, kind: str, disk: Path, mem: GuestMemory | None = None) -> None:
        self.mem = mem or GuestMemory([(0, MEM)])
        self.kind = kind
        self.disk = disk
        if kind == "rng":
            self.dev: Any = RngDevice(source=lambda k: b"\x5a" * k)  # the same bytes on both sides
        else:
            self.fd = os.open(disk, os.O_RDWR)
            self.dev = BlockDevice(self.fd)
        self.irq = FakeIrq()
        self.t = MmioTransport(self.dev, self.mem, self.irq)

    def request(self, d: MockVirtqueueDriver) -> None:
        if self.kind == "rng":
            d.add_chain(writable=[32])
        else:
            d.add_chain([BLK_REQ, b"\xab" * 512], [1])

    def close(self) -> None:
        if self.kind == "blk":
            os.close(self.fd)
        self.mem.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(64 << 10))
    return p


def _restored(rig: Rig, doc: dict[str, Any]) -> Rig:
    """A second rig on a copy of rig's memory with `doc` loaded: what a restore builds."""
    mem = GuestMemory([(0, MEM)])
    mem.write(0, rig.mem.read(0, MEM))
    other = Rig(rig.kind, rig.disk, mem)
    vstate.load_state(other.t, json.loads(json.dumps(doc)))
    return other


@pytest.mark.parametrize("kind", ["rng", "blk"])
def test_a_restored_transport_goes_on_exactly_as_the_original(kind: str, disk: Path) -> None:
    """Set up, run 3 requests, save; then the same 5 driver steps on the original and on the restored
    copy must give the same guest memory, registers and interrupts (event-idx state included)."""
    a = Rig(kind, disk)
    (da,) = setup_transport(a.t, queue_size=16, data_size=0x40000)
    assert a.t.driver_features >> VIRTIO_F_EVENT_IDX & 1  # the event-idx state is exercised
    for _ in range(3):
        a.request(da)
        a.t.notify(0)
    doc = vstate.save_state(a.t)
    assert doc["queues"][0]["next_avail"] == doc["queues"][0]["next_used"] == 3
    b = _restored(a, doc)
    db = copy.copy(da)
    db.mem = b.mem
    for rig in (a, b):
        rig.irq.take()
    for step in range(5):
        for rig, d in ((a, da), (b, db)):
            d.set_used_event(step * 2)  # the driver moves its used_event (§2.7.7.2)
            rig.request(d)
            rig.t.notify(0)
        assert a.irq.take() == b.irq.take()
        assert da.used() == db.used()
    assert a.mem.read(0, MEM) == b.mem.read(0, MEM)
    for reg in (mmio.STATUS, mmio.INTERRUPT_STATUS, mmio.CONFIG_GENERATION, mmio.QUEUE_READY):
        assert a.t.read(reg, 4) == b.t.read(reg, 4)
    assert vstate.save_state(a.t) == vstate.save_state(b.t)
    a.close()
    b.close()


def test_drain_completes_what_was_notified_but_not_yet_processed(disk: Path) -> None:
    """The guest's notify reached the ioeventfd, the I/O thread had not run: drain completes it, so the
    saved next_used covers it and the guest sees it in its used ring before the state is read."""
    a = Rig("rng", disk)
    (d,) = setup_transport(a.t, queue_size=8)
    c = d.add_chain(writable=[16])
    vstate.drain(a.t)
    assert d.used() == [(c.head, 16)]
    assert vstate.save_state(a.t)["queues"][0]["next_used"] == 1
    a.close()


def test_kick_completes_what_the_guest_made_available_before_the_save(disk: Path) -> None:
    a = Rig("rng", disk)
    (d,) = setup_transport(a.t, queue_size=8)
    doc = vstate.save_state(a.t)
    c = d.add_chain(writable=[16])  # published in guest memory after the save, never notified
    b = _restored(a, doc)
    b.irq.take()
    vstate.kick(b.t)
    db = copy.copy(d)
    db.mem = b.mem
    assert db.used() == [(c.head, 16)] and b.irq.take() == 1
    a.close()
    b.close()


def test_a_reset_and_a_never_started_device_round_trip(disk: Path) -> None:
    a = Rig("blk", disk)
    doc = vstate.save_state(a.t)
    assert doc["status"] == 0 and not doc["queues"][0]["ready"]
    b = _restored(a, doc)
    setup_transport(b.t, queue_size=8)  # a driver can still bring it up from scratch
    assert b.t.status & mmio.STATUS_DRIVER_OK
    a.close()
    b.close()


def _saved(disk: Path) -> tuple[Rig, dict[str, Any]]:
    a = Rig("blk", disk)
    (d,) = setup_transport(a.t, queue_size=16)
    a.request(d)
    a.t.notify(0)
    return a, vstate.save_state(a.t)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if callable(value):
        value = value(node[last])
    if last == "-":
        del node[parents[-1]]  # not used
    node[last] = value


VERSION_1 = 1 << VIRTIO_F_VERSION_1
HOSTILE = [
    ("queues.0.desc", MEM + 0x1000, "not inside guest RAM"),
    ("queues.0.used", 0xC000_0000, "not inside guest RAM"),  # the MMIO hole
    ("queues.0.avail", (1 << 64) - 2, "wraps"),
    ("queues.0.size", 24, "not a power of two"),
    ("queues.0.size", 512, "not a power of two in 1..256"),  # above QueueNumMax
    ("queues.0.desc", 0x10008, "not 16-byte aligned"),
    ("queues.0.avail", lambda v: 0, "overlaps"),  # rings never set: they overlap at 0
    ("queues.0.next_avail", lambda v: v + 5, "differ"),  # requests in flight that nobody completes
    ("queues.0.next_used", 0x1_0000, "not an integer in"),
    ("queues.0.broken", True, "does not need a reset"),
    ("queues.0.ready", "yes", "not a boolean"),
    ("status", 0x0D, "not one a driver can reach"),
    ("status", 0x03, "ready before FEATURES_OK"),  # a ready queue with the status of before FEATURES_OK
    ("driver_features", lambda v: v | 1 << 40, "not all offered"),
    ("driver_features", lambda v: v & ~VERSION_1, "without VIRTIO_F_VERSION_1"),
    ("interrupt_status", 4, "not an integer in"),
    ("config_generation", -1, "not an integer in"),
    ("device_id", 19, "cannot be restored"),  # virtio-vsock: not in the format
    ("device_id", 1, "not all offered"),  # a virtio-blk document relabelled virtio-net
    ("queues", [], "queue"),
    ("device.capacity", "128", "not an integer"),
    ("device", {}, "wrong fields"),
]


@pytest.mark.parametrize(("path", "value", "match"), HOSTILE, ids=[f"{p}={m}" for p, _, m in HOSTILE])
def test_a_hostile_transport_document_is_refused_and_nothing_is_set(
    disk: Path, path: str, value: Any, match: str
) -> None:
    a, doc = _saved(disk)
    bad = json.loads(json.dumps(doc))
    if path == "queues.0.avail" and callable(value):  # all three rings unset
        for ring in ("desc", "avail", "used"):
            bad["queues"][0][ring] = 0
    else:
        _set(bad, path, value)
    with pytest.raises(ValueError, match=match):
        vstate.check_doc(bad, [(0, MEM)])
    fresh = Rig("blk", disk, GuestMemory([(0, MEM)]))
    with pytest.raises(ValueError, match=match):
        vstate.load_state(fresh.t, bad)
    assert vstate.save_state(fresh.t) == vstate.save_state(Rig("blk", disk).t)  # untouched: power-on state
    a.close()
    fresh.close()


def test_an_extra_or_missing_field_is_refused(disk: Path) -> None:
    a, doc = _saved(disk)
    for bad in ({**doc, "extra": 1}, {k: v for k, v in doc.items() if k != "queue_sel"},
                {**doc, "queues": [{**doc["queues"][0], "event_idx": True}]}):
        with pytest.raises(ValueError, match="wrong fields"):
            vstate.check_doc(bad, [(0, MEM)])
    a.close()


def test_a_drive_of_another_size_or_mode_is_refused_at_load(disk: Path, tmp_path: Path) -> None:
    """The guest read the capacity and the RO feature before the save: another drive would lie to it."""
    a, doc = _saved(disk)
    other = tmp_path / "bigger.img"
    other.write_bytes(bytes(128 << 10))
    b = Rig("blk", other)
    with pytest.raises(ValueError, match="must be the one the snapshot was taken with"):
        vstate.load_state(b.t, doc)
    ro_fd = os.open(disk, os.O_RDONLY)
    ro = MmioTransport(BlockDevice(ro_fd, read_only=True), GuestMemory([(0, MEM)]), FakeIrq())
    with pytest.raises(ValueError, match=r"features 0x[0-9a-f]+ are not offered by virtio-blk"):
        vstate.load_state(ro, doc)
    os.close(ro_fd)
    a.close()
    b.close()


def test_a_device_of_another_type_in_the_slot_is_refused(disk: Path) -> None:
    a, doc = _saved(disk)
    rng = Rig("rng", disk)
    with pytest.raises(ValueError, match="the VM has virtio-rng here"):
        vstate.load_state(rng.t, doc)
    a.close()
    rng.close()


def _state(virtio: list[Any], drives: int = 1, rng: bool = False) -> dict[str, Any]:
    drive = {"path": "/d", "read_only": False, "drive_id": "", "rate": [0, 0]}
    return {"config": {"drives": [drive] * drives, "nets": [], "rng": rng}, "vcpus": [{}], "vm": {}, "cpuid": {},
            "devices": {"virtio": virtio}, "memory": {"runs": []}}


HEADER = {"format": FORMAT, "bulkhead": "0.1.0", "snapshot_id": "a" * 32, "vm_id": "vm", "launch_digest": None,
          "host_key_id": "k", "created": 1, "mem_bytes": 128 << 20, "cpus": 1}


def test_the_pure_state_check_refuses_hostile_virtio_state_of_a_file(disk: Path) -> None:
    """bulkhead.snapshot.format.check_state (what the host runs on a worker's document and on every file,
    fuzzed by fuzz/fuzz_snapshot.py) checks the virtio documents against the header's RAM layout."""
    a, doc = _saved(disk)
    assert check_state(_state([doc]), HEADER, page_frames=32768)["devices"]["virtio"][0]["status"] == doc["status"]
    far = json.loads(json.dumps(doc))
    far["queues"][0]["used"] = (128 << 20) + 4096  # inside the rig's memory is irrelevant: past this VM's RAM
    with pytest.raises(SnapshotError, match=r"devices.virtio\[0\].*not inside guest RAM"):
        check_state(_state([far]), HEADER, page_frames=32768)
    with pytest.raises(SnapshotError, match="one document per drive, NIC and rng"):
        check_state(_state([doc], drives=2), HEADER, page_frames=32768)
    with pytest.raises(SnapshotError, match="one document per drive, NIC and rng"):
        check_state(_state([]), HEADER, page_frames=32768)
    with pytest.raises(SnapshotError, match="is device 2, the config has device 4"):
        check_state(_state([doc], drives=0, rng=True), HEADER, page_frames=32768)
    with pytest.raises(SnapshotError, match=r"config\.drives or config\.nets is not a list"):
        check_state({**_state([doc]), "config": {"drives": {}, "nets": [], "rng": False}}, HEADER, page_frames=32768)
    a.close()


def test_a_vsock_transport_cannot_be_saved() -> None:
    from bulkhead.devices.virtio.vsock_device import VsockDevice

    mem = GuestMemory([(0, MEM)])
    t = MmioTransport(VsockDevice(object(), 3), mem, FakeIrq())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be saved in a snapshot yet"):
        vstate.save_state(t)
    mem.close()


class Frames:
    """A net backend: `pending` frames (12-byte header included) to deliver, `sent` what the guest sent."""

    def __init__(self, pending: list[bytes]) -> None:
        self.pending, self.sent = list(pending), []  # type: tuple[list[bytes], list[bytes]]

    def fileno(self) -> int:
        return 77

    def read_frame_into(self, views: list[memoryview]) -> int | None:
        if not self.pending:
            return None
        frame, done = self.pending.pop(0), 0
        for v in views:
            part = frame[done : done + len(v)]
            v[: len(part)] = part
            done += len(part)
        return len(frame)

    def write_frame(self, views: list[memoryview]) -> None:
        self.sent.append(b"".join(bytes(v) for v in views))


def _net(mem: GuestMemory, frames: list[bytes], mac: bytes = b"\x52\x54\0\x12\x34\x56") -> tuple[MmioTransport, Frames]:
    from bulkhead.devices.virtio.net import NetDevice

    backend = Frames(frames)
    return MmioTransport(NetDevice(backend, mac=mac), mem, FakeIrq()), backend


def _net_steps(t: MmioTransport, rx: MockVirtqueueDriver, tx: MockVirtqueueDriver, n: int) -> None:
    for i in range(n):
        rx.add_chain(writable=[1536])
        tx.add_chain([bytes(12) + b"frame %d" % i])
        t.notify(1)
        (_, readable), = t.poll_fds()
        readable()


def test_a_restored_net_transport_goes_on_exactly_as_the_original() -> None:
    """RX buffers the guest posted, frames received and sent, event-idx state: after the restore the same
    driver steps give the same guest memory, the same frames out and the same used entries."""
    frames = [bytes(12) + b"from host %d" % i for i in range(8)]
    mem_a = GuestMemory([(0, MEM)])
    a, back_a = _net(mem_a, frames)
    rx, tx = setup_transport(a, queue_size=16)
    rx.add_chain(writable=[1536])  # a posted RX buffer with no frame yet: stays in the available ring
    _net_steps(a, rx, tx, 3)
    doc = vstate.save_state(a)
    assert doc["device"] == {"mac": 0x525400123456}
    mem_b = GuestMemory([(0, MEM)])
    mem_b.write(0, mem_a.read(0, MEM))
    b, back_b = _net(mem_b, back_a.pending)
    vstate.load_state(b, json.loads(json.dumps(doc)))
    rx_b, tx_b = copy.copy(rx), copy.copy(tx)
    rx_b.mem = tx_b.mem = mem_b
    sent_before = len(back_a.sent)
    _net_steps(a, rx, tx, 4)
    _net_steps(b, rx_b, tx_b, 4)
    assert back_a.sent[sent_before:] == back_b.sent and len(back_b.sent) == 4
    assert rx.used() == rx_b.used() and tx.used() == tx_b.used()
    assert mem_a.read(0, MEM) == mem_b.read(0, MEM)
    other, _ = _net(GuestMemory([(0, MEM)]), [], mac=b"\x52\x54\0\0\0\1")
    with pytest.raises(ValueError, match="must be the one the snapshot was taken with"):
        vstate.load_state(other, doc)  # the guest read its MAC from the config space
    mem_a.close()
    mem_b.close()
