"""i8042: reset line, the commands Linux's probe uses, containment."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.devices import I8042_BASE, I8042_LEN, I8042Device
from bulkhead.devices import i8042 as k
from bulkhead.testing import FakeIrq

DATA, CMD = 0, 4


class Ctl:
    def __init__(self, kbd_irq: FakeIrq | None = None) -> None:
        self.resets = 0
        self.dev = I8042Device(self._reset, kbd_irq=kbd_irq)

    def _reset(self) -> None:
        self.resets += 1


def test_claims_ports_0x60_to_0x64() -> None:
    assert (I8042_BASE, I8042_LEN) == (0x60, 5)
    assert I8042_BASE + k.OFS_COMMAND == 0x64


def test_fe_on_command_port_pulses_reset() -> None:
    c = Ctl()
    c.dev.write(CMD, 1, 0xFE)
    assert c.resets == 1
    assert c.dev.metrics.resets == 1
    c.dev.write(CMD, 1, 0xFE)
    assert c.resets == 2


@pytest.mark.parametrize("cmd", [0xF0, 0xF2, 0xFC])
def test_other_even_pulse_commands_also_reset(cmd: int) -> None:
    c = Ctl()
    c.dev.write(CMD, 1, cmd)
    assert c.resets == 1


@pytest.mark.parametrize(
    ("offset", "size", "value"),
    [(DATA, 1, 0xFE), (CMD, 1, 0xFF), (CMD, 2, 0xFE), (CMD, 4, 0xFE), (1, 1, 0xFE), (3, 1, 0xFE)],
)
def test_no_reset_elsewhere(offset: int, size: int, value: int) -> None:
    c = Ctl()
    c.dev.write(offset, size, value)
    assert c.resets == 0


def test_status_and_empty_data_port() -> None:
    c = Ctl()
    assert c.dev.read(CMD, 1) == k.SB_KBD_ENABLED
    assert c.dev.read(DATA, 1) == 0
    assert c.dev.read(DATA, 1) == 0


def test_self_test_and_control_byte_round_trip() -> None:
    c = Ctl()
    c.dev.write(CMD, 1, 0xAA)
    assert c.dev.read(CMD, 1) & k.SB_OUT_DATA_AVAIL
    assert c.dev.read(DATA, 1) == 0x55
    assert not c.dev.read(CMD, 1) & k.SB_OUT_DATA_AVAIL
    c.dev.write(CMD, 1, 0x20)
    assert c.dev.read(DATA, 1) == k.CB_POST_OK | k.CB_KBD_INT
    c.dev.write(CMD, 1, 0x60)
    assert c.dev.read(CMD, 1) & k.SB_CMD_DATA
    c.dev.write(DATA, 1, 0x45)
    assert not c.dev.read(CMD, 1) & k.SB_CMD_DATA
    c.dev.write(CMD, 1, 0x20)
    assert c.dev.read(DATA, 1) == 0x45
    assert c.dev.control == 0x45


def test_output_port_write_with_reset_bit_clear_resets() -> None:
    c = Ctl()
    c.dev.write(CMD, 1, 0xD1)
    c.dev.write(DATA, 1, 0xDF)  # A20 on, reset deasserted (what Linux's a20 code writes)
    assert c.resets == 0
    c.dev.write(CMD, 1, 0xD0)
    assert c.dev.read(DATA, 1) == 0xDF
    c.dev.write(CMD, 1, 0xD1)
    c.dev.write(DATA, 1, 0xDE)
    assert c.resets == 1


def test_keyboard_commands_are_acked_with_interrupt_when_enabled() -> None:
    irq = FakeIrq()
    c = Ctl(irq)
    c.dev.write(DATA, 1, 0xF4)  # keyboard "enable scanning"
    assert c.dev.read(DATA, 1) == 0xFA
    assert irq.take() == 1
    c.dev.write(CMD, 1, 0x60)
    c.dev.write(DATA, 1, 0x00)  # control byte: keyboard interrupt off
    assert irq.take() == 0
    c.dev.write(DATA, 1, 0xF4)
    assert c.dev.read(DATA, 1) == 0xFA
    assert irq.take() == 0


def test_unknown_commands_are_harmless_and_counted() -> None:
    c = Ctl()
    for cmd in (0x00, 0xA7, 0xA8, 0xAD, 0xAE, 0xC0, 0xEF):
        c.dev.write(CMD, 1, cmd)
    assert c.resets == 0
    assert c.dev.metrics.unknown_commands == 7
    assert c.dev.read(CMD, 1) == k.SB_KBD_ENABLED


def test_bad_accesses_are_contained() -> None:
    c = Ctl()
    assert c.dev.read(1, 1) == 0xFF
    assert c.dev.read(DATA, 2) == 0xFFFF
    assert c.dev.read(5, 1) == 0xFF
    c.dev.write(2, 1, 0xAA)
    assert c.dev.metrics.bad_access == 4
    assert c.dev.read(CMD, 1) == k.SB_KBD_ENABLED  # the stray write queued nothing


_op = st.tuples(
    st.booleans(), st.integers(-1, 6), st.sampled_from([0, 1, 1, 1, 2, 4]), st.integers(-(2**40), 2**40)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_random_accesses_never_raise_and_stay_in_range(ops: list[tuple[bool, int, int, int]]) -> None:
    c = Ctl(FakeIrq())
    for is_write, off, size, val in ops:
        if is_write:
            c.dev.write(off, size, val)
        else:
            v = c.dev.read(off, size)
            assert 0 <= v < (1 << (8 * size)) if size > 0 else v == 0
    assert c.resets == c.dev.metrics.resets
    assert c.dev.read(CMD, 1) & ~(k.SB_OUT_DATA_AVAIL | k.SB_CMD_DATA) == k.SB_KBD_ENABLED


# ------------------------------------------------------------------ Ctrl-Alt-Del (vm shutdown)
def test_ctrl_alt_del_queues_set2_make_codes_with_one_interrupt_per_byte() -> None:
    irq = FakeIrq()
    c = Ctl(irq)
    assert c.dev.trigger_ctrl_alt_del() is True
    assert irq.count == 1
    got = []
    while c.dev.read(CMD, 1) & k.SB_OUT_DATA_AVAIL:
        got.append(c.dev.read(DATA, 1))
    assert bytes(got) == bytes([0x14, 0x11, 0xE0, 0x71])  # Firecracker's KEY_CTRL, KEY_ALT, KEY_DEL
    assert irq.count == 4  # raised again while bytes remain: a guest reading one byte per IRQ gets all
    assert c.dev.metrics.ctrl_alt_del == 1 and c.resets == 0


def test_ctrl_alt_del_is_refused_when_the_buffer_is_full_and_never_overflows_it() -> None:
    c = Ctl(FakeIrq())
    accepted = sum(c.dev.trigger_ctrl_alt_del() for _ in range(10))
    assert accepted == k.BUF_SIZE // len(k.CTRL_ALT_DEL)
    assert c.dev.metrics.ctrl_alt_del_refused == 10 - accepted
    n = 0
    while c.dev.read(CMD, 1) & k.SB_OUT_DATA_AVAIL:
        c.dev.read(DATA, 1)
        n += 1
    assert n == k.BUF_SIZE


def test_without_the_keyboard_interrupt_enabled_nothing_is_raised() -> None:
    irq = FakeIrq()
    c = Ctl(irq)
    c.dev.write(CMD, 1, k.CMD_WRITE_CTR)
    c.dev.write(DATA, 1, k.CB_POST_OK)  # keyboard interrupt off
    assert c.dev.trigger_ctrl_alt_del()
    assert irq.count == 0
    assert c.dev.read(DATA, 1) == 0x14  # still readable by polling


# --- mutation-testing survivors (issue 15): counters, widths, the status byte across commands ------------

def test_counters_known_answer_after_a_mixed_sequence() -> None:
    c = Ctl()
    d = c.dev
    assert d.metrics.as_dict() == {"bad_access": 0, "ctrl_alt_del": 0, "ctrl_alt_del_refused": 0, "reads": 0, "resets": 0,
                                   "unknown_commands": 0, "writes": 0}
    d.read(CMD, 1)
    d.read(CMD, 1)
    d.write(CMD, 1, k.CMD_SELF_TEST)
    d.write(CMD, 1, 0xFF)  # pulse no output line: not a reset, and not an unknown command
    d.write(CMD, 1, 0x13)  # unknown
    d.write(2, 1, 0)       # offsets 1-3: contained
    d.write(CMD, 1, k.CMD_RESET_CPU)
    assert d.metrics.as_dict() == {"bad_access": 1, "ctrl_alt_del": 0, "ctrl_alt_del_refused": 0, "reads": 2,
                                   "resets": 1, "unknown_commands": 1, "writes": 4}
    assert c.resets == 1
    assert repr(d.metrics) == f"I8042Metrics({d.metrics.as_dict()})"


def test_bad_widths_and_offsets_read_all_ones_of_their_width() -> None:
    d = Ctl().dev
    assert [d.read(DATA, s) for s in (2, 4, 8)] == [0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1]
    assert [d.read(o, 1) for o in (1, 2, 3)] == [0xFF] * 3
    assert [d.read(DATA, s) for s in (0, 9)] == [0, 0]
    assert d.metrics.bad_access == 8 and d.metrics.reads == 0


def test_write_ctr_command_drops_a_pending_reply_and_waits_for_its_byte() -> None:
    d = Ctl().dev
    d.write(CMD, 1, k.CMD_SELF_TEST)
    assert d.read(CMD, 1) == k.SB_KBD_ENABLED | k.SB_OUT_DATA_AVAIL
    d.write(CMD, 1, k.CMD_WRITE_CTR)  # the unread 0x55 is dropped; a parameter byte is expected
    assert d.read(CMD, 1) == k.SB_KBD_ENABLED | k.SB_CMD_DATA
    d.write(DATA, 1, 0x1_46)           # masked to a byte
    assert d.control == 0x46 and d.read(CMD, 1) == k.SB_KBD_ENABLED
    d.write(CMD, 1, k.CMD_READ_CTR)
    assert d.read(DATA, 1) == 0x46


def test_output_port_write_with_reset_bit_clear_resets_once() -> None:
    c = Ctl()
    c.dev.write(CMD, 1, k.CMD_WRITE_OUTP)
    c.dev.write(DATA, 1, k.OUTP_DEFAULT)  # reset line deasserted: nothing
    assert c.resets == 0
    c.dev.write(CMD, 1, k.CMD_READ_OUTP)
    assert c.dev.read(DATA, 1) == k.OUTP_DEFAULT
    c.dev.write(CMD, 1, k.CMD_WRITE_OUTP)
    c.dev.write(DATA, 1, 0x02)  # bit 0 low: reset
    assert c.resets == 1 and c.dev.metrics.resets == 1


def test_output_port_reads_its_power_on_value() -> None:
    d = Ctl().dev
    d.write(CMD, 1, k.CMD_READ_OUTP)
    assert d.read(DATA, 1) == k.OUTP_DEFAULT == 0x03  # reset deasserted, A20 on
