"""End to end through real broker and worker processes: the Celery-style API."""

from __future__ import annotations

import subprocess
import sys

import pytest

import zq
from tests import tasks
from zq.testing import wait_for


def test_delay_get_returns_the_value(app, start_worker):
    start_worker()
    res = tasks.add.delay(1, 4)
    assert res.get(timeout=10) == 5
    assert res.status == "SUCCESS"
    assert res.ready() and res.successful()


def test_status_goes_queued_started_success(app, start_worker):
    res = tasks.sleep.delay(0.5)
    # No worker yet: accepted and waiting.
    wait_for(lambda: res.status == "QUEUED", 5, "QUEUED")
    start_worker()
    wait_for(lambda: res.status == "STARTED", 10, "STARTED")
    assert res.get(timeout=10) == 0.5
    assert res.status == "SUCCESS"


def test_failure_carries_remote_type_message_and_traceback(app, start_worker):
    start_worker()
    res = tasks.fail.delay("card declined")
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=10)
    assert info.value.exc_type == "ValueError"
    assert info.value.exc_message == "card declined"
    assert "raise ValueError(message)" in info.value.remote_traceback
    assert res.status == "FAILURE"
    assert isinstance(res.get(timeout=1, propagate=False), zq.TaskFailed)


def test_unknown_task_waits_with_a_clear_message(app, start_worker):
    """A name no worker registers is not failed by a worker that lacks it: it waits
    for one that has it, and a get() that runs out says so."""
    start_worker()
    res = app.send_task("tests.tasks.no_such_task", [1])
    with pytest.raises(zq.TimeoutError, match="no connected worker serves task"):
        res.get(timeout=1)


def test_unencodable_result_is_a_failure(app, start_worker):
    start_worker()
    with pytest.raises(zq.TaskFailed, match="return value"):
        tasks.unencodable.delay().get(timeout=10)


def test_unencodable_argument_raises_type_error_in_the_caller():
    with pytest.raises(TypeError, match="cannot encode"):
        tasks.add.delay(object(), 1)


def test_get_times_out_with_zq_timeout_error(app):
    res = tasks.add.delay(1, 2)  # no worker: it stays queued
    with pytest.raises(zq.TimeoutError):
        res.get(timeout=0.3)
    assert isinstance(zq.TimeoutError("x"), TimeoutError)


def test_thread_pool(app, start_worker):
    start_worker(pool="thread", concurrency=4)
    results = [tasks.add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=10) for r in results] == [2 * i for i in range(20)]


def test_named_queues_route_to_their_workers(app, start_worker):
    res = tasks.other_queue.delay()
    start_worker()  # serves "default" only
    with pytest.raises(zq.TimeoutError):
        res.get(timeout=0.5)
    start_worker(queues=("other",))
    assert res.get(timeout=10) == "other"
    res2 = tasks.add.apply_async(args=(2, 3), queue="other")
    assert res2.get(timeout=10) == 5


def test_async_result_by_id_from_another_process(app, broker, start_worker):
    """A process submits and exits; this one gets the result by id alone."""
    code = (
        "import sys; from tests import tasks; tasks.app.broker = sys.argv[1]; "
        "print(tasks.add.delay(20, 22).id)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, broker.endpoint],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    task_id = out.stdout.strip()
    start_worker()
    assert app.AsyncResult(task_id).get(timeout=10) == 42
    assert app.AsyncResult(task_id).status == "SUCCESS"


def test_unknown_id_is_pending(app):
    assert app.AsyncResult("no-such-id").status == "PENDING"
