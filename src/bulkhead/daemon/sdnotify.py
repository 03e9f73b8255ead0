"""sd_notify(3) without libsystemd: the service-manager readiness protocol (systemd.service Type=notify).

The protocol (sd_notify(3), "Notes"): send one datagram of newline-separated `KEY=VALUE` assignments to
the AF_UNIX socket named by $NOTIFY_SOCKET; a name starting with "@" is in the abstract namespace
(leading NUL). bulkheadd sends READY=1 (with MAINPID and STATUS) once both listeners accept connections,
and STOPPING=1 when it begins to shut down. Without $NOTIFY_SOCKET (not under systemd) it does nothing.
No library: the maintained ones need libsystemd and a compiler (systemd-python, cysystemd) and the pure
one (sdnotify) has had no release since 2017; the protocol is these lines.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def notify(*assignments: str, env: dict[str, str] | None = None) -> bool:
    """Send `assignments` ("READY=1", ...) to the service manager. True when a datagram was sent; False when
    there is no $NOTIFY_SOCKET or it cannot be reached (the daemon runs on: readiness is best effort)."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr or not assignments or not (addr.startswith("/") or addr.startswith("@")):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(payload, addr)
    except OSError:
        return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when systemd's watchdog is off or
    meant for another process ($WATCHDOG_PID names another pid); sd_watchdog_enabled(3)."""
    e = env if env is not None else os.environ
    try:
        usec = int(e.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = e.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
