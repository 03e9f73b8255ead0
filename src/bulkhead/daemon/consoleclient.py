"""`bulkhead vm console NAME`: the client side of the console WebSocket (daemon/consoleapi.py).

Read-write by default, with a detach key like virsh's (Ctrl-], byte 0x1d): the terminal is put in raw
mode, every key goes to the guest, Ctrl-] ends the session. `--follow` attaches read-only (Ctrl-C ends it).
The connection is the same as every other command's (client.py): mTLS with the client certificate, or the
local root socket. A refusal (close code 4000 + HTTP status, with the reason) raises ClientError, so the
CLI prints `bulkhead: refused (409): ...` and exits 1, as for any other refused request.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

from bulkhead.daemon.client import ClientError, Endpoint, client_ssl
from bulkhead.errors import HostError

__all__ = ["DETACH_KEY", "attach"]

DETACH_KEY = 0x1D  # Ctrl-]
MAX_FRAME = 16 * 1024


def _connect(ep: Endpoint, path: str) -> Any:
    from websockets.exceptions import InvalidHandshake, InvalidURI
    from websockets.sync.client import connect, unix_connect

    opts: dict[str, Any] = {"compression": None, "max_size": 1 << 20, "open_timeout": 15, "close_timeout": 2}
    try:
        if ep.socket:
            cm = unix_connect(ep.socket, "ws://bulkheadd" + path, **opts)
        else:
            assert ep.ca and ep.cert and ep.key
            split = urlsplit(ep.url)
            cm = connect(f"wss://{split.netloc}{path}", ssl=client_ssl(ep.ca, ep.cert, ep.key), proxy=None, **opts)
        return cm.__enter__()
    except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
        raise HostError(f"cannot reach the daemon's console at {ep.socket or ep.url}: {exc}") from None


def _closed(exc: Any) -> None:
    """Turn a refusal close (4000 + status) into ClientError; a normal close returns."""
    rcvd = getattr(exc, "rcvd", None)
    code = getattr(rcvd, "code", 1000) if rcvd is not None else 1006
    reason = getattr(rcvd, "reason", "") if rcvd is not None else ""
    if 4000 <= code < 5000:
        raise ClientError(code - 4000, reason or "the console was refused")
    if code not in (1000, 1001):
        raise HostError(f"the console connection ended abnormally (code {code}{': ' + reason if reason else ''})")


def attach(ep: Endpoint, vm_id: str, *, write: bool, offset: int | None = None, tail: int | None = None,
           stdin: BinaryIO | None = None, stdout: BinaryIO | None = None, label: str = "") -> int:
    """Attach to the VM's console until the detach key (read-write), end of input, or the VM stops.
    Returns 0. Raises ClientError (refused), HostError (daemon unreachable)."""
    from websockets.exceptions import ConnectionClosed

    params: dict[str, Any] = {"mode": "rw" if write else "ro"}
    if offset is not None:
        params["offset"] = offset
    if tail is not None:
        params["tail"] = tail
    out = stdout or sys.stdout.buffer
    inp = stdin or sys.stdin.buffer
    ws = _connect(ep, f"/v1/vms/{vm_id}/console/ws?{urlencode(params)}")
    try:
        try:
            first = ws.recv(timeout=15)
        except ConnectionClosed as exc:
            _closed(exc)
            return 0
        hello = json.loads(first) if isinstance(first, str) else {}
        if hello.get("type") != "attached":
            raise HostError("the daemon did not start a console session")
        how = "read-write, escape character is ^]" if write else "read-only, Ctrl-C to leave"
        print(f"Connected to the console of {label or vm_id} ({how})", file=sys.stderr, flush=True)
        done = threading.Event()
        status: list[BaseException] = []

        def receiver() -> None:
            try:
                for msg in ws:
                    if isinstance(msg, bytes):
                        out.write(msg)
                        out.flush()
                    else:
                        info = json.loads(msg)
                        if info.get("type") == "exit":
                            print(f"\r\n[the VM is {info.get('state')}]", file=sys.stderr, flush=True)
                        elif info.get("type") == "notice":
                            print(f"\r\n[{info.get('detail')}]", file=sys.stderr, flush=True)
            except ConnectionClosed as exc:
                try:
                    _closed(exc)
                except (ClientError, HostError) as err:
                    status.append(err)
            finally:
                done.set()

        t = threading.Thread(target=receiver, name="console-rx", daemon=True)
        t.start()
        if write:
            _send_input(ws, inp, done)
        else:
            with contextlib.suppress(KeyboardInterrupt):
                done.wait()
        with contextlib.suppress(Exception):
            ws.close()
        t.join(3)
        if status:
            raise status[0]
        print("\r\n[detached]" if not done.is_set() or write else "", file=sys.stderr, flush=True)
        return 0
    finally:
        with contextlib.suppress(Exception):
            ws.close()


def _send_input(ws: Any, inp: BinaryIO, done: threading.Event) -> None:
    """Keys -> guest until Ctrl-], end of input or the session's end. Raw mode on a terminal."""
    import select

    try:
        fd = inp.fileno()
    except (AttributeError, OSError, ValueError):  # no real input (io.UnsupportedOperation is an OSError)
        return
    restore = None
    if os.isatty(fd):
        import termios
        import tty

        restore = termios.tcgetattr(fd)
        tty.setraw(fd)
    try:
        while not done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, MAX_FRAME)
            if not data:
                return
            cut = data.find(DETACH_KEY)
            if cut >= 0:
                if cut:
                    ws.send(data[:cut])
                return
            ws.send(data)
    except Exception:  # noqa: S110 - the connection closed under us: the receiver reports why
        pass
    finally:
        if restore is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, restore)
