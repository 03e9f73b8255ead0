"""The host side of virtio-vsock: Firecracker's unix-socket muxer (`devices/virtio/vsock/unix/muxer.rs`).

One listening unix socket per VM at PATH. A host program connects to it and writes `CONNECT <port>\\n`;
the device asks the guest (REQUEST to that port) and, once the guest accepts, the muxer writes
`OK <host_port>\\n` and the stream carries bytes both ways. A guest connecting to port P reaches the
host program listening on the unix socket `<PATH>_<P>`.

All host sockets live in one epoll set of this muxer; the VM's I/O loop watches only the epoll fd
(`fileno()`), as Firecracker nests its muxer's epoll fd. Stream sockets are edge-triggered; the device
remembers readability until a recv finds nothing. In the jail (sandbox/supervisor.py) the supervisor
binds the listening socket and passes its fd; guest-initiated connects go through the read-only bind
of PATH's directory at /vm/vsock, so the worker sees nothing else of the host's filesystem.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import time
from collections.abc import Sequence

from bulkhead.devices.virtio.vsock import MAX_CONNECT_LINE, parse_connect_line
from bulkhead.devices.virtio.vsock_device import VsockStream
from bulkhead.errors import ConfigError

__all__ = ["MAX_PENDING", "UnixMuxer", "UnixStream", "bind_listener"]

MAX_PENDING = 16  # accepted host streams still writing their CONNECT line
CONNECT_LINE_TIMEOUT_S = 5.0  # a full pending table drops streams that have not sent their line by then
_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


class UnixStream:
    """A non-blocking unix stream socket as `vsock_device.VsockStream`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # used with MSG_DONTWAIT: no setblocking (an ioctl the jail's seccomp refuses)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes | None:
        try:
            return self.sock.recv(n, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def bind_listener(path: str) -> socket.socket:
    """Create, bind and listen on the VM's unix socket. Raises ConfigError if PATH exists or is unusable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        kind = "a socket" if stat.S_ISSOCK(st.st_mode) else "a file"
        raise ConfigError(f"--vsock {path}: {kind} already exists there (remove it first)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        s.listen(MAX_PENDING)
    except OSError as exc:
        s.close()
        raise ConfigError(f"--vsock {path}: cannot listen there: {exc.strerror}") from None
    return s


class UnixMuxer:
    """`vsock_device.VsockBackend` over unix sockets. `listener`: the VM's listening socket; guest-initiated
    streams to port P connect to `<connect_prefix>_<P>`. `unlink`: a path to remove at close()."""

    def __init__(self, listener: socket.socket, connect_prefix: str, *, unlink: str | None = None) -> None:
        self.listener = listener  # non-blocking (SOCK_NONBLOCK at bind_listener)
        self.prefix = connect_prefix
        self.unlink = unlink
        self.epoll = select.epoll()
        self.epoll.register(listener.fileno(), select.EPOLLIN | select.EPOLLET)
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}
        self.pending_since: dict[int, float] = {}
        self.watched: set[int] = set()

    @classmethod
    def open(cls, path: str, guest_prefix: str | None = None) -> UnixMuxer:
        """Listen at PATH (unjailed runs). Raises ConfigError."""
        return cls(bind_listener(path), guest_prefix or path, unlink=path)

    @classmethod
    def adopt(cls, fd: int, connect_prefix: str) -> UnixMuxer:
        """The listening socket the supervisor bound and passed in."""
        kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # given, so CPython asks the kernel nothing
        return cls(socket.socket(socket.AF_UNIX, kind, 0, fileno=fd), connect_prefix)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def poll(self) -> tuple[Sequence[tuple[VsockStream, int]], list[int], list[int]]:
        accepted: list[tuple[VsockStream, int]] = []
        readable: list[int] = []
        writable: list[int] = []
        for fd, ev in self.epoll.poll(0):
            if fd == self.listener.fileno():
                self._accept_all(accepted)
            elif fd in self.pending:
                got = self._read_line(fd)
                if got is not None:
                    accepted.append(got)
            else:
                if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    readable.append(fd)
                if ev & select.EPOLLOUT:
                    writable.append(fd)
        return accepted, readable, writable

    def _accept_all(self, accepted: list[tuple[VsockStream, int]]) -> None:
        while True:
            try:
                s, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the host's problem, the stream is not accepted
            if len(self.pending) >= MAX_PENDING:  # host clients that never write their line cannot hold it
                stale = time.monotonic() - CONNECT_LINE_TIMEOUT_S
                for old in [fd for fd, t in self.pending_since.items() if t < stale]:
                    self._drop_pending(old)
            if len(self.pending) >= MAX_PENDING:
                s.close()
                continue
            self.pending[s.fileno()] = (s, bytearray())
            self.pending_since[s.fileno()] = time.monotonic()
            self.epoll.register(s.fileno(), _IN)
            got = self._read_line(s.fileno())  # the line may already be there
            if got is not None:
                accepted.append(got)

    def _read_line(self, fd: int) -> tuple[UnixStream, int] | None:
        """Read the CONNECT line one byte at a time (nothing after it is consumed). A malformed or
        overlong line, or EOF, closes the stream."""
        s, buf = self.pending[fd]
        while not buf.endswith(b"\n") and len(buf) < MAX_CONNECT_LINE:
            try:
                b = s.recv(1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError:
                b = b""
            if not b:
                self._drop_pending(fd)
                return None
            buf += b
        port = parse_connect_line(bytes(buf))
        if port is None:
            self._drop_pending(fd)
            return None
        del self.pending[fd]
        self.pending_since.pop(fd, None)
        self.epoll.unregister(fd)
        return UnixStream(s), port

    def _drop_pending(self, fd: int) -> None:
        s, _ = self.pending.pop(fd)
        self.pending_since.pop(fd, None)
        self.epoll.unregister(fd)
        s.close()

    def connect(self, port: int) -> UnixStream | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            s.connect(f"{self.prefix}_{port}")
        except OSError as exc:
            s.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.EACCES, errno.ENOTDIR):
                return None
            raise
        return UnixStream(s)

    def watch(self, stream: VsockStream, *, write: bool) -> None:
        fd = stream.fileno()
        mask = _IN | (select.EPOLLOUT if write else 0)
        if fd in self.watched:
            self.epoll.modify(fd, mask)
        else:
            self.epoll.register(fd, mask)
            self.watched.add(fd)

    def forget(self, stream: VsockStream) -> None:
        fd = stream.fileno()
        if fd in self.watched:
            self.watched.discard(fd)
            self.epoll.unregister(fd)
        stream.close()

    def close(self) -> None:
        for s, _ in self.pending.values():
            s.close()
        self.pending_since.clear()
        self.pending.clear()
        self.epoll.close()
        self.listener.close()
        if self.unlink:
            try:
                os.unlink(self.unlink)
            except OSError:
                pass

