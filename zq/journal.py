"""The broker's journal: the state that must survive a crash, in SQLite (WAL mode).

What is kept: every accepted task not yet finished (its header, payload, and the
worker it was last handed to), and results until their TTL. Changes are buffered
while the broker's loop turn runs and written in one transaction by :meth:`commit`
(group commit). A commit reaches the disk when a thread has fdatasync'ed the WAL
file after it (:meth:`sync`), so the loop goes on with the next turns meanwhile; the
broker sends a turn's replies (ACCEPTED, TASK, results) only once its commit is on
disk, so nothing a peer was told about can be missing after a crash, a power cut
included. (SQLite runs with ``synchronous=NORMAL``: it syncs the WAL before each
checkpoint, and our thread syncs it after each commit, which together is what
``synchronous=FULL`` does, minus the wait inside COMMIT.)

One broker owns a journal file at a time: the database is opened in exclusive locking
mode, so a second broker on the same file fails at start instead of corrupting it.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zq.journal")

#: Flushes a file's data to the disk; fsync where the system has no fdatasync (macOS).
_datasync = getattr(os, "fdatasync", os.fsync)
#: Longest the broker waits, when it stops, for the disk to finish a sync.
FLUSH_TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    header BLOB NOT NULL,          -- the task header, msgpack, as accepted
    payload BLOB NOT NULL,         -- opaque arguments
    worker TEXT,                   -- the worker it was last handed to, NULL while queued
    redeliveries INTEGER NOT NULL DEFAULT 0,
    delivery INTEGER NOT NULL DEFAULT 0,  -- the assignment number the worker echoes
    retries INTEGER NOT NULL DEFAULT 0,
    eta REAL                       -- wall clock; set while it waits out a retry delay
);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    header BLOB NOT NULL,          -- the worker's DONE header, msgpack
    payload BLOB NOT NULL,
    expires REAL NOT NULL          -- wall-clock time (time.time())
);
CREATE TABLE IF NOT EXISTS dead (
    id TEXT PRIMARY KEY,
    header BLOB NOT NULL,
    payload BLOB NOT NULL,
    redeliveries INTEGER NOT NULL,
    died REAL NOT NULL             -- wall-clock time it was given up on
);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    definition BLOB NOT NULL,      -- the schedule as declared, msgpack
    last REAL,                     -- wall clock of its last fire, NULL if never
    last_task TEXT                 -- the id of the task it fired last
);
"""

_INSERT_TASK = (
    "INSERT OR IGNORE INTO tasks (id, header, payload, worker, redeliveries, delivery) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_ASSIGN = "UPDATE tasks SET worker = ?, redeliveries = ?, delivery = ? WHERE id = ?"
_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
_RETRY = "UPDATE tasks SET worker = NULL, retries = ?, eta = ? WHERE id = ?"
_PUT_RESULT = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)"
_DELETE_RESULT = "DELETE FROM results WHERE id = ?"
_PUT_DEAD = "INSERT OR REPLACE INTO dead VALUES (?, ?, ?, ?, ?)"
_DELETE_DEAD = "DELETE FROM dead WHERE id = ?"
_PUT_SCHEDULE = "INSERT OR REPLACE INTO schedules VALUES (?, ?, ?, ?)"
_FIRED = "UPDATE schedules SET last = ?, last_task = ? WHERE name = ?"
_DELETE_SCHEDULE = "DELETE FROM schedules WHERE name = ?"
#: Each statement's table and where its row's key is in its arguments.
_ROW = {
    _INSERT_TASK: ("tasks", 0),
    _ASSIGN: ("tasks", 3),
    _DELETE_TASK: ("tasks", 0),
    _RETRY: ("tasks", 2),
    _PUT_RESULT: ("results", 0),
    _DELETE_RESULT: ("results", 0),
    _PUT_DEAD: ("dead", 0),
    _DELETE_DEAD: ("dead", 0),
    _PUT_SCHEDULE: ("schedules", 0),
    _FIRED: ("schedules", 2),
    _DELETE_SCHEDULE: ("schedules", 0),
}


@dataclass(frozen=True)
class StoredSchedule:
    name: str
    definition: bytes
    last: float | None
    last_task: str | None


@dataclass(frozen=True)
class StoredTask:
    """A task as the journal gives it back at start-up."""

    id: str
    header: bytes
    payload: bytes
    worker: str | None
    redeliveries: int
    retries: int = 0
    eta: float | None = None  # wall clock, while waiting out a retry delay
    delivery: int = 0


@dataclass(frozen=True)
class StoredResult:
    id: str
    state: str
    header: bytes
    payload: bytes
    expires: float  # wall clock


class Journal:
    """A journal in the SQLite file at ``path``."""

    durable = True

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # the sync thread does the rest
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            self._db.executescript(_SCHEMA)  # also takes the exclusive lock
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise RuntimeError(f"journal {path} is in use by another broker ({exc})") from None
        # The WAL is where SQLite put it: next to the file it opened, symbolic links
        # resolved (not next to ``path``). Opened now, so a later chdir cannot move it.
        main = self._db.execute("PRAGMA database_list").fetchone()[2]
        try:
            self._wal_fd = os.open(main + "-wal", os.O_RDONLY)
        except OSError as exc:
            self._db.close()
            raise RuntimeError(
                f"journal {path}: cannot open SQLite's write-ahead log to sync it ({exc})"
            ) from None
        # What a previous broker committed may sit in the page cache only (it died
        # before its sync): on disk now, before this broker says anything about it.
        self._sync_wal()
        _sync_file(main)
        _sync_directory(main)  # the names of a new journal and its WAL
        self._ops: list[tuple[str, Any]] = []
        self._inserted: dict[str, list[Any]] = {}  # rows inserted in this transaction
        self.committed = 0  # transactions committed so far
        self._synced = 0  # of those, how many are known to be on disk
        self._syncing = False  # a sync runs on the thread
        self._sync_thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._done_r, self._done_w = os.pipe()  # a byte per sync done, for the loop's poll
        self._reached = 0  # written by the thread: the commits its last sync covered
        self._failure: OSError | None = None  # written by the thread

    # ------------------------------------------------------------- changes

    def task_accepted(self, task_id: str, header: bytes, payload: bytes) -> None:
        row = [task_id, header, payload, None, 0, 0]
        self._ops.append((_INSERT_TASK, row))
        self._inserted[task_id] = row

    def task_assigned(
        self, task_id: str, worker: str | None, redeliveries: int, delivery: int
    ) -> None:
        row = self._inserted.get(task_id)
        if row is not None:  # accepted in this very transaction: one statement, not two
            row[3:] = (worker, redeliveries, delivery)
            return
        self._ops.append((_ASSIGN, (worker, redeliveries, delivery, task_id)))

    def task_finished(self, task_id: str) -> None:
        self._ops.append((_DELETE_TASK, (task_id,)))

    def task_retrying(self, task_id: str, retries: int, eta: float | None) -> None:
        """The task waits out a retry delay until ``eta`` (None: the wait is over)."""
        self._ops.append((_RETRY, (retries, eta, task_id)))

    def result_stored(
        self, task_id: str, state: str, header: bytes, payload: bytes, expires: float
    ) -> None:
        self._ops.append((_PUT_RESULT, (task_id, state, header, payload, expires)))

    def result_dropped(self, task_id: str) -> None:
        self._ops.append((_DELETE_RESULT, (task_id,)))

    def dead_stored(self, task_id: str, header: bytes, payload: bytes, redeliveries: int) -> None:
        self._ops.append((_PUT_DEAD, (task_id, header, payload, redeliveries, time.time())))

    def dead_dropped(self, task_id: str) -> None:
        self._ops.append((_DELETE_DEAD, (task_id,)))

    def schedule_stored(
        self, name: str, definition: bytes, last: float | None, last_task: str | None
    ) -> None:
        self._ops.append((_PUT_SCHEDULE, (name, definition, last, last_task)))

    def schedule_fired(self, name: str, last: float, last_task: str) -> None:
        """Journaled in the same transaction as the task it fired: never fired twice."""
        self._ops.append((_FIRED, (last, last_task, name)))

    def schedule_dropped(self, name: str) -> None:
        self._ops.append((_DELETE_SCHEDULE, (name,)))

    def schedules(self) -> Iterator[StoredSchedule]:
        for row in self._db.execute("SELECT name, definition, last, last_task FROM schedules"):
            yield StoredSchedule(*row)

    def commit(self) -> int:
        """Write every buffered change in one transaction; returns how many."""
        ops, self._ops = self._ops, []
        self._inserted.clear()
        if not ops:
            return 0
        db = self._db
        db.execute("BEGIN")
        try:
            for sql, group in _grouped(ops):
                db.executemany(sql, group)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.committed += 1
        return len(ops)

    # ------------------------------------------------------------ the disk

    def fileno(self) -> int | None:
        """A file descriptor that polls readable when a sync has ended: then call
        :meth:`synced`."""
        return self._done_r

    def sync(self) -> None:
        """Start putting every commit so far on disk, on the sync thread; if a sync
        runs already, :meth:`synced` starts the next one when it ends."""
        if self._syncing or self._synced == self.committed:
            return
        if self._sync_thread is None:
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name="zq-journal-sync", daemon=True
            )
            self._sync_thread.start()
        self._syncing = True
        self._requests.put(self.committed)

    def sync_here(self) -> bool:
        """Put every commit so far on disk in this thread, unless a sync runs on the
        sync thread (then False: wait for it). For a loop turn that read one message
        or none: the loop has nothing else to do, and the thread's two wake-ups would
        only add to that message's latency (a busy loop keeps to :meth:`sync`)."""
        if self._syncing:
            return False
        if self._failure is not None:
            raise self._failure
        if self._synced < self.committed:
            try:
                self._sync_wal()
            except OSError as exc:
                self._failure = exc  # for good: see synced()
                raise
            self._synced = self.committed
        return True

    def synced(self) -> int:
        """After :meth:`fileno` polled readable: the number of commits now on disk.
        Raises the OSError of a failed fdatasync: what was not on disk may never be
        (the page cache may have dropped it), so the broker must stop, not retry."""
        os.read(self._done_r, 4096)
        self._syncing = False
        if self._failure is not None:
            raise self._failure
        self._synced = self._reached
        self.sync()  # the commits made while that sync ran
        return self._synced

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> int:
        """Commit, then wait until every commit is on disk; returns how many are.
        Raises the OSError of a failed sync, or TimeoutError past ``timeout``."""
        self.commit()
        deadline = time.monotonic() + timeout
        while self._synced < self.committed:
            if self._failure is not None:
                raise self._failure
            self.sync()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._done_r], [], [], left)[0]:
                raise TimeoutError(f"journal {self.path}: the disk sync took over {timeout}s")
            self.synced()
        return self._synced

    def _sync_loop(self) -> None:
        """The sync thread: fdatasync the WAL file for each request, then tell the loop.
        Only the disk wait is here; SQLite itself is used by the loop's thread alone."""
        while (upto := self._requests.get()) is not None:
            try:
                self._sync_wal()
            except OSError as exc:
                self._failure = exc
            self._reached = upto
            os.write(self._done_w, b"s")

    def _sync_wal(self) -> None:
        """fdatasync the WAL file: by the sync thread while it syncs, else by the loop."""
        _datasync(self._wal_fd)

    def purge_results(self, now: float | None = None) -> int:
        """Delete results whose TTL ran out (wall clock): a scan of the table, so the
        broker runs it at start only; later it drops each result it lets go by id."""
        cur = self._db.execute("DELETE FROM results WHERE expires <= ?", (now or time.time(),))
        return cur.rowcount

    # ------------------------------------------------------------- replay

    def tasks(self) -> Iterator[StoredTask]:
        """Unfinished tasks in the order they were accepted."""
        rows = self._db.execute(
            "SELECT id, header, payload, worker, redeliveries, retries, eta, delivery FROM tasks "
            "ORDER BY rowid"
        )
        for row in rows:
            yield StoredTask(*row)

    def results(self) -> Iterator[StoredResult]:
        """Unexpired results, oldest first."""
        rows = self._db.execute(
            "SELECT id, state, header, payload, expires FROM results "
            "WHERE expires > ? ORDER BY expires",
            (time.time(),),
        )
        for row in rows:
            yield StoredResult(*row)

    def dead(self) -> Iterator[StoredTask]:
        """Dead letters, oldest first (``worker`` is None)."""
        rows = self._db.execute(
            "SELECT id, header, payload, NULL, redeliveries FROM dead ORDER BY died"
        )
        for row in rows:
            yield StoredTask(*row)

    def close(self) -> None:
        try:
            self.commit()
        finally:
            if self._sync_thread is not None:
                self._requests.put(None)
                self._sync_thread.join(FLUSH_TIMEOUT)  # a daemon: a hung disk keeps it
            os.close(self._wal_fd)
            self._db.close()  # checkpoints: the WAL and the database synced by SQLite
            os.close(self._done_r)
            os.close(self._done_w)


def _grouped(ops: list[tuple[str, Any]]) -> Iterator[tuple[str, list[Any]]]:
    """The changes as (statement, argument rows) for executemany: one group per
    statement when no row changes twice (a turn's SUBMITs and DONEs interleave, and
    changes to different rows commute); else runs of one statement, in order."""
    rows = set()
    for sql, args in ops:
        table, at = _ROW[sql]
        rows.add((table, args[at]))
    if len(rows) == len(ops):
        groups: dict[str, list[Any]] = {}
        for sql, args in ops:
            group = groups.get(sql)
            if group is None:
                groups[sql] = [args]
            else:
                group.append(args)
        yield from groups.items()
        return
    for sql, run in itertools.groupby(ops, key=lambda op: op[0]):
        yield sql, [args for _, args in run]


def _sync_file(path: str) -> None:
    """fsync the file (or directory) at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: str) -> None:
    """fsync the directory holding ``path``, so a file created there stays named."""
    if os.name != "nt":  # Windows cannot open a directory; it names files at once
        _sync_file(os.path.dirname(os.path.abspath(path)))


class NullJournal:
    """No journal (``--journal :memory:``): fast, and everything is lost in a crash."""

    durable = False
    path = ":memory:"

    def task_accepted(self, task_id: str, header: bytes, payload: bytes) -> None:
        pass

    def task_assigned(
        self, task_id: str, worker: str | None, redeliveries: int, delivery: int
    ) -> None:
        pass

    def task_finished(self, task_id: str) -> None:
        pass

    def task_retrying(self, task_id: str, retries: int, eta: float | None) -> None:
        pass

    def result_stored(
        self, task_id: str, state: str, header: bytes, payload: bytes, expires: float
    ) -> None:
        pass

    def result_dropped(self, task_id: str) -> None:
        pass

    def dead_stored(self, task_id: str, header: bytes, payload: bytes, redeliveries: int) -> None:
        pass

    def dead_dropped(self, task_id: str) -> None:
        pass

    def schedule_stored(
        self, name: str, definition: bytes, last: float | None, last_task: str | None
    ) -> None:
        pass

    def schedule_fired(self, name: str, last: float, last_task: str) -> None:
        pass

    def schedule_dropped(self, name: str) -> None:
        pass

    def schedules(self) -> Iterator[StoredSchedule]:
        return iter(())

    committed = 0

    def commit(self) -> int:
        return 0

    def fileno(self) -> int | None:
        return None

    def sync(self) -> None:
        pass

    def sync_here(self) -> bool:
        return True

    def synced(self) -> int:
        return 0

    def flush(self) -> int:
        return 0

    def purge_results(self, now: float | None = None) -> int:
        return 0

    def tasks(self) -> Iterator[StoredTask]:
        return iter(())

    def results(self) -> Iterator[StoredResult]:
        return iter(())

    def dead(self) -> Iterator[StoredTask]:
        return iter(())

    def close(self) -> None:
        pass


def open_journal(path: str | None) -> Journal | NullJournal:
    """``None`` or ``":memory:"`` -> no journal; anything else is a file path."""
    if path in (None, "", ":memory:"):
        return NullJournal()
    return Journal(path)


def default_journal_path(bind: str) -> str:
    """``$ZQ_DATA_DIR`` (else ``$XDG_DATA_HOME/zq``, else ``~/.local/share/zq``), one
    file per broker port so that two brokers on one machine never share a journal."""
    base = os.environ.get("ZQ_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "zq"
    )
    port = bind.rpartition(":")[2]
    name = f"journal-{port}.db" if port.isdigit() else "journal.db"
    return os.path.join(base, name)
