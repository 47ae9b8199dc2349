"""Progress: reported by the task, kept by the broker, seen by any client."""

from __future__ import annotations

import pytest

import zq
from tests import tasks
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_progress_reaches_the_client(app, start_worker, tmp_path, pool):
    start_worker(pool=pool)
    gate = tmp_path / "gate"
    res = tasks.progressing.delay(5, 0.06, str(gate))
    # The last report (5 of 5) is always sent, and the task then waits at the gate.
    wait_for(lambda: (res.progress or {}).get("done") == 5, 15, "the last progress report")
    assert res.progress == {"done": 5, "total": 5, "note": "step 5"}
    assert res.status == "STARTED"
    # Another process (here: another client) sees it too, through the broker.
    other = zq.App("other", broker=app.broker)
    try:
        assert other.AsyncResult(res.id).progress == {"done": 5, "total": 5, "note": "step 5"}
    finally:
        other.close()
    gate.touch()
    assert res.get(timeout=10) == 5


def test_current_task_outside_a_task():
    with pytest.raises(zq.ZQError, match="only available inside a running task"):
        zq.current_task()


def test_progress_rejects_non_numbers():
    from zq.context import TaskContext

    context = TaskContext({"id": "x"}, report=lambda info: None)
    with pytest.raises(ValueError, match="done"):
        context.progress("half")
    with pytest.raises(ValueError, match="total"):
        context.progress(1, "ten")
