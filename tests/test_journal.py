"""The journal's rows, written and read back through SQLite, and the broker's wait
for the disk."""

from __future__ import annotations

import threading

import zmq

from tests.test_bad_input import RawPeer, submit, task_header
from zq import journal as journal_module
from zq import protocol as p
from zq.broker import Broker, BrokerSettings
from zq.journal import Journal


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


def test_replies_wait_until_the_commit_is_on_disk(tmp_path, monkeypatch):
    """The broker says ACCEPTED only once the task is on disk: with the disk's sync
    held back, a SUBMIT gets no reply; released, the ACCEPTED comes."""
    gate = threading.Event()
    synced = journal_module._datasync

    def slow_disk(fd: int) -> None:
        gate.wait(20)
        synced(fd)

    monkeypatch.setattr(journal_module, "_datasync", slow_disk)
    settings = BrokerSettings(bind="tcp://127.0.0.1:*", journal=str(tmp_path / "j.db"))
    broker = Broker(settings).start()
    ctx = zmq.Context()
    peer = RawPeer(ctx, broker.endpoint)
    try:
        peer.send(submit([task_header("t1")], p.encode([[1, 2], {}])))
        peer.expect_nothing(300)
        gate.set()
        command, header = peer.recv_broker()
        assert (command, header["ids"]) == (p.ACCEPTED, ["t1"])
    finally:
        gate.set()
        peer.close()
        ctx.term()
        broker.stop()
