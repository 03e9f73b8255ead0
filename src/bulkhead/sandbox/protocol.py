"""The host <-> worker protocol: a closed, versioned, typed message set (pure core + a thin channel).

Wire format: one message per SOCK_SEQPACKET datagram, a UTF-8 JSON object
``{"v": 1, "type": "<name>", <fields>}``. Bytes travel base64-encoded. No pickle, ever.

Both sides validate every message against the schema below: the exact set of keys, each field's type
(``bool`` is not an ``int``), integer ranges, string lengths and choices. Anything else -- unknown
type, wrong direction, extra or missing key, duplicate key, NaN, a datagram longer than
MAX_MESSAGE, ancillary data (passed file descriptors) -- raises ProtocolError. The host treats a
ProtocolError from a worker as hostile: it ends that worker and records the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
from typing import Any, ClassVar, dataclass_transform

from bulkhead.errors import GuestFault

__all__ = [
    "EVENT_MAX_FIELDS",
    "HOST_TO_WORKER",
    "MAX_CONSOLE_CHUNK",
    "MAX_MESSAGE",
    "POOL_HOST_TO_WORKER",
    "POOL_WORKER_TO_HOST",
    "PROTOCOL_VERSION",
    "SHUTDOWN_EVENT",
    "WORKER_STATES",
    "WORKER_TO_HOST",
    "Assign",
    "Channel",
    "Console",
    "ConsoleIn",
    "Event",
    "Exit",
    "Hello",
    "IntegrityRefused",
    "Message",
    "Pause",
    "PoolReady",
    "Probe",
    "ProbeResult",
    "ProtocolError",
    "Resume",
    "SaveState",
    "SecurityEvent",
    "Shutdown",
    "Start",
    "StateSaved",
    "Stats",
    "Status",
    "StatusReply",
    "Stop",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024  # bytes per datagram, both directions
MAX_CONSOLE_CHUNK = 16 * 1024  # raw console bytes per message (base64 keeps it under MAX_MESSAGE)
MAX_TEXT = 1024  # any free-text string field
MAX_NAME = 64  # identifiers: event names, probe names, exit kinds
EVENT_MAX_FIELDS = 32
STATS_MAX_COUNTERS = 256  # runtime/stats.py MAX_COUNTERS
U32 = (1 << 32) - 1
U63 = (1 << 63) - 1
WORKER_STATES = ("ready", "starting", "running", "paused", "stopping", "stopped")
PROBE_OUTCOMES = ("denied", "allowed", "error")
# The worker's answer to Shutdown: an Event of this name, field method = "ctrl-alt-del" or "" (not delivered).
SHUTDOWN_EVENT = "worker.shutdown-requested"


class ProtocolError(GuestFault):
    """A message broke the protocol (malformed, oversized, unknown, wrong direction, fds attached)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, device="worker-protocol", kind="protocol")


# --- field specifications (data, checked by one function) ------------------------------------------


class _Int:
    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi


class _Str:
    __slots__ = ("choices", "ident", "max_len")

    def __init__(self, max_len: int, choices: tuple[str, ...] = (), ident: bool = False) -> None:
        self.max_len, self.choices, self.ident = max_len, choices, ident  # ident: [a-z0-9_.:-] only


class _Bytes:
    __slots__ = ("max_len",)

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len


class _Bool:
    __slots__ = ()


class _Fields:
    """A flat mapping of identifier -> int | str | bool | None (event payloads)."""

    __slots__ = ("max_items",)

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items


_Spec = _Int | _Str | _Bytes | _Bool | _Fields
_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.:-")


@dataclass_transform(eq_default=True, frozen_default=True)
class Message:
    """Base of every protocol message. Subclasses set TYPE and SPEC (field name -> spec) and declare the
    fields, in SPEC's order, with their defaults as class attributes.

    Immutable value objects: positional or keyword construction in field order, equality by type and
    values, hashable. A plain class, not a dataclass: generating 17 dataclasses (and importing
    `dataclasses`, which pulls in inspect/ast/tokenize) cost the jailed start path ~20 ms."""

    TYPE: ClassVar[str] = ""
    SPEC: ClassVar[dict[str, _Spec]] = {}
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._FIELDS = tuple(cls.SPEC)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._FIELDS
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
        values = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names or k in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated argument {k!r}")
            values[k] = v
        for name in names:
            object.__setattr__(self, name, values[name] if name in values else getattr(type(self), name))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name!r})")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))  # as a frozen dataclass: a dict field is unhashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._FIELDS)})"


# host -> worker
class Start(Message):
    TYPE: ClassVar[str] = "start"


class Pause(Message):
    TYPE: ClassVar[str] = "pause"


class Resume(Message):
    TYPE: ClassVar[str] = "resume"


class Stop(Message):
    TYPE: ClassVar[str] = "stop"


class Shutdown(Message):
    """Ask the guest to shut down (`vm shutdown`): the worker signals it (Ctrl-Alt-Del through the i8042)
    and answers with the event `worker.shutdown-requested` naming the method ("" = not delivered). The
    host force-stops the VM if the guest has not powered off within its timeout."""

    TYPE: ClassVar[str] = "shutdown"


class Status(Message):
    """`stats`: the worker sends a `stats` message (the VM's counters so far) before its status-reply."""

    TYPE: ClassVar[str] = "status"
    SPEC: ClassVar[dict[str, _Spec]] = {"seq": _Int(0, U32), "stats": _Bool()}
    seq: int = 0
    stats: bool = False


class SaveState(Message):
    """Snapshot a running VM (docs/SNAPSHOT.md "The daemon"): the worker pauses the vCPUs, completes the
    I/O each one had half done, writes the state document into the host's state memfd and stays paused.
    It answers `state-saved` with the same seq. The host then reads guest memory from its own memfd, seals
    the file, and resumes or stops the VM. Refused (ok=false) by a worker spawned without the memfds."""

    TYPE: ClassVar[str] = "save-state"
    SPEC: ClassVar[dict[str, _Spec]] = {"seq": _Int(0, U32)}
    seq: int = 0


class ConsoleIn(Message):
    TYPE: ClassVar[str] = "console-in"
    SPEC: ClassVar[dict[str, _Spec]] = {"data": _Bytes(MAX_CONSOLE_CHUNK)}
    data: bytes = b""


class Probe(Message):
    """Test-only: run a named escape probe. Refused by both sides unless probes were enabled at spawn."""

    TYPE: ClassVar[str] = "probe"
    SPEC: ClassVar[dict[str, _Spec]] = {"name": _Str(MAX_NAME, ident=True), "arg": _Str(MAX_TEXT)}
    name: str = ""
    arg: str = ""


# worker -> host
class Hello(Message):
    """First message: the sandbox is in place. Claims only; the host checks what it can."""

    TYPE: ClassVar[str] = "hello"
    SPEC: ClassVar[dict[str, _Spec]] = {
        "version": _Int(0, U32),
        "uid": _Int(0, U32),
        "gid": _Int(0, U32),
        "pid": _Int(0, U32),
        "seccomp": _Bool(),
        "probes": _Bool(),
    }
    version: int = PROTOCOL_VERSION
    uid: int = 0
    gid: int = 0
    pid: int = 0
    seccomp: bool = False
    probes: bool = False


class StatusReply(Message):
    TYPE: ClassVar[str] = "status-reply"
    SPEC: ClassVar[dict[str, _Spec]] = {
        "seq": _Int(0, U32),
        "state": _Str(16, WORKER_STATES),
        "uptime_ms": _Int(0, U63),
    }
    seq: int = 0
    state: str = "ready"
    uptime_ms: int = 0


class StateSaved(Message):
    """The answer to `save-state`. A claim only: the host checks the state document itself (format.py
    check_state) before anything of it is sealed."""

    TYPE: ClassVar[str] = "state-saved"
    SPEC: ClassVar[dict[str, _Spec]] = {"seq": _Int(0, U32), "ok": _Bool(), "detail": _Str(MAX_TEXT)}
    seq: int = 0
    ok: bool = False
    detail: str = ""


class Console(Message):
    TYPE: ClassVar[str] = "console"
    SPEC: ClassVar[dict[str, _Spec]] = {"data": _Bytes(MAX_CONSOLE_CHUNK)}
    data: bytes = b""


class Event(Message):
    TYPE: ClassVar[str] = "event"
    SPEC: ClassVar[dict[str, _Spec]] = {"name": _Str(MAX_NAME, ident=True), "fields": _Fields(EVENT_MAX_FIELDS)}
    name: str = ""
    fields: dict[str, int | str | bool | None] | None = None


class SecurityEvent(Message):
    TYPE: ClassVar[str] = "security-event"
    SPEC: ClassVar[dict[str, _Spec]] = {"kind": _Str(MAX_NAME, ident=True), "detail": _Str(MAX_TEXT)}
    kind: str = ""
    detail: str = ""


class Exit(Message):
    """The worker's own account of why its VM stopped. Untrusted: the host checks it against the process."""

    TYPE: ClassVar[str] = "exit"
    SPEC: ClassVar[dict[str, _Spec]] = {
        "kind": _Str(MAX_NAME, ident=True),
        "status": _Int(0, 0xFFFF),
        "detail": _Str(MAX_TEXT),
    }
    kind: str = ""
    status: int = 0
    detail: str = ""


class Stats(Message):
    """The VM's counters (`bulkhead run --stats`), flattened by runtime/stats.py: sent before `exit`, and
    before the status-reply of a `status` with stats=true (each replaces the last; none after `exit`).
    Untrusted like every worker claim: diagnostics only, the host decides nothing on them."""

    TYPE: ClassVar[str] = "stats"
    SPEC: ClassVar[dict[str, _Spec]] = {"counters": _Fields(STATS_MAX_COUNTERS)}
    counters: dict[str, int | str | bool | None] | None = None


class ProbeResult(Message):
    TYPE: ClassVar[str] = "probe-result"
    SPEC: ClassVar[dict[str, _Spec]] = {
        "name": _Str(MAX_NAME, ident=True),
        "outcome": _Str(16, PROBE_OUTCOMES),
        "detail": _Str(MAX_TEXT),
    }
    name: str = ""
    outcome: str = "error"
    detail: str = ""


class IntegrityRefused(Message):
    """Sent instead of Hello by the pre-import gate (bulkhead/_boot.py, which writes this exact JSON by
    hand: it runs before any bulkhead module may be imported) when the worker's code does not match the
    signed manifest; the worker then exits with _boot.EXIT_INTEGRITY. Believed only with that exit status."""

    TYPE: ClassVar[str] = "integrity-refused"
    SPEC: ClassVar[dict[str, _Spec]] = {"path": _Str(MAX_TEXT), "detail": _Str(MAX_TEXT)}
    path: str = ""
    detail: str = ""


# pool workers (sandbox/zygote.py, docs/SANDBOX.md "Worker pool"): before its VM, a pool worker speaks
# only these two; afterwards it speaks the tables below, exactly as an exec'd worker does.
class PoolReady(Message):
    """Pool worker -> host, once: verified by the gate, imported, in its cgroup and in its mount, IPC, UTS
    and network namespaces; it now waits for its one Assign. Claims only (the host checks the hello)."""

    TYPE: ClassVar[str] = "pool-ready"
    SPEC: ClassVar[dict[str, _Spec]] = {"pid": _Int(0, U32)}
    pid: int = 0


class Assign(Message):
    """Host -> pool worker, once: the VM's jail spec (JailSpec JSON, parsed by JailSpec.from_json; its
    id, root, uid, gid, cgroups and seccomp switch must equal the ones the worker was started with)."""

    TYPE: ClassVar[str] = "assign"
    SPEC: ClassVar[dict[str, _Spec]] = {"spec": _Str(MAX_MESSAGE - 256), "restore": _Bool(), "snapshot": _Bool()}
    spec: str = ""
    restore: bool = False  # with the host's two memfds attached (the only message that may carry fds)
    snapshot: bool = False


POOL_HOST_TO_WORKER: dict[str, type[Message]] = {Assign.TYPE: Assign}
POOL_WORKER_TO_HOST: dict[str, type[Message]] = {PoolReady.TYPE: PoolReady, IntegrityRefused.TYPE: IntegrityRefused}

HOST_TO_WORKER: dict[str, type[Message]] = {
    m.TYPE: m for m in (Start, Pause, Resume, Stop, Status, ConsoleIn, Probe, Shutdown, SaveState)
}
WORKER_TO_HOST: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, StatusReply, Console, Event, SecurityEvent, Exit, ProbeResult, IntegrityRefused, Stats,
                StateSaved)
}


# --- validation --------------------------------------------------------------------------------------


def _check_ident(value: str, what: str) -> None:
    if not value or any(ch not in _IDENT_CHARS for ch in value):
        raise ProtocolError(f"{what} must be a non-empty identifier of [a-z0-9_.:-]")


def _check_value(name: str, spec: _Spec, value: object) -> object:
    """Check one wire value against its spec and return the Python value. Raises ProtocolError."""
    if isinstance(spec, _Bool):
        if type(value) is not bool:
            raise ProtocolError(f"field {name!r} must be a boolean")
        return value
    if isinstance(spec, _Int):
        if type(value) is not int:
            raise ProtocolError(f"field {name!r} must be an integer")
        if not spec.lo <= value <= spec.hi:
            raise ProtocolError(f"field {name!r} is out of range [{spec.lo}, {spec.hi}]")
        return value
    if isinstance(spec, _Str):
        if type(value) is not str:
            raise ProtocolError(f"field {name!r} must be a string")
        if len(value) > spec.max_len:
            raise ProtocolError(f"field {name!r} is longer than {spec.max_len} characters")
        if spec.choices and value not in spec.choices:
            raise ProtocolError(f"field {name!r} must be one of {', '.join(spec.choices)}")
        if spec.ident:
            _check_ident(value, f"field {name!r}")
        return value
    if isinstance(spec, _Bytes):
        if type(value) is not str or len(value) > 4 * ((spec.max_len + 2) // 3):
            raise ProtocolError(f"field {name!r} must be base64 of at most {spec.max_len} bytes")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ProtocolError(f"field {name!r} is not valid base64") from None
        if len(raw) > spec.max_len:
            raise ProtocolError(f"field {name!r} is longer than {spec.max_len} bytes")
        return raw
    # _Fields
    if value is None:
        return {}
    if type(value) is not dict:
        raise ProtocolError(f"field {name!r} must be an object")
    if len(value) > spec.max_items:
        raise ProtocolError(f"field {name!r} has more than {spec.max_items} entries")
    out: dict[str, int | str | bool | None] = {}
    for k, v in value.items():
        if len(k) > MAX_NAME:
            raise ProtocolError(f"a key of field {name!r} is too long")
        _check_ident(k, f"a key of field {name!r}")
        if v is None or type(v) is bool:
            out[k] = v
        elif type(v) is int:
            if not -U63 <= v <= U63:
                raise ProtocolError(f"{name}.{k} is out of range")
            out[k] = v
        elif type(v) is str:
            if len(v) > MAX_TEXT:
                raise ProtocolError(f"{name}.{k} is longer than {MAX_TEXT} characters")
            out[k] = v
        else:
            raise ProtocolError(f"{name}.{k} must be an integer, string, boolean or null")
    return out


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"non-finite number {name} is not allowed")


def decode(data: bytes, allowed: dict[str, type[Message]]) -> Message:
    """Parse and validate one datagram into a typed message.

    `allowed` is HOST_TO_WORKER or WORKER_TO_HOST: the direction decides which types exist.
    Raises ProtocolError on anything that is not exactly one valid message.
    """
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    if not data:
        raise ProtocolError("empty message")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("message is not valid UTF-8 JSON") from None
    if type(obj) is not dict:
        raise ProtocolError("message must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (expected {PROTOCOL_VERSION})")
    mtype = obj.get("type")
    if type(mtype) is not str or mtype not in allowed:
        shown = mtype[:MAX_NAME] if isinstance(mtype, str) else type(mtype).__name__
        raise ProtocolError(f"unknown or misdirected message type {shown!r}")
    cls = allowed[mtype]
    keys = set(obj) - {"v", "type"}
    expected = set(cls.SPEC)
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise ProtocolError(
            f"message {mtype!r} has unexpected keys {[k[:MAX_NAME] for k in extra]} / missing {missing}"
        )
    values = {name: _check_value(name, spec, obj[name]) for name, spec in cls.SPEC.items()}
    return cls(**values)


def encode(msg: Message) -> bytes:
    """Serialise a message. Raises ProtocolError if it does not validate or exceeds MAX_MESSAGE."""
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for name, spec in msg.SPEC.items():
        value = getattr(msg, name)
        if isinstance(spec, _Bytes):
            if not isinstance(value, bytes | bytearray | memoryview):
                raise ProtocolError(f"field {name!r} must be bytes")
            value = base64.b64encode(bytes(value)).decode("ascii")
        elif isinstance(spec, _Fields) and value is None:
            value = {}
        obj[name] = value
    # Validate what we send exactly as the peer will (catches our own bugs before the peer does).
    for name, spec in msg.SPEC.items():
        _check_value(name, spec, obj[name])
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    return data


class Channel:
    """One end of a SOCK_SEQPACKET socketpair carrying protocol messages.

    recv() returns None at end of stream. It raises ProtocolError for a truncated (oversized) datagram,
    for attached file descriptors or other ancillary data, and for anything decode() rejects.
    send() raises ProtocolError for an invalid message and OSError if the peer is gone.
    """

    def __init__(self, sock: socket.socket, incoming: dict[str, type[Message]]) -> None:
        self.sock = sock
        self.incoming = incoming

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def recv_raw(self) -> bytes | None:
        """One datagram, size-checked; None at end of stream. Raises ProtocolError, OSError."""
        data, ancdata, flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1, 0)
        if flags & socket.MSG_CTRUNC or ancdata:
            raise ProtocolError("message carried ancillary data (file descriptors are never accepted)")
        if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
            raise ProtocolError(f"message exceeds the {MAX_MESSAGE}-byte limit")
        if not data:
            return None
        return data

    def recv(self) -> Message | None:
        data = self.recv_raw()
        return None if data is None else decode(data, self.incoming)

    def close(self) -> None:
        self.sock.close()


def declare_surfaces() -> None:
    """Every message type of the host<->worker protocol (decode() is the parser for both directions)."""
    from bulkhead.surface import declare

    for direction, table, boundary_note in (
        ("worker-to-host", WORKER_TO_HOST, "the daemon/supervisor parses what a possibly compromised worker sends"),
        ("host-to-worker", HOST_TO_WORKER, "the worker parses what the supervisor sends"),
        ("pool-worker-to-host", POOL_WORKER_TO_HOST, "the daemon's worker pool parses a pool worker's first message"),
        ("pool-host-to-worker", POOL_HOST_TO_WORKER, "a pool worker parses its one assignment"),
    ):
        for name in sorted(table):
            declare(
                "worker-message",
                f"{direction}-{name}",
                owner=__name__,
                boundary="worker-daemon",
                accepts=f"one JSON datagram <= {MAX_MESSAGE} bytes of type {name!r}, schema-checked by decode(); "
                f"anything else ends the worker ({boundary_note})",
                handler="decode",
                fuzz="fuzz/fuzz_worker_protocol.py",
            )
