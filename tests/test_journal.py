"""The journal's rows, written and read back through SQLite, and the broker's wait
for the disk."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import zmq

from tests.test_bad_input import RawPeer, submit, task_header
from zq import journal as journal_module
from zq import protocol as p
from zq.broker import Broker, BrokerSettings
from zq.journal import Journal
from zq.testing import wait_for


def test_accepted_and_assigned_in_one_transaction_is_one_row_with_its_worker(tmp_path):
    journal = Journal(str(tmp_path / "j.db"))
    journal.task_accepted("a", b"h", b"p")
    journal.task_assigned("a", "w1", 0, 1)
    journal.task_assigned("a", "w2", 1, 2)  # handed on within the same turn
    journal.task_accepted("b", b"h", b"p")  # waits: no worker
    assert journal.commit() == 2  # two INSERTs; the assignments went into the first
    journal.task_assigned("b", "w1", 0, 1)  # a later turn: an UPDATE
    journal.commit()
    rows = {t.id: (t.worker, t.redeliveries, t.delivery) for t in journal.tasks()}
    assert rows == {"a": ("w2", 1, 2), "b": ("w1", 0, 1)}
    journal.close()
    reopened = Journal(str(tmp_path / "j.db"))
    assert [t.id for t in reopened.tasks()] == ["a", "b"]
    reopened.close()


def test_a_row_changed_twice_in_one_transaction_keeps_its_order(tmp_path):
    """Changes to different rows are grouped per statement; a row changed twice in a
    transaction (a dead letter re-queued in the turn it died) keeps the order."""
    journal = Journal(str(tmp_path / "j.db"))
    journal.task_accepted("a", b"h", b"p")
    journal.commit()
    journal.task_accepted("b", b"h", b"p")
    journal.task_finished("a")  # died...
    journal.result_stored("a", "DEAD", b"h", b"", 2e9)
    journal.task_accepted("c", b"h", b"p")
    journal.result_dropped("a")  # ...and re-queued in the same turn
    journal.task_accepted("a", b"h", b"p")
    journal.commit()
    assert [t.id for t in journal.tasks()] == ["b", "c", "a"]
    assert list(journal.results()) == []
    journal.task_finished("b")  # no row twice: one statement per kind, still right
    journal.result_stored("b", "SUCCESS", b"h", b"r", 2e9)
    journal.task_finished("c")
    journal.result_stored("c", "SUCCESS", b"h", b"r", 2e9)
    journal.commit()
    assert [t.id for t in journal.tasks()] == ["a"]
    assert sorted(r.id for r in journal.results()) == ["b", "c"]
    journal.close()


def test_flush_waits_until_every_commit_is_synced(tmp_path):
    journal = Journal(str(tmp_path / "j.db"))
    assert journal.flush() == 0  # nothing committed, nothing to wait for
    journal.task_accepted("a", b"h", b"p")
    assert journal.commit() == 1
    journal.sync()
    journal.task_accepted("b", b"h", b"p")  # committed while that sync runs
    assert journal.flush() == journal.committed == 2
    journal.close()


class _SlowDisk:
    """Stands in for fdatasync: the n-th call waits for ``gates[n]`` (if any), then
    syncs; records which thread called."""

    def __init__(self, gates: int) -> None:
        self.gates = [threading.Event() for _ in range(gates)]
        self.callers: list[str] = []
        self._sync = journal_module._datasync

    def __call__(self, fd: int) -> None:
        n = len(self.callers)
        self.callers.append(threading.current_thread().name)
        if n < len(self.gates):
            self.gates[n].wait(20)
        self._sync(fd)

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


@pytest.fixture
def slow_disk_broker(tmp_path, monkeypatch):
    """An embedded broker whose journal's disk syncs wait at gates, and a raw peer:
    (the disk, the peer, the broker)."""
    settings = BrokerSettings(bind="tcp://127.0.0.1:*", journal=str(tmp_path / "j.db"))
    broker = Broker(settings).start()
    disk = _SlowDisk(gates=2)  # from now on: the journal syncs once at start too
    monkeypatch.setattr(journal_module, "_datasync", disk)
    ctx = zmq.Context()
    peer = RawPeer(ctx, broker.endpoint)
    try:
        yield disk, peer, broker
    finally:
        disk.open_all()
        peer.close()
        ctx.term()
        broker.stop()


def _accepted(peer: RawPeer) -> list[str]:
    command, header = peer.recv_broker()
    assert command == p.ACCEPTED
    return header["ids"]


def test_replies_wait_until_the_commit_is_on_disk(slow_disk_broker):
    """The broker says ACCEPTED only once the task is on disk, whether the loop waits
    for the disk itself (a turn that read one message) or its sync thread does (a
    turn that read more, while the loop goes on)."""
    disk, peer, _ = slow_disk_broker
    peer.send(submit([task_header("t1")], p.encode([[1, 2], {}])))
    wait_for(lambda: len(disk.callers) == 1, 10, "the first sync")
    peer.send(submit([task_header("t2")], p.encode([[1, 2], {}])))
    peer.send(submit([task_header("t3")], p.encode([[1, 2], {}])))
    peer.expect_nothing(300)  # t2 and t3 wait in the broker's queue meanwhile
    disk.gates[0].set()
    assert _accepted(peer) == ["t1"]
    wait_for(lambda: len(disk.callers) == 2, 10, "the second sync")
    assert disk.callers == ["zq-broker", "zq-journal-sync"]
    peer.expect_nothing(300)
    disk.gates[1].set()
    assert _accepted(peer) + _accepted(peer) == ["t2", "t3"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
def test_the_wal_synced_is_sqlites_even_through_a_symlink(tmp_path, monkeypatch):
    """SQLite puts the WAL next to the file a symbolic link points to: that is the
    file to sync, not one named after the link (which does not exist)."""
    synced: list[str] = []
    sync = journal_module._datasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        sync(fd)

    monkeypatch.setattr(journal_module, "_datasync", recording)
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data" / "real.db", tmp_path / "link.db")
    journal = Journal(str(tmp_path / "link.db"))
    wal = str(tmp_path / "data" / "real.db") + "-wal"
    # At start too: a previous broker's commits may be in the page cache only.
    assert synced == [wal]
    journal.task_accepted("a", b"h", b"p")
    assert journal.flush() == 1
    journal.close()
    assert synced == [wal, wal]


@pytest.mark.parametrize("on_thread", [False, True], ids=["inline", "sync-thread"])
def test_a_failed_disk_sync_stops_the_broker_and_nothing_is_sent(
    on_thread, slow_disk_broker, monkeypatch
):
    """fdatasync failing (EIO) means the commit may never reach the disk: the broker
    stops instead of replying, and does not hang on its way out, whether the loop or
    its sync thread met the failure."""
    disk, peer, broker = slow_disk_broker
    raised: list[BaseException | None] = []  # what ended the broker's thread
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    sync = disk._sync

    def broken(fd: int) -> None:  # the first sync is the loop's own (one message read)
        if on_thread and threading.current_thread().name != "zq-journal-sync":
            sync(fd)
            return
        raise OSError(errno.EIO, "simulated disk error")

    disk._sync = broken
    peer.send(submit([task_header("t1")], p.encode([[1, 2], {}])))
    wait_for(lambda: len(disk.callers) == 1, 10, "the first sync")
    if on_thread:  # two more while the loop waits: the next turn reads both
        peer.send(submit([task_header("t2")], p.encode([[1, 2], {}])))
        peer.send(submit([task_header("t3")], p.encode([[1, 2], {}])))
        peer.expect_nothing(300)
    disk.gates[0].set()
    if on_thread:
        assert _accepted(peer) == ["t1"]
        wait_for(lambda: len(disk.callers) == 2, 10, "the second sync")
        assert disk.callers[1] == "zq-journal-sync"
        disk.gates[1].set()
    wait_for(lambda: not broker._thread.is_alive(), 10, "the broker to stop")
    peer.expect_nothing(300)
    assert [getattr(exc, "errno", None) for exc in raised] == [errno.EIO]


def test_an_embedded_broker_bound_first_then_started_opens_its_journal_once(tmp_path):
    """bind() (to learn the endpoint) then start(): start() used to bind again, and the
    second open of the journal failed ("database is locked")."""
    settings = BrokerSettings(bind="tcp://127.0.0.1:*", journal=str(tmp_path / "j.db"))
    broker = Broker(settings)
    endpoint, _ = broker.bind()
    broker.start()
    ctx = zmq.Context()
    peer = RawPeer(ctx, endpoint)
    try:
        peer.send(submit([task_header("t1")], p.encode([[1, 2], {}])))
        assert _accepted(peer) == ["t1"]
    finally:
        peer.close()
        ctx.term()
        broker.stop()
