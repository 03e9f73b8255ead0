"""atheris harness for the snapshot file (bulkhead.snapshot.format) and the state checks that run before
anything of a snapshot reaches KVM or a device (bulkhead.runtime.snapshot, devices' load_state).

Input byte 0 picks the target:
- 0: the rest as a whole snapshot file, read with the right host key: anything but SnapshotError
  escaping is a crash.
- 1: edits (position, xor byte) pairs applied to a genuine snapshot: an edited file that reads to the
  end (finish() passes) is a crash; so is any exception but SnapshotError.
- 2: the rest as a state document (JSON) through check_state (which checks the virtio transport documents
  of devices.virtio against the header's RAM layout: bulkhead.devices.virtio.state.check_doc),
  check_vcpus, check_vm and the serial and i8042 load_state: anything but SnapshotError/ValueError
  escaping is a crash. The seeds hold a genuine virtio-blk + virtio-rng pair and the hostile variants
  the schema must refuse (a ring outside RAM, a size that is not a power of two, a ready queue whose
  rings were never set, requests in flight).

Run: .venv/bin/python fuzz/fuzz_snapshot.py -max_total_time=60 /tmp/bh-fuzz/snapshot fuzz/corpus/snapshot
Regenerate the seeds: .venv/bin/python fuzz/fuzz_snapshot.py --write-seeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices import ged, i8042, serial
    from bulkhead.devices.ged import Ged
    from bulkhead.devices.i8042 import I8042Device
    from bulkhead.devices.serial import Serial
    from bulkhead.errors import SnapshotError
    from bulkhead.runtime.snapshot import check_vcpus, check_vm
    from bulkhead.snapshot.format import FORMAT, PAGE, SnapshotReader, check_state, key_id, write_snapshot

KEY = bytes(range(32))
HEADER = {"format": FORMAT, "bulkhead": "0.1.0", "snapshot_id": "a" * 32, "vm_id": "vm", "launch_digest": None,
          "host_key_id": key_id(KEY), "created": 1, "mem_bytes": 128 << 20, "cpus": 1}
RUNS = [(2, 1, b"\x01" * PAGE), (9, 2, b"\x02" * (2 * PAGE))]
STATE = {"config": {"drives": [], "nets": [], "rng": False}, "vcpus": [{}], "vm": {}, "devices": {"virtio": []}, "cpuid": {}, "memory": {"runs": [[2, 1], [9, 2]]}}
GENUINE = b"".join(write_snapshot(HEADER, STATE, RUNS, host_key=KEY, dek=b"\x05" * 32, key_nonce=b"\x06" * 12))


class _Irq:
    def trigger(self) -> None:
        pass


def _read(data: bytes) -> bool:
    r = SnapshotReader(data)
    state = check_state(r.open(KEY), r.header, page_frames=256)
    for _ in r.chunks(state["memory"]["runs"]):
        pass
    r.finish()
    return True


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    kind, rest = data[0] % 3, data[1:]
    if kind == 0:
        try:
            _read(rest)
        except SnapshotError:
            pass
    elif kind == 1:
        if len(rest) < 3:
            return
        bad = bytearray(GENUINE)
        for i in range(0, len(rest) - 2, 3):
            pos = int.from_bytes(rest[i : i + 2], "little") % len(bad)
            bad[pos] ^= rest[i + 2] or 1
        if bytes(bad) == GENUINE:
            return
        try:
            ok = _read(bytes(bad))
        except SnapshotError:
            return
        raise AssertionError(f"an edited snapshot was accepted: {ok}")
    else:
        try:
            doc = json.loads(rest)
        except (ValueError, RecursionError):
            return
        try:
            if isinstance(doc, dict):
                state = check_state(doc, {**HEADER, "cpus": len(doc.get("vcpus", [])) or 1}, page_frames=256)
                check_vcpus(state)
                check_vm(state["vm"])
                devices = state["devices"]
                serial.load_state(Serial(_Irq(), lambda b: None), devices.get("serial"))
                i8042.load_state(I8042Device(lambda: None), devices.get("i8042"))
                if "ged" in devices:
                    ged.load_state(Ged(_Irq()), devices["ged"])
        except (SnapshotError, ValueError):
            pass


def _virtio_doc(device_id: int, base: int) -> dict[str, object]:
    """A live transport's document (status DRIVER_OK, VERSION_1 negotiated, one ready queue of 16 at base)."""
    device = {"capacity": 128, "read_only": False} if device_id == 2 else {}
    queue = {"size": 16, "ready": True, "desc": base, "avail": base + 256, "used": base + 512, "next_avail": 7,
             "next_used": 7, "signalled_used": 7, "signalled_valid": True, "notified": True, "broken": False}
    return {"device_id": device_id, "status": 0x0F, "device_features_sel": 1, "driver_features_sel": 1,
            "driver_features": 1 << 32, "queue_sel": 0, "interrupt_status": 1, "config_generation": 0,
            "queues": [queue], "device": device}


def _virtio_seeds(base_doc: dict[str, object]) -> dict[str, dict[str, object]]:
    drive = {"path": "/d.img", "read_only": False, "drive_id": "", "rate": [0, 0]}
    good = {**base_doc, "config": {"drives": [drive], "nets": [], "rng": True},
            "devices": {**base_doc["devices"], "virtio": [_virtio_doc(2, 0x10000), _virtio_doc(4, 0x20000)]}}  # type: ignore[dict-item]
    check_state(json.loads(json.dumps(good)), HEADER, page_frames=256)  # the genuine seed passes
    seeds = {"virtio": good}
    for name, change in (("outside-ram", {"used": 200 << 20}), ("size", {"size": 24}),
                         ("unset-rings", {"desc": 0, "avail": 0, "used": 0}), ("in-flight", {"next_avail": 9})):
        bad = json.loads(json.dumps(good))
        bad["devices"]["virtio"][0]["queues"][0].update(change)
        try:
            check_state(bad, HEADER, page_frames=256)
        except SnapshotError:
            seeds[f"virtio-{name}"] = bad
        else:
            raise AssertionError(f"the hostile seed {name} passed check_state")
    return seeds


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "genuine").write_bytes(b"\x00" + GENUINE)
    (directory / "edit").write_bytes(b"\x01" + (100).to_bytes(2, "little") + b"\x01")
    doc = {**STATE, "devices": {"serial": serial.save_state(Serial(_Irq(), lambda b: None)),
                                "i8042": i8042.save_state(I8042Device(lambda: None)),
                                "ged": ged.save_state(Ged(_Irq())), "virtio": []}, "vm": {}, "cpuid": {"mcg_cap": 0, "entries": [[]]}}
    (directory / "state").write_bytes(b"\x02" + json.dumps(doc).encode())
    for name, seed in _virtio_seeds(doc).items():
        (directory / f"state-{name}").write_bytes(b"\x02" + json.dumps(seed).encode())


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "snapshot")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
