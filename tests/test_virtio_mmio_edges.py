"""virtio-mmio transport edges (issue 15): the §2.1 status machine's rewrite of the same status, and
the counters and guest-fault event fields a driver error is recorded under (§4.2.2.2: control
registers take aligned 32-bit accesses only; §2.2: driver features are written before FEATURES_OK)."""

from __future__ import annotations

import struct

from tests.test_virtio_blk import Rig, make_image, mem  # noqa: F401  (mem: the fixture)

from bulkhead.devices.virtio import block as blk
from bulkhead.devices.virtio import mmio


def test_rewriting_the_current_status_is_same_and_changes_nothing() -> None:
    for s in (mmio.STATUS_ACKNOWLEDGE, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER):
        assert mmio.status_transition(s, s, 0, 0) == ("same", s)
    s = mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_NEEDS_RESET
    assert mmio.status_transition(s, mmio.STATUS_ACKNOWLEDGE, 0, 0) == ("same", s)  # NEEDS_RESET stays


def test_refused_accesses_and_notifies_are_counted_under_their_names(mem, tmp_path):  # noqa: F811
    p = tmp_path / "d.img"
    make_image(p)
    r = Rig(mem, p)
    try:
        t = r.t
        before = dict(t.stats)
        t.write(mmio.STATUS, 2, 0)  # a 16-bit write to a control register: dropped
        t.write(mmio.DRIVER_FEATURES, 4, 0)  # after FEATURES_OK: refused
        r.request(blk.VIRTIO_BLK_T_FLUSH)
        grew = {k: v - before.get(k, 0) for k, v in t.stats.items() if v != before.get(k, 0)}
        assert grew == {"bad_register_access": 1, "features_write_refused": 1, "notifies": 1, "interrupts": 1}, grew
        assert t.read(mmio.STATUS, 4) & mmio.STATUS_DRIVER_OK  # neither refusal reset the device
        r.d.add_chain([struct.pack("<II", 0, 0)], [1])  # an 8-byte header: a guest fault
        t.notify(0)
        assert r.events[-1] == {"device": "virtio-blk", "queue": 0, "kind": "virtqueue", "reason": "blk-header-short",
                                "message": "virtio-blk request header shorter than 16 bytes", "first": True}
        assert r.dev.queues[0].broken is True and t.read(mmio.STATUS, 4) & mmio.STATUS_NEEDS_RESET
    finally:
        r.close()
