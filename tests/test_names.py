"""A task goes only to a worker that registered its name (workers of different apps
on one queue); one that no connected worker has waits, and the broker says so."""

from __future__ import annotations

import re

import pytest

import zq
from tests import tasks
from tests.conftest import wait_for_workers
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def test_each_task_goes_only_to_a_worker_of_its_app(app, start_worker):
    mine = start_worker("tests.tasks")
    other = start_worker("tests.other_tasks")
    whoami = [tasks.whoami.delay() for _ in range(20)]
    pings = [app.send_task("tests.other_tasks.ping") for _ in range(20)]
    assert {r.get(timeout=20)["worker"] for r in whoami} == {mine.pid}
    assert {r.get(timeout=20)["worker"] for r in pings} == {other.pid}
    assert app.status()["counters"].get("unknown_task", 0) == 0


def test_a_task_no_worker_has_waits_and_is_named_in_status(app, broker, start_worker):
    start_worker("tests.tasks")
    res = app.send_task("tests.other_tasks.ping")
    with pytest.raises(zq.TimeoutError, match="no connected worker serves task"):
        res.get(timeout=1)
    assert res.status == "QUEUED"
    status = app.status()
    assert status["unserved"] == [
        {"queue": "default", "name": "tests.other_tasks.ping", "waiting": 1}
    ]
    pattern = re.compile(r"no connected worker serves task tests\.other_tasks\.ping")
    broker.read_until(pattern, 10)
    other = start_worker("tests.other_tasks")
    assert res.get(timeout=20)["worker"] == other.pid
    assert app.status()["unserved"] == []


def test_a_queue_no_worker_serves_is_named_when_a_get_times_out(app, start_worker):
    start_worker("tests.tasks")  # serves "default" only
    res = tasks.add.apply_async(args=(2, 4), queue="celery")
    with pytest.raises(zq.TimeoutError, match=r"waits in queue 'celery'.*--queues celery"):
        res.get(timeout=1)


def test_a_worker_that_answers_unknown_task_hands_it_back_and_gets_no_more(
    app, broker, start_worker
):
    """Its READY lists the name, but its pool's children lack it: each such task comes
    back unrun (not a failure, not a redelivery) and goes to a worker that has it;
    the broker sends the first worker no more of that name."""
    vanishing = start_worker("tests.vanishing_tasks", concurrency=2)
    first = [app.send_task("shared.vanish") for _ in range(4)]
    wait_for(lambda: app.status()["counters"].get("unknown_task", 0) >= 1, 20, "a hand-back")
    assert app.status()["unserved"][0]["name"] == "shared.vanish"
    other = start_worker("tests.other_tasks", concurrency=2)
    assert {r.get(timeout=20)["worker"] for r in first} == {other.pid}
    handed_back = app.status()["counters"]["unknown_task"]
    assert handed_back <= 2  # at most the slots it had when it first answered
    more = [app.send_task("shared.vanish") for _ in range(10)]
    assert {r.get(timeout=20)["worker"] for r in more} == {other.pid}
    status = app.status()
    assert status["counters"]["unknown_task"] == handed_back
    assert status["counters"].get("redelivered", 0) == 0
    # It still runs what it does have.
    here = app.send_task("tests.vanishing_tasks.here").get(timeout=20)
    assert here != other.pid
    wait_for_workers(broker.endpoint, lambda pids: vanishing.pid in pids)
