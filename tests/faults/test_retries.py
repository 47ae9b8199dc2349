"""Retries: decided by the task's policy in the worker, delays held by the broker."""

from __future__ import annotations

import datetime
import signal

import pytest

import zq
from tests import tasks
from tests.conftest import wait_for_workers
from tests.tasks import read_records
from zq.testing import check_key_records, wait_for


def test_autoretry_until_success(app, start_worker, tmp_path):
    start_worker()
    assert tasks.flaky.delay(str(tmp_path / "n"), 2).get(timeout=15) == 3
    assert app.status()["counters"]["retried"] == 2


def test_autoretry_gives_up_after_the_allowed_retries(app, start_worker, tmp_path):
    start_worker()
    with pytest.raises(zq.TaskFailed) as info:
        tasks.flaky.delay(str(tmp_path / "n"), 10).get(timeout=15)
    assert info.value.exc_type == "ConnectionError"
    assert "gave up after 2 retries" in info.value.exc_message


def test_retry_countdown_is_held_and_the_key_keeps_its_order(app, start_worker, tmp_path):
    start_worker(concurrency=2)
    first = tasks.retry_once.delay("k", 1, str(tmp_path), 1.0)
    second = tasks.keyed.delay("k", 2, 0.0, str(tmp_path))
    wait_for(lambda: first.status == "RETRY", 10, "RETRY state")
    assert first.get(timeout=15) == "second run"
    second.get(timeout=10)
    runs = sorted(read_records(tmp_path), key=lambda r: r["start"])
    assert [r["seq"] for r in runs] == [1, 1, 2], "the key's next task waited for the retry"
    assert runs[1]["start"] - runs[0]["end"] >= 0.9, "the countdown was respected"
    assert check_key_records(runs) == []


def test_a_retry_outlives_its_worker_and_a_broker_restart(app, broker, start_worker, tmp_path):
    victim = start_worker(concurrency=1)
    res = tasks.retry_once.delay("k", 1, str(tmp_path), 3.0)
    wait_for(lambda: res.status == "RETRY", 10, "RETRY state")
    victim.signal(signal.SIGKILL)  # the delay is the broker's: losing the worker is fine
    broker.kill()
    broker.restart()  # ...and the journal keeps the delay across a restart
    survivor = start_worker(concurrency=1, wait=False)
    wait_for_workers(broker.endpoint, lambda pids: survivor.pid in pids)
    assert res.get(timeout=20) == "second run"


def test_a_retry_the_broker_cannot_hold_fails_the_task_and_frees_its_key(
    app, start_worker, tmp_path
):
    start_worker()
    # Ten years: longer than the broker holds a retry (7 days).
    res = tasks.retry_once.delay("k", 1, str(tmp_path), 10 * 365 * 86400.0)
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=15)
    assert info.value.exc_type == "ValueError"
    assert "at most 604800 seconds" in info.value.exc_message
    assert tasks.keyed.delay("k", 2, 0.0, str(tmp_path)).get(timeout=10) is not None


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"retry_delay": -1}, "retry_delay must be >= 0"),
        ({"retry_delay": 8 * 86400}, "retry_delay must be at most"),
        ({"retry_backoff_max": float("inf")}, "retry_backoff_max must be a number"),
        ({"retry_backoff": "fast"}, "retry_backoff must be a number"),
        ({"retries": -1}, "retries must be a whole number"),
        ({"retries": 2.5}, "retries must be a whole number"),
    ],
)
def test_a_retry_policy_the_broker_could_not_hold_is_refused_when_the_task_is_made(
    options, pattern
):
    app = zq.App("policies")
    with pytest.raises(ValueError, match=pattern):
        app.task(lambda: None, name="bad", **options)


def test_retry_delays_may_be_timedeltas():
    task = zq.App("policies").task(
        lambda: None,
        name="td",
        retry_delay=datetime.timedelta(seconds=2),
        retry_backoff=datetime.timedelta(seconds=3),
        retry_backoff_max=datetime.timedelta(minutes=1),
    )
    assert (task.retry.delay, task.retry.backoff, task.retry.backoff_max) == (2.0, 3.0, 60.0)


def test_a_worker_whose_pool_cannot_load_the_app_hands_its_tasks_back_and_stops(
    broker, start_worker
):
    bad = start_worker("tests.slow_boot", concurrency=2, env={"ZQ_TEST_CHILD_BOOT": "fail"})
    good = start_worker("tests.slow_boot", concurrency=1, pool="thread")
    app = zq.App("boot", broker=broker.endpoint)
    try:
        results = [app.send_task("tests.slow_boot.size", [b"x" * n]) for n in range(6)]
        assert [r.get(timeout=30) for r in results] == list(range(6))
        wait_for(lambda: bad.proc.poll() is not None, 30, "the worker to stop")
        assert bad.proc.returncode == 1
        assert any("the worker stopped: 5 in a row" in line for line in bad.output)
        assert good.proc.poll() is None
    finally:
        app.close()
