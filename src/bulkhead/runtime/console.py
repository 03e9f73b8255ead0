"""The console sink: where a VM's serial (COM1) output goes. One implementation for every path.

`bulkhead run` unjailed (runtime/vm.py attach_serial), `bulkhead run` jailed (sandbox/supervisor.py
run_jailed: the worker sends Console messages, the host writes them here) and the daemon's jailed backend
(sandbox/backend.py: <console root>/<vm id>/console.log) all write through ConsoleSink, so a console file
is opened the same way whoever runs the VM: write-only, append, close-on-exec, and created 0600 (owner
only, whatever the umask: a guest's console can carry secrets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from bulkhead.errors import ConfigError

__all__ = ["CONSOLE_MODE", "ConsoleSink", "forward_stdin", "open_serial"]

CONSOLE_MODE = 0o600


class ConsoleSink:
    """`target` is "stdio" (this process's standard output), "none" (dropped) or a file path.

    write(data) writes all of data; close() closes a file the sink opened (idempotent). Opening a file
    raises OSError; `open_serial` turns that into the ConfigError a user sees for --serial.
    """

    def __init__(self, target: str, *, truncate: bool = False) -> None:
        self.target = target
        self.fd: int | None = None  # a file this sink opened (and closes)
        self._out: int | None = None
        self._stream: Any = None
        if target == "none":
            return
        if target == "stdio":
            try:
                self._out = sys.stdout.fileno()
            except (AttributeError, ValueError, OSError):  # stdout replaced (tests): write through it
                self._stream = getattr(sys.stdout, "buffer", None)
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        self.fd = self._out = os.open(target, flags, CONSOLE_MODE)
        if truncate:  # a file the caller owns and starts afresh: 0600 even if an older copy was wider
            os.fchmod(self.fd, CONSOLE_MODE)

    def write(self, data: bytes) -> None:
        if self._out is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._out, view) :]
        elif self._stream is not None:
            self._stream.write(data)
            self._stream.flush()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            self._out = None
            os.close(fd)


def open_serial(target: str) -> ConsoleSink:
    """The sink for `--serial TARGET`. Raises ConfigError naming the flag and the reason."""
    try:
        return ConsoleSink(target)
    except OSError as exc:
        raise ConfigError(f"--serial {target}: {exc.strerror}") from None


def forward_stdin(loop: Any, deliver: Callable[[bytes], None]) -> None:
    """Host stdin -> `deliver` (the guest serial's input queue), read on the I/O thread `loop` (unjailed
    `bulkhead run`; the jailed path forwards over the worker protocol). Nothing happens for a stdin that
    cannot be polled (a regular file, /dev/null)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return

    def on_input() -> None:
        try:
            data = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            loop.remove_reader(fd)
            return
        deliver(data)

    try:
        loop.add_reader(fd, on_input)
    except (PermissionError, OSError):
        pass  # a regular file or /dev/null on stdin: nothing to forward
