"""The I/O thread: one blocking epoll wait, then dispatch (trio's get_events / process_events split).

Device work (virtio queue notifications via ioeventfds, tap RX, serial input, rate-limit timers) runs here,
never inside a vCPU exit handler. Handlers raising GuestFault are contained and reported.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

from bulkhead.errors import GuestFault

__all__ = ["EventFd", "EventLoop"]


class EventFd:
    """A non-blocking eventfd (for ioeventfd/irqfd wiring and for waking the loop)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:  # counter saturated: the consumer is already due to run
            pass

    def drain(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EventLoop:
    """fd -> callback dispatch on a dedicated thread."""

    def __init__(
        self, on_fault: Callable[[GuestFault], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._wake = EventFd()
        self._stop = False
        self._on_fault = on_fault
        self._on_error = on_error
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self._ep.register(self._wake.fd, select.EPOLLIN)

    def add_reader(self, fd: int, callback: Callable[[], None], *, edge: bool = False) -> None:
        """Call `callback` on the I/O thread when fd is readable (edge-triggered with edge=True)."""
        self._handlers[fd] = callback
        self._ep.register(fd, select.EPOLLIN | (select.EPOLLET if edge else 0))

    def remove_reader(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        with self._lock:
            self._timers.append((time.monotonic() + max(delay, 0.0), callback))
        self._wake.trigger()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="io", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.trigger()
        if self.thread is not None:
            self.thread.join(2.0)

    def close(self) -> None:
        self._ep.close()
        self._wake.close()

    # -- loop -------------------------------------------------------------------------------------

    def _next_timeout(self) -> float:
        with self._lock:
            if not self._timers:
                return -1
            return max(0.0, min(t for t, _ in self._timers) - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [cb for t, cb in self._timers if t <= now]
            self._timers = [(t, cb) for t, cb in self._timers if t > now]
        for cb in due:
            self._dispatch(cb)

    def _dispatch(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except GuestFault as exc:
            self._on_fault(exc)
        except Exception as exc:
            self._on_error(exc)

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._ep.poll(self._next_timeout())
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake.fd:
                    self._wake.drain()
                    continue
                cb = self._handlers.get(fd)
                if cb is not None:
                    self._dispatch(cb)
            self._run_timers()
