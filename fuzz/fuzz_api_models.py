"""atheris harness for the API request models (bulkhead.control.models): the JSON bodies a client sends.

Input: byte 0 selects the request model (low bits) and the mode (bit 7). Raw mode: the rest is the
request body given to `Model.model_validate_json`. Structured mode: the rest drives a
FuzzedDataProvider that builds a JSON object from the model's own field names (plus an unknown key
sometimes) with fuzz-chosen value types, so mutations reach the field validators: pydantic-core is
native code, so libFuzzer's coverage feedback sees little of it and raw bytes rarely get past the
JSON syntax. A crash is any exception other than pydantic's ValidationError, or an
accepted body whose values break the model's documented limits (re-checked here independently).

Run: .venv/bin/python fuzz/fuzz_api_models.py -max_total_time=60 /tmp/bh-fuzz/api_models fuzz/corpus/api_models
Regenerate the seeds: .venv/bin/python fuzz/fuzz_api_models.py --write-seeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["bulkhead"]):
    from pydantic import ValidationError

    from bulkhead.control import models as m

MODELS = (
    m.TenantCreate, m.PrincipalIssue, m.RoleCreate, m.AssignmentCreate, m.DiskCreate, m.VmCreate, m.NetworkCreate,
)  # fmt: skip

SEEDS = {
    "tenant": (0, b'{"name":"acme","scope":"/t/acme"}'),
    "disk": (4, b'{"name":"root","size_mib":64}'),
    "vm": (
        5,
        b'{"tenant":"7f1f6a0e-2c1b-4c1a-9a53-3d2f0c6a1b2c","name":"web-1","kernel":"vmlinux",'
        b'"cmdline":"console=ttyS0","mem_mib":128,"cpus":2,'
        b'"drives":[{"disk":"0b7c8d9e-1f2a-4b3c-8d4e-5f6a7b8c9d0e","read_only":true}],'
        b'"nics":[{"network":"5d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d","mac":"52:54:00:12:34:56"}],"rng":true}',
    ),
    "vm_extra": (5, b'{"tenant":"x","name":"a","kernel":"k","evil":1}'),
    "network": (6, b'{"name":"lan","ipv4_subnet":"10.0.0.0/24","egress":false}'),
}


@atheris.instrument_func
def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 2 else 4)
    if kind == 0:
        return fdp.ConsumeInt(8)
    if kind == 1:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind == 5:
        return "7f1f6a0e-2c1b-4c1a-9a53-3d2f0c6a1b2c"
    if kind == 6:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 10))]
    return {fdp.ConsumeUnicodeNoSurrogates(8): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


@atheris.instrument_func
def _structured(model: type, data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    fields = [*model.model_fields, "unknown"]
    body = {}
    for _ in range(fdp.ConsumeIntInRange(0, len(fields) + 1)):
        body[fields[fdp.ConsumeIntInRange(0, len(fields) - 1)]] = _value(fdp)
    return json.dumps(body).encode()


@atheris.instrument_func
def TestOneInput(data: bytes) -> None:
    if not data:
        return
    model = MODELS[(data[0] & 0x7F) % len(MODELS)]
    body = _structured(model, data[1:]) if data[0] & 0x80 else data[1:]
    try:
        obj = model.model_validate_json(body)
    except ValidationError:
        return
    if isinstance(obj, m.VmCreate):
        if not (2 <= obj.mem_mib <= 65536 and 1 <= obj.cpus <= 32 and len(obj.drives) <= 8 and len(obj.nics) <= 4):
            raise AssertionError(f"VmCreate accepted out-of-limit values: {obj!r}")
        if "\x00" in obj.cmdline or len(obj.cmdline) > 4095:
            raise AssertionError("VmCreate accepted a command line with NUL or over 4095 characters")
        for nic in obj.nics:
            if nic.mac is not None and int(nic.mac[:2], 16) & 1:
                raise AssertionError(f"VmCreate accepted a multicast MAC {nic.mac}")
    if isinstance(obj, m.DiskCreate) and not 1 <= obj.size_mib <= 1024 * 1024:
        raise AssertionError(f"DiskCreate accepted size_mib={obj.size_mib}")


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (index, body) in SEEDS.items():
        (directory / name).write_bytes(bytes([index]) + body)
    for index in range(len(MODELS)):
        (directory / f"structured_{index}").write_bytes(bytes([0x80 | index]) + bytes(range(64)))


def main() -> None:
    if "--write-seeds" in sys.argv:
        write_seeds(Path(__file__).parent / "corpus" / "api_models")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
