"""Time limits and child recycling, enforced by the worker supervisor."""

from __future__ import annotations

import time

import pytest

import zq
from tests import tasks


def test_soft_limit_raises_inside_the_task(app, start_worker):
    start_worker(concurrency=2)
    assert tasks.soft_limited.delay(True).get(timeout=10) == "cleaned up"
    with pytest.raises(zq.TaskFailed) as info:
        tasks.soft_limited.delay(False).get(timeout=10)
    assert info.value.exc_type == "zq.errors.SoftTimeLimitExceeded"


def test_hard_limit_kills_the_process_and_fails_the_task(app, start_worker):
    start_worker(concurrency=1)
    first_pid = tasks.whoami.delay().get(timeout=10)["pid"]
    started = time.monotonic()
    with pytest.raises(zq.TaskFailed) as info:
        tasks.hard_limited.delay(60).get(timeout=15)
    assert time.monotonic() - started < 5
    assert info.value.exc_type == "zq.TimeLimitExceeded"
    assert "hard time limit (1s)" in info.value.exc_message
    # The killed child was replaced; the worker keeps serving.
    assert tasks.whoami.delay().get(timeout=10)["pid"] != first_pid
    assert app.status()["counters"].get("redelivered", 0) == 0


def test_worker_wide_time_limit(app, start_worker):
    start_worker(concurrency=1, extra=["--time-limit", "0.5"])
    with pytest.raises(zq.TaskFailed, match="hard time limit"):
        tasks.sleep.delay(30).get(timeout=10)


@pytest.mark.parametrize("broker", [("--heartbeat", "20")], indirect=True)
def test_a_hard_limit_is_not_late_with_a_long_heartbeat(app, start_worker):
    """The supervisor polls for a quarter heartbeat (5 s here) when nothing happens: it
    must wake for a hard time limit instead (it used to kill the child up to 5 s late)."""
    start_worker(concurrency=1, extra=["--time-limit", "0.5"])
    assert tasks.add.delay(1, 1).get(timeout=10) == 2  # the child is up
    started = time.monotonic()
    with pytest.raises(zq.TaskFailed, match="hard time limit"):
        tasks.sleep.delay(30).get(timeout=10)
    assert time.monotonic() - started < 2.5


def test_max_tasks_per_child_recycles_processes(app, start_worker):
    start_worker(concurrency=1, extra=["--max-tasks-per-child", "2"])
    pids = [tasks.whoami.delay().get(timeout=10)["pid"] for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_max_memory_per_child_recycles_processes(app, start_worker):
    start_worker(concurrency=1, extra=["--max-memory-per-child", "80"])
    small = tasks.hog.delay(1).get(timeout=10)
    assert tasks.hog.delay(1).get(timeout=10) == small
    big = tasks.hog.delay(120).get(timeout=20)
    assert big == small  # the task that grew the process still ran in it...
    assert tasks.hog.delay(1).get(timeout=10) != big  # ...which was replaced after


def test_a_child_killed_while_it_reports_progress_leaves_the_worker_serving(app, start_worker):
    """The hard limit kills a child whose pipe has just polled readable (a progress
    report); its replacement may reuse the fd number, and has nothing to say: the
    supervisor must not block reading it (it did: the worker then hung for good)."""
    start_worker(concurrency=1, extra=["--time-limit", "0.5"])
    for _ in range(5):
        with pytest.raises(zq.TaskFailed, match="hard time limit"):
            tasks.progressing.delay(100_000, 0.001).get(timeout=10)  # reports all along
        assert tasks.add.delay(1, 2).get(timeout=10) == 3


def test_recycled_children_take_no_task_to_their_exit(app, start_worker):
    """With tasks queued, a child at its max-tasks-per-child must not be given another
    task to die with: that came back LOST, counted as a crash, and made dead letters."""
    start_worker(concurrency=2, extra=["--max-tasks-per-child", "1"])
    results = [tasks.whoami.delay() for _ in range(40)]
    pids = [r.get(timeout=60)["pid"] for r in results]
    assert len(set(pids)) == 40, "a child ran more than its one task"
    counters = app.status()["counters"]
    assert counters.get("redelivered", 0) == 0 and counters.get("dead", 0) == 0


def test_a_recycled_child_leaves_even_if_its_task_left_a_thread_running(app, start_worker):
    """A task that leaves a non-daemon thread behind must not keep a retiring child
    alive, holding its slot with no task (and no time limit) while work waits."""
    start_worker(concurrency=1, extra=["--max-tasks-per-child", "1"])
    first = tasks.linger.delay(120).get(timeout=10)
    assert tasks.whoami.delay().get(timeout=10)["pid"] != first
