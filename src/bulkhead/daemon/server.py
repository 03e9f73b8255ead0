"""Serving: uvicorn over HTTPS with mutual TLS (TLS 1.3 only, client certificate REQUIRED and chained
to the bulkhead CA) and over a local Unix socket (0600, peers checked with SO_PEERCRED: root only).

Each connection's protocol object records who the peer is (the DER client certificate, or the local
uid) and wraps the app so every request of that connection carries it (`bulkhead.peer`); the Gate in
app.py turns it into a principal. Raises HostError when the sockets or the TLS material are unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from bulkhead.daemon.app import build_app, inject_peer
from bulkhead.daemon.daemon import Daemon, StateDir
from bulkhead.errors import HostError

__all__ = ["ALLOWED_LOCAL_UIDS", "Serving", "guard_forks", "make_server_ssl", "serve"]

ALLOWED_LOCAL_UIDS = {0}


def make_server_ssl(sd: StateDir, optional: bool = False) -> ssl.SSLContext:
    """TLS 1.3 minimum, client certificate required, verified against the bulkhead CA only. `optional`:
    the web console's listener (docs/UI.md), where a browser may come without a certificate and log in
    with a login link; a certificate it presents is still verified against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(sd.server_cert), str(sd.server_key))
        ctx.load_verify_locations(cafile=str(sd.ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise HostError(f"cannot load the TLS material in {sd.root}: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


IDLE_CLOSE_GRACE_S = 0.5  # at shutdown: how long an idle TLS connection may take to exchange close_notify
GRACEFUL_SHUTDOWN_S = 3.0  # at shutdown: requests in flight may run this long, then are cancelled (docs/API.md)


def _tls_peer(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return {"kind": "tls", "der": der} if der else None


def _local_peer(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    sock = transport.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    except (OSError, AttributeError):
        return None
    if uid not in ALLOWED_LOCAL_UIDS:
        return None
    return {"kind": "local", "uid": uid, "pid": pid}


class _PeerWsProtocol(WebSocketsSansIOProtocol):
    """The console WebSocket (consoleapi.py): the upgraded connection keeps its peer, as the HTTP
    protocols below do for requests. Subclasses name how the peer is found."""

    peer_of = staticmethod(_tls_peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = self.peer_of(transport)
        if peer is None:  # no certificate (cannot happen with CERT_REQUIRED) or not root: refuse
            transport.close()
            return
        self.app = inject_peer(self.app, peer)


class TlsWsProtocol(_PeerWsProtocol):
    peer_of = staticmethod(_tls_peer)


def _ui_peer(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """The console listener's peer: the certificate if one was presented, else an anonymous peer that
    the Gate refuses (401) unless uiauth.UiFront replaced it with a login session's peer under /ui."""
    return _tls_peer(transport) or {"kind": "anonymous"}


class UiWsProtocol(_PeerWsProtocol):
    peer_of = staticmethod(_ui_peer)


class UnixWsProtocol(_PeerWsProtocol):
    peer_of = staticmethod(_local_peer)


class TlsProtocol(H11Protocol):
    def shutdown(self) -> None:
        """Graceful shutdown of one connection (uvicorn calls it on SIGTERM). An idle keep-alive connection
        is closed at once, but asyncio's SSL transport then waits up to 30 s (ssl_shutdown_timeout) for the
        peer's close_notify, and uvicorn waits for the connection to be gone: a single idle client held
        the daemon's exit ~30 s (issue 12). The transport is aborted if it is not closed within
        IDLE_CLOSE_GRACE_S (RFC 8446 §6.1 lets a side close without waiting for the peer's close_notify)."""
        super().shutdown()
        transport, loop = self.transport, asyncio.get_running_loop()

        def cut() -> None:
            if transport.is_closing() or self.cycle is None or self.cycle.response_complete:
                transport.abort()
            else:  # a request still in flight drains (bounded by GRACEFUL_SHUTDOWN_S)
                loop.call_later(0.1, cut)

        loop.call_later(IDLE_CLOSE_GRACE_S, cut)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = _tls_peer(transport)
        if peer is None:  # cannot happen with CERT_REQUIRED; refuse anyway
            transport.close()
            return
        self.app = inject_peer(self.app, peer)


class UiProtocol(TlsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        H11Protocol.connection_made(self, transport)
        self.app = inject_peer(self.app, _ui_peer(transport))


class UnixProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = _local_peer(transport)
        if peer is None:  # not root (ALLOWED_LOCAL_UIDS), or no credentials
            transport.close()
            return
        self.app = inject_peer(self.app, peer)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the Serving object handles signals for both servers
        yield


def _unix_socket(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        raise HostError(f"cannot bind the local socket {path}: {exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # inherited by accepted sockets: without it a response written as two TLS records waits for the
        # client's delayed ACK (Nagle), ~40 ms per request (measured: 44 ms -> 0.9 ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise HostError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_fork_guard_installed = False


def _before_fork() -> None:
    # the forking thread blocks the stop signals, so the child starts with them blocked: none can reach
    # the inherited handlers before _after_fork_in_child has reset them (the parent's other threads still
    # take a SIGTERM meant for the daemon)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _after_fork_in_parent() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _after_fork_in_child() -> None:
    """A forked child must not reach the daemon's signal handling: the asyncio loop's wakeup fd (the write
    end of the loop's self-pipe, set by loop.add_signal_handler -> signal.set_wakeup_fd) is detached and
    closed, and SIGTERM/SIGINT go back to their default action, so a signal sent to the child acts on the
    child only (issue 12: a SIGTERM to pyroute2's forked helper stopped the daemon)."""
    try:
        with contextlib.suppress(ValueError, OSError):
            fd = signal.set_wakeup_fd(-1)
            if fd >= 0:
                os.close(fd)
        for sig in _STOP_SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
    finally:  # never leave a child (or what it execs) with the stop signals blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def guard_forks() -> None:
    """Install (once per process) the fork hooks above (os.register_at_fork: they run for os.fork and for
    subprocess with preexec_fn; subprocess's plain fork+exec resets handlers itself and execs at once)."""
    global _fork_guard_installed
    if not _fork_guard_installed:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _fork_guard_installed = True


class Serving:
    """Both listeners over one Daemon. `run()` blocks until `stop()` or SIGTERM/SIGINT."""

    def __init__(self, daemon: Daemon, state_dir: Path, host: str = "127.0.0.1", port: int = 8443,
                 unix: bool = True, ui_port: int | None = None) -> None:
        self.daemon = daemon
        self.sd = StateDir(state_dir)
        self.ssl = make_server_ssl(self.sd)
        self.tcp = _tcp_socket(host, port)
        self.host = host
        self.port = int(self.tcp.getsockname()[1])
        self.unix = _unix_socket(self.sd.socket) if unix else None
        app = build_app(daemon)
        common: dict[str, Any] = {"lifespan": "off", "log_level": "warning", "access_log": False,
                                  "timeout_keep_alive": 30, "h11_max_incomplete_event_size": 16384,
                                  "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
                                  "server_header": False, "ws_max_size": 64 * 1024, "ws_ping_interval": 20.0,
                                  "ws_per_message_deflate": False}  # no compression: no inflate bombs
        self.tls_server = _Server(uvicorn.Config(app, http=TlsProtocol, ws=TlsWsProtocol,
                                                 ssl_context_factory=lambda c, f: self.ssl, **common))
        self.unix_server = (_Server(uvicorn.Config(app, http=UnixProtocol, ws=UnixWsProtocol, **common))
                            if self.unix else None)
        self.ui_tcp = _tcp_socket(host, ui_port) if ui_port is not None else None  # the web console (docs/UI.md)
        self.ui_port = int(self.ui_tcp.getsockname()[1]) if self.ui_tcp is not None else None
        ui_ssl = make_server_ssl(self.sd, optional=True)
        self.ui_server = (_Server(uvicorn.Config(app, http=UiProtocol, ws=UiWsProtocol,
                                                 ssl_context_factory=lambda c, f: ui_ssl, **common))
                          if self.ui_tcp is not None else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()

    async def _main(self, install_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        if install_signals:
            guard_forks()
            for sig in _STOP_SIGNALS:
                self._loop.add_signal_handler(sig, self.stop)
        tasks = [asyncio.create_task(self.tls_server.serve(sockets=[self.tcp]))]
        if self.unix_server is not None and self.unix is not None:
            tasks.append(asyncio.create_task(self.unix_server.serve(sockets=[self.unix])))
        if self.ui_server is not None and self.ui_tcp is not None:
            tasks.append(asyncio.create_task(self.ui_server.serve(sockets=[self.ui_tcp])))
        while not all(s.started for s in self._servers()):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        self.started.set()
        from bulkhead.daemon.sdnotify import watchdog_interval

        interval = watchdog_interval()
        pinger = asyncio.create_task(self._watchdog(interval)) if interval else None
        try:
            await asyncio.gather(*tasks)
        finally:
            if pinger is not None:
                pinger.cancel()

    async def _watchdog(self, interval: float) -> None:
        """systemd WatchdogSec=: WATCHDOG=1 from the serving event loop itself, so a loop that hangs stops
        the pings and systemd restarts the daemon (sd_watchdog_enabled(3): ping at half the period)."""
        from bulkhead.daemon.sdnotify import notify

        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _servers(self) -> list[_Server]:
        return [s for s in (self.tls_server, self.unix_server, self.ui_server) if s is not None]

    def stop(self) -> None:
        from bulkhead.daemon.logsetup import lifecycle
        from bulkhead.daemon.sdnotify import notify

        if not any(s.should_exit for s in self._servers()):
            notify("STOPPING=1", "STATUS=stopping")  # systemd: the stop has begun (sd_notify(3))
            lifecycle("daemon.stopping", pid=os.getpid())
        for s in self._servers():
            s.should_exit = True

    def run(self, install_signals: bool = True, on_started: Callable[[Serving], None] | None = None) -> None:
        if on_started is not None:
            threading.Thread(target=lambda: (self.started.wait(), on_started(self)), daemon=True).start()
        try:
            asyncio.run(self._main(install_signals))
        finally:
            if self.unix is not None:
                with contextlib.suppress(OSError):
                    self.sd.socket.unlink()


LOCK_NAME = "serve.lock"


def lock_state_dir(state_dir: Path) -> int | None:
    """Hold the state directory for this daemon's life: an exclusive flock(2) on `<state>/serve.lock`
    (close-on-exec, so no worker or helper inherits it; released by the kernel whatever way the daemon
    ends), with our pid written in it. Returns the fd to keep open, or None when the directory does not
    exist (Daemon.open then reports it). Raises HostError naming the holder's pid when another daemon
    holds it, before anything in the directory is touched (serve.json, the socket, the audit log)."""
    if not state_dir.is_dir():
        return None
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise HostError(f"cannot open the state directory lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise HostError(f"the state directory {state_dir} is in use by another bulkheadd (pid {holder}, "
                        f"holding {path}); stop it first or use another --state-dir") from None
    except OSError as exc:
        os.close(fd)
        raise HostError(f"cannot lock {path}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def serve(state_dir: Path, host: str, port: int, backend: Any = None, engine: str = "casbin",
          integrity: Any = None, config: dict[str, Any] | None = None, net: Any = None,
          witnesses: Any = None, ui_port: int | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. First the state directory is locked (lock_state_dir: a second
    daemon on it is refused with HostError naming the holder). Then the code check
    (require_integrity("daemon")): on a difference the refusal is audited and HostError (naming the file) is raised, nothing is served.
    Then the integrity gate (`integrity`: bulkhead.daemon.integrity.IntegrityOptions) is started:
    manifest and `config` digests measured, attested; without a TPM the host is untrusted."""
    lock = lock_state_dir(state_dir)
    try:
        return _serve_locked(state_dir, host, port, backend, engine, integrity, config, net, witnesses, ui_port)
    finally:
        if lock is not None:
            os.close(lock)


def _serve_locked(state_dir: Path, host: str, port: int, backend: Any, engine: str, integrity: Any,
                  config: dict[str, Any] | None, net: Any, witnesses: Any = None,
                  ui_port: int | None = None) -> int:
    from bulkhead.daemon.integrity import IntegrityOptions, check_code, start_host_integrity

    code, failure = check_code("daemon")
    daemon = Daemon.open(state_dir, backend, engine, net=net, witnesses=witnesses)  # witnesses: docs/AUDIT.md
    if failure is not None:
        try:
            daemon.event("security", "security/integrity/code-mismatch", result="refused",
                         detail={"reason": str(failure), "path": failure.path or None})
        finally:
            daemon.close()
        raise HostError(str(failure))
    daemon.code_integrity = code
    try:
        start_host_integrity(daemon, state_dir, integrity or IntegrityOptions(), config or {})
        daemon.start()
        daemon.start_monitor()
        serving = Serving(daemon, state_dir, host, port, ui_port=ui_port)

        def announce(s: Serving) -> None:
            info = {"pid": os.getpid(), "host": s.host, "port": s.port, "socket": str(s.sd.socket),
                    "ui_port": s.ui_port}
            tmp = s.sd.serve_info.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, s.sd.serve_info)
            print(f"bulkheadd listening on https://{s.host}:{s.port} and {s.sd.socket}", flush=True)
            from bulkhead.daemon.logsetup import lifecycle
            from bulkhead.daemon.sdnotify import notify

            lifecycle("daemon.ready", pid=os.getpid(), listen=f"https://{s.host}:{s.port}", socket=str(s.sd.socket))
            notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=listening on https://{s.host}:{s.port}")

        serving.run(on_started=announce)
    finally:
        daemon.close()
        from bulkhead.daemon.logsetup import lifecycle

        lifecycle("daemon.stopped", pid=os.getpid())
    return 0
