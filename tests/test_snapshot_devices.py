"""Device state for snapshots: what save_state() returns, load_state() restores exactly; a bad document is
refused with ValueError and changes nothing (the snapshot layer turns it into SnapshotError)."""

from __future__ import annotations

import pytest

from bulkhead.devices import i8042, serial
from bulkhead.devices.i8042 import I8042Device
from bulkhead.devices.serial import Serial


class _Irq:
    def __init__(self) -> None:
        self.n = 0

    def trigger(self) -> None:
        self.n += 1


def _serial(out: list[bytes]) -> Serial:
    return Serial(_Irq(), out.append)


def test_serial_round_trip_keeps_registers_and_unread_input() -> None:
    out: list[bytes] = []
    a = _serial(out)
    a.write(3, 1, 0x80)  # DLAB
    a.write(0, 1, 0x01)  # DLL = 1 (115200)
    a.write(3, 1, 0x03)
    a.write(1, 1, 0x01)  # IER: receive data
    a.write(7, 1, 0x5A)  # scratch
    a.write(0, 1, ord("h"))  # buffered output: flushed by save_state
    a.enqueue_input(b"xyz")
    assert a.read(0, 1) == ord("x")
    doc = serial.save_state(a)
    assert b"".join(out) == b"h"
    b = _serial([])
    serial.load_state(b, doc)
    assert [b.read(0, 1) for _ in range(2)] == [ord("y"), ord("z")]
    assert b.read(7, 1) == 0x5A and b.read(1, 1) == 0x01
    b.write(3, 1, 0x80)
    assert b.read(0, 1) == 0x01  # the divisor came back too
    assert serial.save_state(b)["rx"] == ""


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ier": 0x10}, "reserved register bits"),
        ({"lcr": 256}, "lcr"),
        ({"rx": "***"}, "base64"),
        ({"level": 1}, "boolean"),
        ({"extra": 0}, "wrong fields"),
    ],
)
def test_serial_bad_state_is_refused_and_changes_nothing(change: dict[str, object], match: str) -> None:
    a = _serial([])
    a.enqueue_input(b"q")
    doc = {**serial.save_state(_serial([])), **change}
    with pytest.raises(ValueError, match=match):
        serial.load_state(a, doc)
    assert a.read(0, 1) == ord("q")


def test_serial_input_longer_than_its_queue_is_refused() -> None:
    import base64

    small = Serial(_Irq(), lambda b: None, rx_capacity=4)
    doc = {**serial.save_state(small), "rx": base64.b64encode(b"12345").decode()}
    with pytest.raises(ValueError, match="longer than 4"):
        serial.load_state(small, doc)


def test_i8042_round_trip_and_refusal() -> None:
    a = I8042Device(lambda: None)
    a.write(4, 1, 0x20)  # read the command byte: one reply queued
    doc = i8042.save_state(a)
    b = I8042Device(lambda: None)
    i8042.load_state(b, doc)
    assert b.read(4, 1) & 1 and b.read(0, 1) == a.read(0, 1)
    with pytest.raises(ValueError, match="status"):
        i8042.load_state(b, {**doc, "status": -1})
    with pytest.raises(ValueError, match="at most 16 bytes"):
        i8042.load_state(b, {**doc, "buf": "A" * 32})


def test_ged_round_trip_keeps_a_pending_power_button_and_refuses_unknown_bits() -> None:
    from bulkhead.devices import ged
    from bulkhead.devices.ged import EVT_POWER_DOWN, Ged

    a = Ged(_Irq())
    a.power_button()  # pressed, not yet read by the guest
    doc = ged.save_state(a)
    b = Ged(_Irq())
    ged.load_state(b, doc)
    assert b.read(0, 4) == EVT_POWER_DOWN and b.read(0, 4) == 0  # read and clear, as before the snapshot
    for bad in ({"sel": 1 << 5}, {"sel": -1}, {"sel": True}, {}, {"sel": 2, "x": 0}, [2]):
        c = Ged(_Irq())
        c.power_button()
        with pytest.raises(ValueError):
            ged.load_state(c, bad)
        assert c.read(0, 4) == EVT_POWER_DOWN  # a refused document changes nothing
