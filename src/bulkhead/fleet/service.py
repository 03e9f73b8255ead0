"""`bulkhead fleet serve`: a controller that stands by, then leads and serves the fleet API (docs/FLEET.md).

Only the leader serves: when its Controller wins the election, it takes the state directory's lock
(serve.lock: a second guard, beside etcd's, that two controllers never write one audit log), opens the
FleetDaemon on it, serves HTTPS+mTLS (and the local socket) and writes serve.json, so clients find the
leader. When the leadership is lost the process stops serving and ends (status 3): it never acts on a
stale view. Its supervisor restarts it as a standby.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from bulkhead.errors import HostError
from bulkhead.fleet.controller import Controller

__all__ = ["run_controller"]


def run_controller(ctl: Controller, state_dir: Path, shared: Path, host: str, port: int) -> str:
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
        box["lock"] = lock_state_dir(state_dir)
        d = FleetDaemon.open(state_dir, FakeBackend(), net=DryNetworkService(HostConfig()))
        assert isinstance(d, FleetDaemon)
        d.code_integrity = code
        d.attach_fleet(ctl, shared)
        d.start()
        box["d"] = d
        for kind, action, detail in pending:
            d.fleet_event(kind, action, detail)
        serving = Serving(d, state_dir, host, port)
        box["serving"] = serving

        def announce(s: Serving) -> None:
            info = {"pid": os.getpid(), "host": s.host, "port": s.port, "socket": str(s.sd.socket),
                    "controller": ctl.ident}
            tmp = s.sd.serve_info.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, s.sd.serve_info)
            print(f"bulkhead fleet: {ctl.ident} leads; listening on https://{s.host}:{s.port}", flush=True)

        th = threading.Thread(target=serving.run, kwargs={"install_signals": False, "on_started": announce},
                              name="fleet-api", daemon=True)
        th.start()
        box["thread"] = th

    print(f"bulkhead fleet: {ctl.ident} standing by", flush=True)
    try:
        why = ctl.run(on_lead=lead)
    finally:
        serving = box.get("serving")
        if serving is not None:
            serving.stop()
            box["thread"].join(15)
        d = box.get("d")
        if d is not None:
            d.close()
        if box.get("lock") is not None:
            os.close(box["lock"])
    print(f"bulkhead fleet: {ctl.ident} {why}", flush=True)
    return why
