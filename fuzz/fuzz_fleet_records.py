"""atheris harness for what the fleet controller reads from etcd (docs/FLEET.md "Keys"): any bytes as a
record value (fleet.model.decode: malformed = absent), host ids (valid_host_id), and the controller's
host views and placement built from such records (Controller.hosts + model.place). A crash is any
exception other than ConfigError from valid_host_id, or a placement on a host that is not ready.

Run: .venv/bin/python fuzz/fuzz_fleet_records.py -max_total_time=60 /tmp/bh-fuzz/fleet fuzz/corpus/fleet_records
Regenerate the seeds: .venv/bin/python fuzz/fuzz_fleet_records.py --write-seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.errors import ConfigError
    from bulkhead.fleet.controller import Controller, Snapshot
    from bulkhead.fleet.model import VmDemand, decode, host_state, place, valid_host_id
    from bulkhead.fleet.store import Kv

NOW = 1_000_000.0
KINDS = ("hosts", "attest", "drain", "known")


def TestOneInput(data: bytes) -> None:
    parts = data.split(b"\x00")
    try:
        valid_host_id(parts[0].decode("utf-8", errors="replace"))
    except ConfigError:
        pass
    snap = Snapshot(1)
    for i, p in enumerate(parts[1:12]):
        rec = decode(p)
        assert rec is None or isinstance(rec, dict)
        kind = KINDS[i % len(KINDS)]
        snap.raw.setdefault(kind, {})[f"h{i % 3}"] = Kv(f"/bulkhead/{kind}/h{i % 3}", p.decode("utf-8", "replace"),
                                                       1, 1, 0)
    ctl = Controller.__new__(Controller)
    views = ctl.hosts(snap)  # a host's malformed registration must not stall the controller
    plan = place([VmDemand(f"v{i}", "t", 64, 1) for i in range(4)], views, {}, now=NOW, max_age=15.0)
    ready = {h.name for h in views if host_state(h, NOW, 15.0) == "ready"}
    assert set(plan.assigned.values()) <= ready


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ok").write_bytes(b"h1\x00" + b'{"mem_mib":1024,"vcpus":4,"slots":4}' + b"\x00"
                                   + b'{"trusted":true,"at":1000000.0,"reasons":[]}')
    (directory / "junk").write_bytes(b"\x00{\x00[]\x00null\x00\xff")


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "fleet_records")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
