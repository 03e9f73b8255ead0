"""The host side of vsock (runtime/vsock.py, Firecracker's model: a host program connects to the VM's unix
socket and writes `CONNECT <port>\\n`). Attack: host clients that connect and never write their line must
not hold every pending slot for ever (a review finding)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from bulkhead.runtime import vsock
from bulkhead.runtime.vsock import MAX_PENDING, UnixMuxer, bind_listener


def _accepted(mux: UnixMuxer, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got, _, _ = mux.poll()
        if got:
            return [port for _, port in got]
        time.sleep(0.01)
    return []


def test_silent_host_clients_do_not_hold_the_pending_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "v.sock")
    mux = UnixMuxer.adopt(bind_listener(path).detach(), str(tmp_path / "v.sock"))
    silent = []
    try:
        for _ in range(MAX_PENDING):  # they connect and say nothing
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            silent.append(c)
        deadline = time.monotonic() + 5
        while len(mux.pending) < MAX_PENDING and time.monotonic() < deadline:
            mux.poll()
            time.sleep(0.01)
        assert len(mux.pending) == MAX_PENDING
        # within the timeout a full table refuses the next client...
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        c.sendall(b"CONNECT 52\n")
        assert _accepted(mux, 1.0) == []
        c.close()
        # ...past it, the silent ones are dropped and a client that speaks gets in
        monkeypatch.setattr(vsock, "CONNECT_LINE_TIMEOUT_S", 0.0)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        c.sendall(b"CONNECT 52\n")
        assert _accepted(mux) == [52]
        assert silent[0].recv(1) == b""  # the silent streams were closed
        c.close()
    finally:
        for s in silent:
            s.close()
        mux.close()
