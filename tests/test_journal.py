"""The journal's rows, written and read back through SQLite (no broker needed)."""

from __future__ import annotations

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
