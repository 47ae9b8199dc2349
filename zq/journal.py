"""The broker's journal: the state that must survive a crash, in SQLite (WAL mode).

What is kept: every accepted task not yet finished (its header, payload, and the
worker it was last handed to), and results until their TTL. Changes are buffered
while the broker's loop turn runs and written in one transaction by :meth:`commit`
(group commit); the broker sends its replies (ACCEPTED, TASK, results) only after
that commit, so nothing a peer was told about can be missing after a crash.

One broker owns a journal file at a time: the database is opened in exclusive locking
mode, so a second broker on the same file fails at start instead of corrupting it.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zq.journal")

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
        self._db.execute("PRAGMA synchronous=FULL")  # ACCEPTED survives a power cut too
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            self._db.executescript(_SCHEMA)  # also takes the exclusive lock
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise RuntimeError(f"journal {path} is in use by another broker ({exc})") from None
        self._ops: list[tuple[str, Any]] = []
        self._inserted: dict[str, list[Any]] = {}  # rows inserted in this transaction

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
            for sql, group in itertools.groupby(ops, key=lambda op: op[0]):
                db.executemany(sql, [args for _, args in group])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(ops)

    def purge_results(self, now: float | None = None) -> int:
        """Delete results whose TTL ran out (wall clock)."""
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
        self.commit()
        self._db.close()


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

    def commit(self) -> int:
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
