"""The host's snapshot key and the restore ledger (edge: files).

The host key (32 random bytes, a file of mode 0600 owned by the user running bulkhead) wraps each
snapshot's data key; without it a snapshot can be neither read nor forged, and its key id names the host
that made it. On a host with a TPM the production answer is to seal this key to the TPM (docs/SNAPSHOT.md);
this file is the software fallback and the one tests use.

The ledger records every snapshot id restored with this key. A second restore of the same snapshot
duplicates guest secrets and RNG state (Firecracker docs/snapshotting/random-for-clones.md), so it is
refused unless the caller asks for a clone; the ledger is appended under flock and fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from bulkhead.errors import ConfigError, SnapshotError, SnapshotRestoredBefore

__all__ = ["default_key_path", "load_host_key", "record_restore"]

KEY_BYTES = 32
KEY_ENV = "BULKHEAD_SNAPSHOT_KEY"


def default_key_path() -> str:
    """$BULKHEAD_SNAPSHOT_KEY, else /var/lib/bulkhead/snapshot.key for root, else
    $XDG_STATE_HOME (~/.local/state)/bulkhead/snapshot.key."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/bulkhead/snapshot.key"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "bulkhead", "snapshot.key")


def load_host_key(path: str, *, create: bool) -> bytes:
    """Read the host key; with `create`, make one (0600, O_EXCL) when there is none.
    Raises ConfigError for a key file that is not a private regular file of 32 bytes."""
    if create:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot create the snapshot key {path}: {exc.strerror}") from None
        else:
            try:
                os.write(fd, os.urandom(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(
            f"there is no snapshot key at {path}: this host has made no snapshot (or --snapshot-key names "
            "another file), so it cannot restore one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot open the snapshot key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"the snapshot key {path} must be a regular file owned by uid {os.geteuid()} with mode 0600"
            )
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the snapshot key {path} is not {KEY_BYTES} bytes")
    return key


def record_restore(key_path: str, snapshot_id: str, *, clone: bool) -> bool:
    """Record that `snapshot_id` is being restored. Returns whether it had been restored before.
    Raises SnapshotError for a repeated restore without `clone`. The check and the append are one
    critical section (flock), so two concurrent restores of one snapshot cannot both pass."""
    path = key_path + ".restored"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the restore ledger {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as f:
            seen = snapshot_id.encode() + b"\n" in set(f.readlines())
        if seen and not clone:
            raise SnapshotRestoredBefore(
                f"snapshot {snapshot_id} was restored before: restoring it again duplicates the guest's "
                "secrets and RNG state; pass --clone to do it on purpose"
            )
        try:
            os.write(fd, snapshot_id.encode() + b"\n")
            os.fsync(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SnapshotError(f"cannot record the restore in {path}: no space left") from None
            raise
        return seen
    finally:
        os.close(fd)
