"""Time: countdown and ETA held by the broker, expiry, priorities within a queue."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import zq
from tests import tasks
from tests.conftest import wait_for_workers
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def test_countdown_holds_the_task_in_the_broker(app, start_worker):
    start_worker(pool="thread")
    sent = time.time()
    res = tasks.stamp.apply_async(("late",), countdown=1.5)
    wait_for(lambda: res.status == "QUEUED", 5, "accepted and held for its ETA")
    _, ran = res.get(timeout=10)
    assert ran - sent >= 1.5


def test_countdown_and_expires_as_timedeltas(app, start_worker):
    start_worker(pool="thread")
    sent = time.time()
    res = tasks.stamp.apply_async(
        ("td",), countdown=dt.timedelta(seconds=0.5), expires=dt.timedelta(minutes=1)
    )
    _, ran = res.get(timeout=10)
    assert ran - sent >= 0.5


def test_eta_as_a_datetime(app, start_worker):
    start_worker(pool="thread")
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    _, ran = tasks.stamp.apply_async(("eta",), eta=eta).get(timeout=10)
    assert ran >= eta.timestamp()


def test_a_scheduled_task_survives_a_broker_restart(app, broker, start_worker):
    sent = time.time()
    res = tasks.stamp.apply_async(("restart",), countdown=2.0)
    wait_for(lambda: res.status == "QUEUED", 5, "accepted")
    broker.kill()
    broker.restart()
    worker = start_worker(pool="thread", wait=False)
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids)
    _, ran = res.get(timeout=15)
    assert ran - sent >= 2.0, "not run before its ETA after the restart"


def test_expires_ends_a_queued_task_expired(app, start_worker):
    # No worker serves this queue: the task waits until its expiry time passes.
    res = tasks.stamp.apply_async(("never",), queue="nobody", expires=0.5)
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=10)
    assert info.value.exc_type == "zq.Expired"
    assert res.status == "EXPIRED"


def test_expires_does_not_stop_a_task_that_started(app, start_worker):
    start_worker(pool="thread", concurrency=1)
    assert tasks.sleep.apply_async((1.0,), expires=0.3).get(timeout=10) == 1.0


def test_expired_before_its_eta(app, start_worker):
    start_worker(pool="thread")
    res = tasks.stamp.apply_async(("x",), countdown=1.0, expires=0.2)
    with pytest.raises(zq.TaskFailed, match=r"zq\.Expired"):
        res.get(timeout=10)


def test_higher_priority_waiting_tasks_start_first(app, start_worker):
    start_worker(pool="thread", concurrency=1)
    blocker = tasks.sleep.delay(1.0)  # holds the only slot while the others queue up
    low = [tasks.stamp.apply_async((f"low{i}",), priority=0) for i in range(3)]
    mid = [tasks.stamp.apply_async((f"mid{i}",), priority=5) for i in range(3)]
    high = [tasks.stamp.apply_async((f"high{i}",), priority=9) for i in range(3)]
    blocker.get(timeout=10)
    runs = sorted((r.get(timeout=10) for r in low + mid + high), key=lambda run: run[1])
    order = [label for label, _ in runs]
    assert order == ["high0", "high1", "high2", "mid0", "mid1", "mid2", "low0", "low1", "low2"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"countdown": -1}, "countdown"),
        ({"countdown": float("nan")}, "countdown"),
        ({"countdown": 1, "eta": dt.datetime.now()}, "not both"),
        ({"eta": 12.0}, "datetime"),
        ({"expires": "soon"}, "expires"),
    ],
)
def test_bad_time_options_are_refused_in_the_caller(app, options, message):
    with pytest.raises(ValueError, match=message):
        tasks.add.apply_async((1, 2), **options)
