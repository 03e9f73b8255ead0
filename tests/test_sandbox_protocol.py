"""The host <-> worker protocol: schema validation, size limits, and a host that survives hostile workers.

The fake-worker tests drive the real supervisor WorkerHandle over a real SOCK_SEQPACKET socketpair;
only the worker *process* is a stand-in, so hypothesis can run hundreds of hostile workers quickly.
"""

from __future__ import annotations

import array
import json
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.errors import GuestFault, HostError
from bulkhead.runtime.exits import ExitReason
from bulkhead.sandbox import protocol as p
from bulkhead.sandbox.supervisor import WorkerHandle, classify_exit

ALL = [
    p.Start(), p.Pause(), p.Resume(), p.Stop(), p.Status(7), p.ConsoleIn(b"\x00\xffabc"), p.Probe("mount", "x"), p.Shutdown(),
    p.Hello(1, 100000, 100000, 1, True, False), p.StatusReply(3, "paused", 12), p.Console(b"hi\n\x1b[0m"),
    p.Event("vm-started", {"a": 1, "b": "x", "c": None, "d": True}), p.SecurityEvent("guest-fault", "queue"),
    p.Exit("poweroff", 0, ""), p.ProbeResult("mount", "denied", "EPERM"),
    p.Stats({"vcpu_exits:0": 41, "devices:virtio-blk0:fault.desc-chain-loop": 1}),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg: p.Message) -> None:
    table = p.HOST_TO_WORKER if msg.TYPE in p.HOST_TO_WORKER else p.WORKER_TO_HOST
    out = p.decode(p.encode(msg), table)
    if isinstance(msg, p.Event):
        assert out == p.Event(msg.name, dict(msg.fields or {}))
    elif isinstance(msg, p.Stats):
        assert out == p.Stats(dict(msg.counters or {}))
    else:
        assert out == msg


def _wire(**obj: object) -> bytes:
    return json.dumps({"v": 1, **obj}).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_wire(type="start"), "misdirected"),  # a host message coming from a worker
        (_wire(type="hello", version=1, uid=1, gid=1, pid=1, seccomp=1, probes=False), "boolean"),
        (_wire(type="hello", version=1, uid=1, gid=1, pid=1, seccomp=True), "missing"),
        (_wire(type="hello", version=1, uid=1, gid=1, pid=1, seccomp=True, probes=False, x=1), "unexpected"),
        (_wire(type="exit", kind="poweroff", status=True, detail=""), "integer"),
        (_wire(type="exit", kind="Power Off", status=0, detail=""), "identifier"),
        (_wire(type="exit", kind="poweroff", status=1 << 40, detail=""), "range"),
        (_wire(type="status-reply", seq=1, state="hacked", uptime_ms=0), "one of"),
        (_wire(type="console", data="!!!"), "base64"),
        (_wire(type="console", data="A" * 30000), "base64 of at most"),
        (_wire(type="event", name="x", fields={"k": [1]}), "integer, string"),
        (_wire(type="event", name="x", fields={f"k{i}": i for i in range(40)}), "more than"),
        (b'{"v":1,"type":"exit","type":"exit","kind":"a","status":0,"detail":""}', "duplicate"),
        (b'{"v":1,"type":"exit","kind":"a","status":NaN,"detail":""}', "non-finite"),
        (b'{"v":2,"type":"exit","kind":"a","status":0,"detail":""}', "version"),
        (b"[1,2]", "object"),
        (b"\xff\xfe", "UTF-8"),
        (b"[" * 60000, "JSON"),
        (b"", "empty"),
        (b" " * (p.MAX_MESSAGE + 1), "limit"),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why) as info:
        p.decode(data, p.WORKER_TO_HOST)
    assert isinstance(info.value, GuestFault)


def test_encode_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(p.ProtocolError, match="field 'data' is longer than 16384 bytes"):
        p.encode(p.Console(b"x" * (p.MAX_CONSOLE_CHUNK + 1)))
    with pytest.raises(p.ProtocolError, match=r"field 'kind' must be a non-empty identifier of \[a-z0-9_\.:-\]"):
        p.encode(p.Exit("not an ident!", 0, ""))


@given(st.binary(max_size=4096))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        p.decode(data, p.WORKER_TO_HOST)
    except p.ProtocolError:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_messages = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, "1", True]), "type": st.sampled_from([*p.WORKER_TO_HOST, *p.HOST_TO_WORKER, "x"])},
    optional={k: _json_values for k in ("seq", "state", "uptime_ms", "data", "name", "fields", "kind", "status",
                                        "detail", "outcome", "version", "uid", "gid", "pid", "seccomp", "probes")},
)


@given(_messages)
@settings(max_examples=300, deadline=None)
def test_structured_fuzz_either_validates_exactly_or_is_rejected(obj: dict[str, object]) -> None:
    data = json.dumps(obj).encode()
    try:
        msg = p.decode(data, p.WORKER_TO_HOST)
    except p.ProtocolError:
        return
    # Accepted: it must be exactly what the schema allows, and re-encode to an equivalent message.
    assert type(msg) is p.WORKER_TO_HOST[obj["type"]]  # type: ignore[index]
    assert p.decode(p.encode(msg), p.WORKER_TO_HOST) == msg


# --- the real supervisor against fake (hostile) workers ----------------------------------------------


class FakeProc:
    """Stands in for the worker process: 'exits' when told to, or -9 when the host kills it."""

    pid = 999_999_999
    stderr = None

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.killed = threading.Event()
        self.exited = threading.Event()

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode = -9
        self.killed.set()
        self.exited.set()

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self.exited.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired("fake", timeout or 0)
        assert self.returncode is not None
        return self.returncode


def _fake_worker() -> tuple[WorkerHandle, socket.socket, FakeProc]:
    host, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = FakeProc()
    handle = WorkerHandle("fake", proc, p.Channel(host, p.WORKER_TO_HOST), stop_timeout=0.5)
    return handle, worker, proc


HELLO = p.encode(p.Hello(1, 100000, 100000, 1, True, False))


def test_fake_worker_with_a_clean_exit_is_believed() -> None:
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    worker.send(p.encode(p.Console(b"boot\n")))
    worker.send(p.encode(p.Exit("debug-exit", 0x21, "guest wrote 0x10")))
    worker.close()
    proc.exit(0x21)
    result = handle.wait(5)
    assert result.reason == ExitReason("debug-exit", 0x21, "guest wrote 0x10")
    assert not result.security_event and not proc.killed.is_set()


def test_a_worker_cannot_claim_a_reason_its_exit_status_contradicts() -> None:
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    worker.send(p.encode(p.Exit("poweroff", 0, "all good, honest")))
    worker.close()
    proc.exit(1)
    result = handle.wait(5)
    assert result.reason.kind == "worker-crash" and result.security_event


def test_stats_are_kept_once_and_a_second_copy_ends_the_worker() -> None:
    """`bulkhead run --stats` in the jail: the counters arrive in one schema-checked `stats` message; a worker
    that sends them twice (or after its exit claim) broke the protocol and is ended for it."""
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    worker.send(p.encode(p.Stats({"vcpu_exits:0": 5})))
    worker.send(p.encode(p.Exit("poweroff", 0, "")))
    worker.close()
    proc.exit(0)
    assert handle.wait(5).reason.kind == "poweroff" and handle.counters == {"vcpu_exits:0": 5}
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    worker.send(p.encode(p.Stats({"a": 1})))
    worker.send(p.encode(p.Stats({"a": 2})))
    result = handle.wait(5)
    assert result.reason.kind == "protocol-violation" and proc.killed.is_set()
    too_many = {f"c{i}": i for i in range(p.STATS_MAX_COUNTERS + 1)}
    with pytest.raises(p.ProtocolError, match="field 'counters' has more than 256 entries"):
        p.decode(_wire(type="stats", counters=too_many), p.WORKER_TO_HOST)


def test_stats_asked_for_are_answered_each_time_and_unasked_copies_still_end_the_worker() -> None:
    """GET /vms/{id}/stats asks a running worker (`status` with stats=true): each answer replaces the
    counters; a worker pushing copies nobody asked for (beyond its final one) is ended for it."""
    import threading

    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    for n in (1, 2):
        got = threading.Thread(target=handle.status, kwargs={"stats": True})
        got.start()
        req = p.decode(worker.recv(4096), p.HOST_TO_WORKER)
        assert isinstance(req, p.Status) and req.stats
        worker.send(p.encode(p.Stats({"vcpu_exits:0": n})))
        worker.send(p.encode(p.StatusReply(req.seq, "running", 5)))
        got.join(5)
        assert handle.counters == {"vcpu_exits:0": n}
    worker.send(p.encode(p.Stats({"vcpu_exits:0": 3})))  # the final, unasked copy: accepted
    worker.send(p.encode(p.Stats({"vcpu_exits:0": 4})))  # another one: a violation
    assert handle.wait(5).reason.kind == "protocol-violation" and proc.killed.is_set()


def test_counters_cross_the_protocol_unchanged() -> None:
    """What an unjailed `--stats` run writes is what the jailed host rebuilds from one `stats` message."""
    from bulkhead.runtime.stats import flatten_counters, nest_counters

    stats = {"vcpu_exits": [41, 7], "pio_unclaimed": {"reads": 3, "writes": 0}, "guest_resident_bytes": 4096,
             "devices": {"virtio-blk0": {"fault.desc-chain-loop": 1, "guest_faults": 1, "queue_notify": 9},
                         "virtio-rng": {"bytes": 64}}}
    wire = p.decode(p.encode(p.Stats(dict(flatten_counters(stats)))), p.WORKER_TO_HOST)
    assert isinstance(wire, p.Stats) and nest_counters(dict(wire.counters or {})) == stats


def test_a_worker_cannot_claim_a_supervisor_only_reason() -> None:
    reason, _ = classify_exit(0, oom_kills=0, claimed=ExitReason("oom-kill", 0, ""), violation=None,
                              host_killed=False)
    assert reason.kind == "worker-crash"


def test_exit_evidence_order() -> None:
    claimed = ExitReason("poweroff", 0, "")
    assert classify_exit(-31, oom_kills=1, claimed=claimed, violation=None, host_killed=False)[0].kind == "seccomp-kill"
    assert classify_exit(-9, oom_kills=1, claimed=claimed, violation=None, host_killed=True)[0].kind == "oom-kill"
    assert classify_exit(-9, oom_kills=0, claimed=None, violation=None, host_killed=True)[0].kind == "interrupted"
    assert classify_exit(-11, oom_kills=0, claimed=claimed, violation=None, host_killed=False)[0].kind == "worker-crash"
    assert classify_exit(0, oom_kills=0, claimed=claimed, violation="x", host_killed=False)[0].kind == "protocol-violation"
    assert classify_exit(0, oom_kills=0, claimed=claimed, violation=None, host_killed=False)[0] == claimed


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([b"\x00" * (p.MAX_MESSAGE + 10)], "exceeds"),
        ([HELLO, HELLO], "second hello"),
        ([p.encode(p.Console(b"x"))], "before hello"),
        ([p.encode(p.Hello(1, 1, 1, 1, True, True))], "probes"),
        ([HELLO, p.encode(p.ProbeResult("x", "denied", ""))], "without test probes"),
        ([HELLO, p.encode(p.Exit("poweroff", 0, "")), p.encode(p.Exit("poweroff", 0, ""))], "second exit"),
        ([HELLO, b'{"v":1,"type":"start"}'], "misdirected"),
    ],
)
def test_hostile_frames_end_the_worker_with_a_recorded_reason(frames: list[bytes], why: str) -> None:
    handle, worker, proc = _fake_worker()
    for f in frames:
        try:
            worker.send(f)
        except OSError:
            break  # the host already hung up
    result = handle.wait(5)
    assert proc.killed.is_set()
    assert result.reason.kind == "protocol-violation" and why in result.reason.detail
    assert result.security_event and handle.security_events[-1][0] == "protocol-violation"
    worker.close()


def test_passed_file_descriptors_are_a_violation() -> None:
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    with open("/dev/null", "rb") as f:
        worker.sendmsg([p.encode(p.Console(b"x"))],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))])
    result = handle.wait(5)
    assert result.reason.kind == "protocol-violation" and "ancillary" in result.reason.detail
    assert proc.killed.is_set()
    worker.close()


@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_workers_never_crash_the_host(frames: list[bytes]) -> None:
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    for f in frames:
        try:
            worker.send(f)
        except OSError:
            break
    worker.close()
    proc.exit(0)
    result = handle.wait(5)
    # Whatever was sent, the host ends up with one recorded reason and its reader thread has finished.
    # A zero-length datagram reads as end-of-stream; any other random frame cannot be a valid message.
    handle._reader.join(5)
    assert not handle._reader.is_alive()
    if frames[0] == b"":
        assert result.reason.kind == "worker-crash" and not proc.killed.is_set()
    else:
        assert result.reason.kind == "protocol-violation" and proc.killed.is_set()


def test_limits_are_exact_key_text_and_datagram_sizes() -> None:
    """MAX_NAME, MAX_TEXT and MAX_MESSAGE are each accepted exactly and refused one past (issue 15)."""
    assert p.decode(p.encode(p.Stats({"k" * p.MAX_NAME: 1})), p.WORKER_TO_HOST) == p.Stats({"k" * p.MAX_NAME: 1})
    with pytest.raises(p.ProtocolError, match="a key of field 'counters' is too long"):
        p.encode(p.Stats({"k" * (p.MAX_NAME + 1): 1}))
    ok = p.Event("e", {"t": "x" * p.MAX_TEXT})
    assert p.decode(p.encode(ok), p.WORKER_TO_HOST) == ok
    with pytest.raises(p.ProtocolError, match=f"fields.t is longer than {p.MAX_TEXT} characters"):
        p.encode(p.Event("e", {"t": "x" * (p.MAX_TEXT + 1)}))
    counters: dict[str, int | str | bool | None] = {}
    i = 0
    while len(p.encode(p.Stats(counters))) < p.MAX_MESSAGE - 1000:
        counters[f"c{i:03d}"] = "a" * 500
        i += 1
    counters["last"] = ""
    counters["last"] = "a" * (p.MAX_MESSAGE - len(p.encode(p.Stats(counters))))
    assert len(p.encode(p.Stats(counters))) == p.MAX_MESSAGE  # exactly the limit is sent
    counters["last"] += "a"
    with pytest.raises(p.ProtocolError, match=f"message of {p.MAX_MESSAGE + 1} bytes exceeds the"):
        p.encode(p.Stats(counters))


def test_an_unknown_message_type_is_named_in_the_error() -> None:
    raw = json.dumps({"v": p.PROTOCOL_VERSION, "type": "bogus"}).encode()
    with pytest.raises(p.ProtocolError, match="unknown or misdirected message type 'bogus'"):
        p.decode(raw, p.HOST_TO_WORKER)
    raw = json.dumps({"v": p.PROTOCOL_VERSION, "type": 7}).encode()
    with pytest.raises(p.ProtocolError, match="unknown or misdirected message type 'int'"):
        p.decode(raw, p.HOST_TO_WORKER)


def test_save_state_waits_for_its_own_answer_and_unasked_answers_are_dropped() -> None:
    """protocol save-state (docs/SNAPSHOT.md "The daemon"): a worker flooding the host with state-saved or
    status-reply messages nobody asked for cannot grow the host's reply table, and cannot answer a snapshot
    request with a forged ok (the seq must be the request's); a refusal is a HostError with its reason."""
    handle, worker, proc = _fake_worker()
    worker.send(HELLO)
    for seq in range(2000):  # unasked: dropped, not stored
        worker.send(p.encode(p.StateSaved(seq + 100, True, "")))
        worker.send(p.encode(p.StatusReply(seq + 100, "running", 1)))

    def answer(ok: bool) -> None:
        req = p.decode(worker.recv(p.MAX_MESSAGE), p.HOST_TO_WORKER)
        assert isinstance(req, p.SaveState)
        worker.send(p.encode(p.StateSaved(req.seq ^ 1, True, "wrong seq")))  # not its answer: ignored
        worker.send(p.encode(p.StateSaved(req.seq, ok, "" if ok else "the VM is stopping")))

    t = threading.Thread(target=answer, args=(True,))
    t.start()
    handle.save_state(timeout=5)
    t.join()
    t = threading.Thread(target=answer, args=(False,))
    t.start()
    with pytest.raises(HostError, match="the VM is stopping"):
        handle.save_state(timeout=5)
    t.join()
    time.sleep(0.2)
    assert handle._replies == {} and handle.running and not proc.killed.is_set()
    worker.close()
    proc.exit(0)
    handle.wait(5)
