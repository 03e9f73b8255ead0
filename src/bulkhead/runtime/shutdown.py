"""Asking a guest to power off (`vm shutdown`), through the machine's builder API (it does not import
vm.py, like virtio.py).

- `attach_ged(machine)`: the ACPI Generic Event Device (devices/ged.py) on the MMIO bus with its irqfd
  (GSI GED_IRQ), described in the DSDT by boot/acpi.py.
- `request_shutdown(machine)`: a guest with ACPI (every guest gets the tables unless its command line
  says `acpi=off`) gets the ACPI power button: the GED's power-down event and interrupt (ACPI 6.5 §5.6.9;
  the hardware-reduced FADT has no fixed power button, §4.8.2.2.1). Otherwise Ctrl-Alt-Del through the
  i8042, as Firecracker's SendCtrlAltDel (devices/i8042.py). Returns the method used
  ("acpi-power-button" or "ctrl-alt-del"), or "" when nothing could be delivered (a machine without
  those devices, a full keyboard buffer). Safe from any thread.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attach_ged", "request_shutdown"]


def attach_ged(machine: Any) -> None:
    from bulkhead.devices.ged import GED_BASE, GED_IRQ, GED_LEN, Ged

    machine.ged = Ged(machine.irq_line(GED_IRQ))
    machine.mmio.register(GED_BASE, GED_LEN, machine.ged, "acpi-ged")


def request_shutdown(machine: Any) -> str:
    ged = getattr(machine, "ged", None)
    cmdline = str(getattr(getattr(machine, "config", None), "cmdline", ""))
    if ged is not None and "acpi=off" not in cmdline.split():
        ged.power_button()
        machine.record("shutdown-requested", method="acpi-power-button")
        return "acpi-power-button"
    dev = getattr(machine, "i8042", None)
    if dev is not None and dev.trigger_ctrl_alt_del():
        machine.record("shutdown-requested", method="ctrl-alt-del")
        return "ctrl-alt-del"
    return ""
