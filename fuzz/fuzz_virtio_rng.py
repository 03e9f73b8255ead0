"""atheris harness for virtio-rng request handling (bulkhead.devices.virtio.rng) via the transport.

Input: guest memory for the request queue from its descriptor table on (see fuzz_virtio_common).
A crash is any exception escaping the transport, or a hang.

Run: .venv/bin/python fuzz/fuzz_virtio_rng.py -runs=20000
With seeds: .venv/bin/python fuzz/fuzz_virtio_rng.py -runs=20000 /tmp/vrng-corpus fuzz/corpus/virtio_rng
Regenerate seeds: .venv/bin/python fuzz/fuzz_virtio_rng.py --make-seeds fuzz/corpus/virtio_rng
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from bulkhead.devices.virtio.rng import RngDevice

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_virtio_common import fresh_transport, load, main, make_seed


def _source(n: int) -> bytes:
    return b"\x5a" * n  # deterministic: keeps the fuzzer's runs reproducible


def run(data: bytes) -> None:
    t, _ = fresh_transport(RngDevice(source=_source))
    load(data, 0)
    t.notify(0)


def TestOneInput(data: bytes) -> None:
    run(data)


def make_seeds(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, build in {
        "two": lambda d: (d[0].add_chain(writable=[64]), d[0].add_chain(writable=[16, 16]))[0].head,
        "indirect": lambda d: d[0].add_chain(writable=[32, 32], indirect=True).head,
    }.items():
        path = os.path.join(out, name)
        make_seed(path, RngDevice(source=_source), lambda d, b=build: (b(d), 0)[1])
        with open(path, "rb") as f:
            body = f.read().rstrip(b"\0")
        with open(path, "wb") as f:
            f.write(body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
    else:
        main(TestOneInput)
