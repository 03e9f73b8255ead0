"""A SQLite database with group commit (issue 16 item 5): the machinery under daemon/store.py.

Writes: `txn()` runs its body on the one write connection inside the batch transaction that is open
(BEGIN IMMEDIATE, one SAVEPOINT per body, bodies one at a time under the writer lock); an exception inside
rolls back that body alone, its durable records with it. One committer thread makes the whole batch's
records durable (`durable`: for the daemon one audit transaction, one fsync) and COMMITs (one fsync,
synchronous=FULL), and only then wakes every member: `txn()` returns after its change is durable, never
before (a SIGKILL loses nothing acknowledged), and raises when the batch failed (nothing of it changed).
Reads (`q`, `q1`) outside a body need no lock: each thread reads on its own WAL reader connection, which
sees committed state only (SQLite WAL, https://sqlite.org/wal.html); inside a body or `writer()` they
read on the write connection.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bulkhead.errors import HostError

__all__ = ["BATCH_MAX", "GroupCommitDb"]

BATCH_MAX = 256  # bodies per group commit


class _Batch:
    """One group commit: the members' durable records in body order, what runs after the COMMIT."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.after: list[Callable[[], None]] = []
        self.members = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.durable = False  # the records were made durable (a later state COMMIT may still fail)


def _again(err: BaseException, durable: bool) -> BaseException:
    """A fresh copy of a batch's error for one member thread (the same type, so callers map it alike)."""
    try:
        copy = type(err)(*err.args)
    except TypeError:
        copy = err
    copy.records_durable = durable  # type: ignore[attr-defined]
    return copy


class GroupCommitDb:
    """Open (create) the database at `path` in WAL mode with `schema`. Raises HostError."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._wlock = threading.RLock()  # the write connection and the open batch
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        try:
            self._conn = self._open()
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(schema)
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the state database {path}: {exc}") from None
        # makes a batch's records durable before its COMMIT (Core: one audit append of all of them);
        # raises to fail the whole batch
        self.durable: Callable[[list[Any]], object] | None = None
        self._batch: _Batch | None = None
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._committer = threading.Thread(target=self._commit_loop, name="state-committer", daemon=True)
        self._committer.start()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._committer.join(timeout=30)
        with self._wlock:
            for c in [self._conn, *self._readers]:
                c.close()
            self._readers.clear()

    # ------------------------------------------------------------------ group commit
    @contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (re-entrant: nested uses join the outer one) that returns once durable.
        Raises sqlite3.Error (or what `durable` raised) when its batch failed: nothing of it was changed."""
        loc = self._local
        if getattr(loc, "depth", 0):
            loc.depth += 1
            try:
                yield self._conn
            finally:
                loc.depth -= 1
            return
        with self._wlock:
            batch = self._open_batch()
            self._conn.execute("SAVEPOINT body")
            loc.depth, loc.batch = 1, batch
            marks = len(batch.records), len(batch.after)
            try:
                yield self._conn
                self._conn.execute("RELEASE body")
            except BaseException:
                del batch.records[marks[0]:], batch.after[marks[1]:]  # its records go with its changes
                self._undo(batch)
                raise
            finally:
                loc.depth, loc.batch = 0, None
            batch.members += 1
        with self._cond:
            self._cond.notify_all()
        batch.done.wait()
        if batch.error is not None:
            raise _again(batch.error, batch.durable) from None

    def add_durable(self, record: Any) -> None:
        """Inside a txn body: `record` is made durable (in body order) before this change commits."""
        self._local.batch.records.append(record)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the current transaction has committed (at once outside a transaction)."""
        batch = getattr(self._local, "batch", None)
        if batch is None:
            fn()
        else:
            batch.after.append(fn)

    def _open_batch(self) -> _Batch:
        while (full := self._batch) is not None and full.members >= BATCH_MAX:
            self._wlock.release()  # a full batch: let the committer take it (it may clear _batch at once)
            try:
                full.done.wait()
            finally:
                self._wlock.acquire()
        if self._batch is not None and not self._conn.in_transaction:
            self._broken(self._batch)
        if self._batch is None:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = _Batch()
        return self._batch

    def _undo(self, batch: _Batch) -> None:
        """A body raised: roll back that body alone (the whole, empty transaction if it was the only one)."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK TO body")
                self._conn.execute("RELEASE body")
                if batch.members == 0:
                    self._conn.execute("ROLLBACK")
                    self._batch = None
                return
        except sqlite3.Error:
            pass
        self._broken(batch)

    def _broken(self, batch: _Batch) -> None:
        """SQLite rolled the whole transaction back itself (a full disk, I/O error): its members fail."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        batch.error = batch.error or sqlite3.OperationalError("the state transaction was rolled back")
        self._batch = None
        batch.done.set()

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._batch is None or not self._batch.members):
                    self._cond.wait()
                if self._closed and (self._batch is None or not self._batch.members):
                    return
            with self._wlock:
                batch, self._batch = self._batch, None
                if batch is None or batch.done.is_set():
                    continue
                try:
                    if batch.records and self.durable is not None:
                        self.durable(batch.records)
                    batch.durable = True
                    self._conn.execute("COMMIT")
                except BaseException as exc:  # every member fails: nothing of the batch was changed
                    batch.error = exc
                    try:
                        if self._conn.in_transaction:
                            self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            if batch.error is None:
                for fn in batch.after:
                    try:
                        fn()
                    except Exception as exc:  # pragma: no cover - a bug in a hook
                        print(f"bulkheadd: after-commit hook: {exc!r}", flush=True)
            batch.done.set()

    # ------------------------------------------------------------------ reads
    @contextmanager
    def committed(self) -> Iterator[None]:
        """Reads inside see committed state only, also inside a txn body (e.g. RBAC reloads)."""
        self._local.committed = getattr(self._local, "committed", 0) + 1
        try:
            yield
        finally:
            self._local.committed -= 1

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the writer lock: no body runs and no batch commits meanwhile, and reads inside see the
        open batch's changes too (they commit or fail as one; a failed member undoes its own host
        changes afterwards). For code that makes the host follow the store (networks.net_sync)."""
        with self._wlock:
            self._local.paused = getattr(self._local, "paused", 0) + 1
            try:
                yield
            finally:
                self._local.paused -= 1

    def _reader(self) -> sqlite3.Connection:
        """Inside a body or writer(): the write connection; else this thread's own reader (committed
        state only)."""
        loc = self._local
        if (getattr(loc, "depth", 0) or getattr(loc, "paused", 0)) and not getattr(loc, "committed", 0):
            return self._conn
        conn: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._open()
            conn.execute("PRAGMA query_only=1")
            self._local.reader = conn
            with self._wlock:
                self._readers.append(conn)
        return conn

    def q(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, args).fetchall()

    def q1(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._reader().execute(sql, args).fetchone()
        return row
