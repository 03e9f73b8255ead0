"""Measurement event log (pure): TCG-style records of what was extended into which PCR, and replay.

One event per JSON line::

    {"pcr": 14, "kind": "manifest", "digest": "<sha256 hex>", "description": "bulkhead manifest 0.1.0"}

What is extended into the SHA-256 bank of PCR `pcr` is not the raw digest but

    extend_value = SHA-256(b"bulkhead-event/1\\0" || kind || b"\\0" || digest)

so an event's kind is bound into the PCR (relabelling a VM launch as a manifest changes the PCR).
The description is informational and NOT bound: never make a decision on it.
Replay: PCR_new = SHA-256(PCR_old || extend_value), starting from 32 zero bytes (TPM reset value).
Every line is hostile input: parse_event_log validates types, ranges and sizes and raises
IntegrityError on the first bad line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bulkhead.integrity.errors import IntegrityError

__all__ = [
    "EVENT_DOMAIN",
    "KINDS",
    "MAX_DESCRIPTION",
    "MAX_EVENTS",
    "UNVERIFIED_MANIFEST_DIGEST",
    "Event",
    "format_event",
    "parse_event",
    "parse_event_log",
    "replay",
]

EVENT_DOMAIN = b"bulkhead-event/1\x00"
KINDS = ("manifest", "config", "vm-launch")
MAX_EVENTS = 1_000_000
MAX_DESCRIPTION = 1024
MAX_PCR = 23
ZERO_PCR = bytes(32)
# Extended as the "manifest" digest when the manifest check was skipped in development: no policy
# should list it, so a skipped check can never attest as trusted.
UNVERIFIED_MANIFEST_DIGEST = hashlib.sha256(b"bulkhead: installation NOT verified (dev skip)").hexdigest()
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Event:
    """One measurement. Construct through parse_event or directly; __post_init__ validates."""

    pcr: int
    kind: str
    digest: str
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pcr, int) or isinstance(self.pcr, bool) or not 0 <= self.pcr <= MAX_PCR:
            raise IntegrityError(f"event PCR index must be an integer 0..{MAX_PCR}")
        if self.kind not in KINDS:
            raise IntegrityError(f"event kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.digest, str) or not _HEX64.match(self.digest):
            raise IntegrityError("event digest must be 64 lowercase hex characters (SHA-256)")
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION:
            raise IntegrityError(f"event description must be a string of at most {MAX_DESCRIPTION} characters")

    @property
    def extend_value(self) -> bytes:
        """The 32 bytes extended into the PCR for this event."""
        return hashlib.sha256(
            EVENT_DOMAIN + self.kind.encode("ascii") + b"\x00" + bytes.fromhex(self.digest)
        ).digest()

    def to_dict(self) -> dict[str, object]:
        return {"pcr": self.pcr, "kind": self.kind, "digest": self.digest, "description": self.description}


def format_event(event: Event) -> str:
    """One JSON line (no newline) for `event`, keys sorted."""
    return json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"))


def parse_event(obj: object) -> Event:
    """Validate a decoded JSON object as an Event. Raises IntegrityError when malformed."""
    if not isinstance(obj, dict):
        raise IntegrityError("event is not a JSON object")
    if not set(obj) <= {"pcr", "kind", "digest", "description"} or not {"pcr", "kind", "digest"} <= set(obj):
        raise IntegrityError("event must have pcr, kind, digest and optionally description, nothing else")
    return Event(obj["pcr"], obj["kind"], obj["digest"], obj.get("description", ""))


def parse_event_log(text: str | Iterable[object]) -> list[Event]:
    """Parse JSON lines (str) or already-decoded event objects. Raises IntegrityError on any bad entry."""
    items: Iterable[object]
    if isinstance(text, str):
        decoded: list[object] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                decoded.append(json.loads(line))
            except ValueError:
                raise IntegrityError(f"event log line {n} is not valid JSON") from None
        items = decoded
    else:
        items = text
    events: list[Event] = []
    for n, obj in enumerate(items, 1):
        if n > MAX_EVENTS:
            raise IntegrityError(f"event log has more than {MAX_EVENTS} events")
        try:
            events.append(parse_event(obj))
        except IntegrityError as exc:
            raise IntegrityError(f"event log entry {n}: {exc}") from None
    return events


def replay(events: Iterable[Event], initial: Mapping[int, bytes] | None = None) -> dict[int, bytes]:
    """Recompute PCR values (SHA-256 bank) from the events. PCRs without events are absent unless in
    `initial`; absent PCRs are taken as 32 zero bytes by callers."""
    pcrs: dict[int, bytes] = dict(initial or {})
    for e in events:
        pcrs[e.pcr] = hashlib.sha256(pcrs.get(e.pcr, ZERO_PCR) + e.extend_value).digest()
    return pcrs
