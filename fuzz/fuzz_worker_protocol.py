"""atheris harness for the host <-> worker protocol decoder (bulkhead.sandbox.protocol.decode).

Input: byte 0 bits 0-1 select the direction (0 WORKER_TO_HOST: what the host parses from a possibly
compromised worker; 1 HOST_TO_WORKER; 2 POOL_WORKER_TO_HOST, 3 POOL_HOST_TO_WORKER: a pool worker's first
message and its assignment, sandbox/zygote.py); the rest is one datagram. A crash is any exception other than
ProtocolError, or a decoded message that does not survive encode() -> decode() unchanged (so what
the host accepted is exactly a message it could have been sent).

Run: .venv/bin/python fuzz/fuzz_worker_protocol.py -max_total_time=60 /tmp/bh-fuzz/worker_protocol fuzz/corpus/worker_protocol
Regenerate the seeds: .venv/bin/python fuzz/fuzz_worker_protocol.py --write-seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.sandbox.protocol import (
        HOST_TO_WORKER,
        POOL_HOST_TO_WORKER,
        POOL_WORKER_TO_HOST,
        WORKER_TO_HOST,
        ProtocolError,
        decode,
        encode,
    )

DIRECTIONS = (WORKER_TO_HOST, HOST_TO_WORKER, POOL_WORKER_TO_HOST, POOL_HOST_TO_WORKER)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    allowed = DIRECTIONS[data[0] & 3]
    try:
        msg = decode(data[1:], allowed)
    except ProtocolError:
        return
    again = decode(encode(msg), allowed)
    if again != msg:
        raise AssertionError(f"round trip changed the message: {msg!r} -> {again!r}")


def write_seeds(directory: Path) -> None:
    """One valid datagram per message type (made with encode()), plus a few near misses."""
    from bulkhead.sandbox import protocol as p

    directory.mkdir(parents=True, exist_ok=True)
    examples = [
        p.Hello(version=1, uid=100000, gid=100000, pid=2, seccomp=True, probes=False),
        p.StatusReply(seq=1, state="running", uptime_ms=10),
        p.Console(data=b"hello\r\n"),
        p.Event(name="vm-started", fields={}),
        p.SecurityEvent(kind="guest-fault", detail="virtio-blk0: descriptor outside guest RAM"),
        p.Exit(kind="debug-exit", status=1, detail=""),
        p.ProbeResult(name="open-host-file", outcome="denied", detail="EACCES"),
        p.IntegrityRefused(path="/usr/lib/bulkhead/cli.py", detail="modified (sha256 0 != manifest 1)"),
        p.Stats(counters={"vcpu_exits:0": 41, "devices:virtio-blk0:fault.desc-chain-loop": 1}),
        p.Start(),
        p.Stop(),
        p.Status(seq=7),
        p.ConsoleIn(data=b"ls\n"),
        p.Probe(name="open-host-file", arg="/etc/shadow"),
        p.SaveState(seq=3),
        p.StateSaved(seq=3, ok=True, detail="state saved; the VM is paused"),
        p.PoolReady(pid=4242),
        p.Assign(spec='{"vm_id":"z0123456789ab"}'),
    ]
    for msg in examples:
        direction = next(i for i, table in enumerate(DIRECTIONS) if msg.TYPE in table)
        try:
            data = encode(msg)
        except ProtocolError:
            continue
        (directory / msg.TYPE).write_bytes(bytes([direction]) + data)
    (directory / "dup_key").write_bytes(b'\x01{"v":1,"v":1,"type":"start"}')
    (directory / "nan").write_bytes(b'\x00{"v":1,"type":"exit","kind":"x","status":NaN,"detail":""}')


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "worker_protocol")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
