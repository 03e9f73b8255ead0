"""The host <-> worker protocol at its edges (issue 15): every limit accepted exactly and refused one
past, the typed error kind, the value-object contract of Message, and the datagram size on a real
SOCK_SEQPACKET socketpair (sandbox/protocol.py module docstring: "MAX_MESSAGE, ancillary data ...
raises ProtocolError")."""

from __future__ import annotations

import json
import socket
from typing import Any, ClassVar

import pytest

from bulkhead.sandbox import protocol as p


def _wire(**obj: object) -> bytes:
    return json.dumps({"v": p.PROTOCOL_VERSION, **obj}).encode()


def _refused(data: bytes, match: str, table: dict[str, type[p.Message]] = p.WORKER_TO_HOST) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError, match=match) as info:
        p.decode(data, table)
    return info.value


def test_a_protocol_error_is_a_typed_guest_fault_of_the_worker_protocol() -> None:
    err = _refused(b"[1]", "must be a JSON object")
    assert err.kind == "protocol" and err.device == "worker-protocol"


def test_integer_fields_take_both_ends_of_their_range_and_nothing_past() -> None:
    assert p.decode(_wire(type="status", seq=p.U32, stats=False), p.HOST_TO_WORKER) == p.Status(p.U32)
    assert p.decode(_wire(type="status", seq=0, stats=True), p.HOST_TO_WORKER) == p.Status(0, True)
    _refused(_wire(type="status", seq=p.U32 + 1, stats=False), r"field 'seq' is out of range \[0, 4294967295\]",
             p.HOST_TO_WORKER)
    _refused(_wire(type="status", seq=-1, stats=False), "field 'seq' is out of range", p.HOST_TO_WORKER)


def test_string_fields_are_strings_of_at_most_their_length() -> None:
    name = "n" * p.MAX_NAME
    assert p.decode(_wire(type="probe", name=name, arg=""), p.HOST_TO_WORKER) == p.Probe(name, "")
    _refused(_wire(type="probe", name=name + "n", arg=""), "field 'name' is longer than 64 characters", p.HOST_TO_WORKER)
    _refused(_wire(type="probe", name=5, arg=""), "field 'name' must be a string", p.HOST_TO_WORKER)
    _refused(_wire(type="probe", name=["mount"], arg=""), "field 'name' must be a string", p.HOST_TO_WORKER)


def test_bytes_fields_take_exactly_the_chunk_and_refuse_long_base64_before_decoding_it() -> None:
    chunk = bytes(range(256)) * (p.MAX_CONSOLE_CHUNK // 256)
    assert p.decode(p.encode(p.Console(chunk)), p.WORKER_TO_HOST) == p.Console(chunk)
    limit = 4 * ((p.MAX_CONSOLE_CHUNK + 2) // 3)  # the base64 length of MAX_CONSOLE_CHUNK bytes
    assert limit == 21848
    # valid base64, one quantum past the limit: refused on its length, never decoded
    _refused(_wire(type="console", data="A" * (limit + 4)), "field 'data' must be base64 of at most 16384 bytes")
    _refused(_wire(type="console", data="A" * limit), "field 'data' is longer than 16384 bytes")  # 16386 bytes
    with pytest.raises(p.ProtocolError, match="field 'data' must be bytes"):
        p.encode(p.Console("text, not bytes"))  # type: ignore[arg-type]


def test_fields_objects_take_exactly_their_entry_count_and_the_full_signed_64_bit_range() -> None:
    full = {f"k{i}": i for i in range(p.EVENT_MAX_FIELDS)}
    assert p.decode(_wire(type="event", name="e", fields=full), p.WORKER_TO_HOST) == p.Event("e", full)
    _refused(_wire(type="event", name="e", fields={**full, "one": 1}), "field 'fields' has more than 32 entries")
    ends = {"lo": -p.U63, "hi": p.U63}
    assert p.decode(_wire(type="event", name="e", fields=ends), p.WORKER_TO_HOST) == p.Event("e", ends)
    for past in (-(2**63), 2**63):  # -2**63 is an int64 but not in the protocol's symmetric range
        _refused(_wire(type="event", name="e", fields={"x": past}), "fields.x is out of range")
    _refused(_wire(type="event", name="e", fields=[["x", 1]]), "field 'fields' must be an object")
    _refused(_wire(type="event", name="e", fields="x"), "field 'fields' must be an object")


def test_a_null_fields_object_is_an_empty_one_on_the_wire_and_decoded() -> None:
    assert p.encode(p.Event("e")) == b'{"v":1,"type":"event","name":"e","fields":{}}'  # known answer
    got = p.decode(_wire(type="event", name="e", fields=None), p.WORKER_TO_HOST)
    assert isinstance(got, p.Event) and got.fields == {} and got.fields is not None


def test_encoding_is_ascii_json_with_non_ascii_escaped() -> None:
    assert p.encode(p.Probe("mount", "caf\u00e9")) == b'{"v":1,"type":"probe","name":"mount","arg":"caf\\u00e9"}'
    assert p.decode(p.encode(p.Probe("mount", "caf\u00e9")), p.HOST_TO_WORKER) == p.Probe("mount", "caf\u00e9")


def test_a_datagram_of_exactly_max_message_bytes_decodes() -> None:
    body = _wire(type="exit", kind="poweroff", status=0, detail="")
    exact = body + b" " * (p.MAX_MESSAGE - len(body))  # JSON allows trailing whitespace
    assert p.decode(exact, p.WORKER_TO_HOST) == p.Exit("poweroff", 0, "")
    _refused(exact + b" ", f"message of {p.MAX_MESSAGE + 1} bytes exceeds the {p.MAX_MESSAGE}-byte limit")


def test_messages_are_immutable_values() -> None:
    assert p.Status(1) == p.Status(1) and p.Status(1) != p.Status(2)
    assert p.Pause() != p.Resume()  # same (empty) values, different types
    assert hash(p.Status(1, True)) == hash(p.Status(1, True)) and len({p.Status(1), p.Status(1), p.Status(2)}) == 2
    assert repr(p.Exit("poweroff", 0, "")) == "Exit(kind='poweroff', status=0, detail='')"
    assert p.Exit("poweroff", detail="d") == p.Exit(kind="poweroff", status=0, detail="d")
    with pytest.raises(TypeError, match="Status takes at most 2 positional arguments"):
        p.Status(1, True, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="Status: unexpected or repeated argument 'seq'"):
        p.Status(1, seq=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="Status: unexpected or repeated argument 'bogus'"):
        p.Status(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="Status is immutable"):
        p.Status(1).seq = 2  # type: ignore[misc]


def test_a_message_class_takes_its_fields_and_limits_from_its_spec_in_order() -> None:
    """A new message type built from the spec classes gets its field order and each limit from SPEC."""
    class Rec(p.Message):
        TYPE: ClassVar[str] = "rec"
        SPEC: ClassVar[dict[str, Any]] = {"n": p._Int(2, 9), "s": p._Str(3, ("ab", "abc")), "b": p._Bytes(4),
                                          "f": p._Fields(2)}
        n: int = 2
        s: str = "ab"
        b: bytes = b""
        f: dict[str, Any] | None = None

    assert Rec._FIELDS == ("n", "s", "b", "f")
    assert repr(Rec(3)) == "Rec(n=3, s='ab', b=b'', f=None)" and Rec(3, "abc") == Rec(n=3, s="abc")
    ok = Rec(9, "abc", b"1234", {"x": 1, "y": None})
    assert p.decode(p.encode(ok), {"rec": Rec}) == ok
    for bad, why in [(Rec(1), r"'n' is out of range \[2, 9\]"), (Rec(10), "'n' is out of range"),
                     (Rec(2, "abcd"), "'s' is longer than 3 characters"), (Rec(2, "a"), "'s' must be one of ab, abc"),
                     (Rec(2, "ab", b"12345"), "'b' is longer than 4 bytes"),
                     (Rec(2, "ab", b"", {"x": 1, "y": 2, "z": 3}), "'f' has more than 2 entries")]:
        with pytest.raises(p.ProtocolError, match=why):
            p.encode(bad)


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * p.MAX_MESSAGE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * p.MAX_MESSAGE)
    yield a, p.Channel(b, p.WORKER_TO_HOST)
    a.close()
    b.close()


def test_the_channel_takes_a_datagram_of_exactly_max_message_and_refuses_one_byte_more(pair: Any) -> None:
    raw, chan = pair
    body = _wire(type="exit", kind="poweroff", status=0, detail="")
    raw.send(body + b" " * (p.MAX_MESSAGE - len(body)))
    assert chan.recv() == p.Exit("poweroff", 0, "")
    for size in (p.MAX_MESSAGE + 1, p.MAX_MESSAGE + 2, 3 * p.MAX_MESSAGE):
        raw.send(body + b" " * (size - len(body)))
        with pytest.raises(p.ProtocolError, match=f"message exceeds the {p.MAX_MESSAGE}-byte limit"):
            chan.recv_raw()
    raw.send(body)  # the channel is still in step after the refusals
    assert chan.recv() == p.Exit("poweroff", 0, "")
    raw.shutdown(socket.SHUT_WR)
    assert chan.recv() is None
