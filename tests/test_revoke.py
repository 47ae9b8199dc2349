"""Revoke: waiting tasks never run; terminate stops exactly the run it names."""

from __future__ import annotations

import os
import signal
import time

import pytest

import zq
from tests import tasks
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_revoke_a_queued_task(app, start_worker, tmp_path):
    start_worker(concurrency=1, pool="thread")
    blocker = tasks.sleep.delay(2.0)
    victim = tasks.stamp.delay("victim")
    after = tasks.stamp.delay("after")
    wait_for(lambda: victim.status == "QUEUED", 5, "victim queued")
    assert victim.revoke() == "revoked"
    with pytest.raises(zq.TaskFailed) as info:
        victim.get(timeout=5)
    assert info.value.exc_type == "zq.Revoked"
    assert victim.status == "REVOKED"
    assert blocker.get(timeout=10) == 2.0
    assert after.get(timeout=10)[0] == "after"
    assert victim.revoke() == "finished"


def test_revoke_a_scheduled_task(app):
    res = tasks.stamp.apply_async(("later",), countdown=30)
    wait_for(lambda: res.status == "QUEUED", 5, "accepted")
    assert res.revoke() == "revoked"
    assert res.status == "REVOKED"


def test_revoking_a_keyed_lane_head_lets_the_key_go_on(app, start_worker, tmp_path):
    start_worker(concurrency=1, pool="thread")
    first = tasks.keyed.delay("k", 1, 2.0, str(tmp_path))
    second = tasks.keyed.delay("k", 2, 0.0, str(tmp_path))
    third = tasks.keyed.delay("k", 3, 0.0, str(tmp_path))
    wait_for(lambda: second.status == "QUEUED", 5, "second queued behind the first")
    assert second.revoke() == "revoked"
    first.get(timeout=10)
    third.get(timeout=10)
    assert sorted(r["seq"] for r in tasks.read_records(tmp_path)) == [1, 3]


def test_revoke_without_terminate_lets_a_running_task_finish(app, start_worker, tmp_path):
    start_worker(concurrency=1)
    res = tasks.pid_sleep.delay(3.0, str(tmp_path / "pid"))
    wait_for(lambda: res.status == "STARTED", 10, "started")
    assert res.revoke() == "running"
    assert res.get(timeout=10) > 0


def test_revoke_terminate_kills_the_process_running_the_task(app, start_worker, tmp_path):
    start_worker(concurrency=2)
    pid_file = tmp_path / "pid"
    bystander = tasks.sleep.delay(1.5)  # on the other child: must not be touched
    res = tasks.pid_sleep.delay(60, str(pid_file))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 15, "the long task started")
    pid = int(pid_file.read_text())
    started = time.monotonic()
    assert res.revoke(terminate=True) == "terminating"
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=10)
    assert time.monotonic() - started < 5
    assert info.value.exc_type == "zq.Revoked"
    assert f"pid {pid}" in info.value.exc_message
    assert res.status == "REVOKED"
    wait_for(lambda: not _alive(pid), 5, "the child process is gone")
    assert bystander.get(timeout=10) == 1.5
    # The slot is back: the worker runs the next task in a fresh child.
    assert tasks.add.delay(2, 3).get(timeout=15) == 5


def test_revoke_unknown_and_many(app, start_worker):
    start_worker(pool="thread")
    done = tasks.add.delay(1, 1)
    done.get(timeout=10)
    outcomes = app.revoke([done.id, "no-such-task"])
    assert outcomes == {done.id: "finished", "no-such-task": "unknown"}


def test_terminate_reaches_a_run_held_over_a_broker_restart(app, broker, start_worker, tmp_path):
    start_worker(concurrency=1)
    pid_file = tmp_path / "pid"
    res = tasks.pid_sleep.delay(60, str(pid_file))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 15, "the long task started")
    broker.kill()
    broker.restart()
    # Asked at once: the worker may not have re-attached the run yet (a placeholder
    # holds it); the broker remembers the terminate and tells it when it does.
    assert res.revoke(terminate=True) == "terminating"
    with pytest.raises(zq.TaskFailed, match=r"zq\.Revoked"):
        res.get(timeout=20)
    wait_for(lambda: not _alive(int(pid_file.read_text())), 5, "the child process is gone")


def test_a_terminated_task_handed_back_does_not_run_again(app, start_worker, tmp_path):
    """Its worker is lost before it reads the REVOKE: the task is handed back, and
    ends REVOKED instead of starting again on the other worker."""
    pid_file = tmp_path / "pid"
    first = start_worker(concurrency=1, pool="thread")
    res = tasks.pid_sleep.delay(60, str(pid_file))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 15, "the long task started")
    start_worker(concurrency=1, pool="thread")
    first.signal(signal.SIGSTOP)  # frozen: it never reads the REVOKE, and is declared dead
    assert res.revoke(terminate=True) == "terminating"
    with pytest.raises(zq.TaskFailed, match=r"zq\.Revoked"):
        res.get(timeout=20)
    assert int(pid_file.read_text()) == first.pid, "the task did not start on the other worker"
    first.signal(signal.SIGCONT)
