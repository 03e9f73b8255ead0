"""`bulkhead fleet serve`: a controller that stands by, then leads and serves the fleet API (docs/FLEET.md).

Only the leader serves: when its Controller wins the election, it takes the state directory's lock
(serve.lock: a second guard, beside etcd's, that two controllers never write one audit log), opens the
FleetDaemon on it, serves HTTPS+mTLS (and the local socket) and writes serve.json, so clients find the
leader. When the leadership is lost (a renewal failed past TTL - margin, or a guarded write found the
leader key no longer its own) it stops serving and acting at once, closes its daemon, releases the lock
and stands by again (rule F4): it never acts on a stale view, and it can lead again later.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from bulkhead.errors import HostError
from bulkhead.fleet.controller import Controller

__all__ = ["run_controller"]


def run_controller(ctl: Controller, state_dir: Path, shared: Path, host: str, port: int,
                   ui_port: int | None = None) -> str:
    from bulkhead.daemon.backend import FakeBackend
    from bulkhead.daemon.integrity import check_code
    from bulkhead.daemon.networks import DryNetworkService
    from bulkhead.daemon.server import Serving, lock_state_dir
    from bulkhead.fleet.api import FleetDaemon
    from bulkhead.network.state import HostConfig

    pending: list[tuple[str, str, dict[str, Any]]] = []
    box: dict[str, Any] = {}
    ctl.emit = lambda kind, action, detail: (box["d"].fleet_event(kind, action, detail) if "d" in box
                                             else pending.append((kind, action, detail)))

    def lead() -> None:
        code, failure = check_code("daemon")
        if failure is not None:
            raise HostError(str(failure))
        deadline = time.monotonic() + max(5.0, ctl.t.ttl * 2)
        while True:  # a deposed predecessor on this state dir may still be closing its daemon
            try:
                box["lock"] = lock_state_dir(state_dir)
                break
            except HostError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        d = FleetDaemon.open(state_dir, FakeBackend(), net=DryNetworkService(HostConfig()))
        assert isinstance(d, FleetDaemon)
        d.code_integrity = code
        d.attach_fleet(ctl, shared)
        d.start()
        box["d"] = d
        for kind, action, detail in pending:
            d.fleet_event(kind, action, detail)
        pending.clear()
        serving = Serving(d, state_dir, host, port, ui_port=ui_port)  # ui_port: the web console (docs/UI.md)
        box["serving"] = serving

        def announce(s: Serving) -> None:
            info = {"pid": os.getpid(), "host": s.host, "port": s.port, "socket": str(s.sd.socket),
                    "controller": ctl.ident, "ui_port": s.ui_port}
            tmp = s.sd.serve_info.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, s.sd.serve_info)
            print(f"bulkhead fleet: {ctl.ident} leads; listening on https://{s.host}:{s.port}", flush=True)

        th = threading.Thread(target=serving.run, kwargs={"install_signals": False, "on_started": announce},
                              name="fleet-api", daemon=True)
        th.start()
        box["thread"] = th

    why = "stopped"
    while True:
        print(f"bulkhead fleet: {ctl.ident} standing by", flush=True)
        try:
            why = ctl.run(on_lead=lead)
        finally:
            _stop_serving(box)
        print(f"bulkhead fleet: {ctl.ident} {why}", flush=True)
        if why != "deposed":
            return why


def _stop_serving(box: dict[str, Any]) -> None:
    """Stop the API, close the daemon and release the state dir's lock (events queue until the next lead)."""
    serving = box.pop("serving", None)
    if serving is not None:
        serving.stop()
        box.pop("thread").join(15)
    d = box.pop("d", None)
    if d is not None:
        d.close()
    lock = box.pop("lock", None)
    if lock is not None:
        os.close(lock)
