"""Failure recovery with real processes: worker SIGKILL and SIGSTOP, broker restart.

Default heartbeat settings (1 s, dead after 3 missed), as users run them.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests import tasks
from tests.conftest import wait_for_workers
from tests.tasks import read_records
from zq.testing import check_key_records, wait_for


def _keyed_backlog(app, tmp_path, seconds: float):
    hot = [tasks.keyed.delay("hot", seq, seconds, str(tmp_path)) for seq in range(1, 4)]
    wait_for(lambda: hot[0].status == "STARTED", 15, "first keyed task started")
    return hot


def _declared_dead_after(broker, pid: int) -> float:
    start = time.monotonic()
    wait_for_workers(broker.endpoint, lambda pids: pid not in pids, timeout=10)
    return time.monotonic() - start


def test_killed_worker_tasks_are_redelivered_and_the_key_stays_exclusive(
    app, broker, start_worker, tmp_path
):
    victim = start_worker(concurrency=1)
    hot = _keyed_backlog(app, tmp_path, 1.0)
    survivor = start_worker(concurrency=1)
    victim.signal(signal.SIGKILL)
    assert _declared_dead_after(broker, victim.pid) < 4.5

    results = [r.get(timeout=20) for r in hot]
    assert [r["seq"] for r in results] == [1, 2, 3]
    assert {r["worker"] for r in results} == {survivor.pid}
    records = read_records(tmp_path)
    assert not [r for r in records if r["overlap"]]
    assert check_key_records(records) == []
    assert app.status()["counters"]["redelivered"] >= 1


def test_frozen_worker_is_fenced_declared_dead_and_rejoins(app, broker, start_worker, tmp_path):
    frozen = start_worker(concurrency=1)
    hot = _keyed_backlog(app, tmp_path, 1.5)
    survivor = start_worker(concurrency=1)
    frozen.signal(signal.SIGSTOP)
    try:
        waited = _declared_dead_after(broker, frozen.pid)
        assert 2.0 < waited < 4.5
        results = [r.get(timeout=20) for r in hot]
    finally:
        frozen.signal(signal.SIGCONT)
    # The frozen worker's child fenced itself: its run never overlapped the survivor's.
    assert {r["worker"] for r in results} == {survivor.pid}
    records = read_records(tmp_path)
    assert not [r for r in records if r["overlap"]]
    assert check_key_records(records) == []
    # Thawed, it says READY again and takes work; its stale DONE changed no result.
    wait_for_workers(broker.endpoint, lambda pids: frozen.pid in pids, timeout=10)
    assert all(r.status == "SUCCESS" for r in hot)
    survivor.close()
    wait_for_workers(broker.endpoint, lambda pids: pids == {frozen.pid}, timeout=10)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4


def test_broker_restart_is_found_again_by_workers_and_clients(app, broker, start_worker):
    worker = start_worker(concurrency=1)
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    broker.kill()
    while_down = tasks.add.delay(2, 3)  # held by the client until the broker returns
    broker.restart()
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids, timeout=15)
    assert while_down.get(timeout=15) == 5
    assert tasks.add.delay(3, 4).get(timeout=10) == 7


def test_thousands_of_results_finished_while_the_broker_was_down_all_arrive(
    app, broker, start_worker, tmp_path
):
    """A worker that ended 2,000 tasks while the broker was down sends all their DONEs
    when the broker is back. (Sent one message each they overflowed the socket's
    queue; the ones dropped stayed in flight for good, their clients never answered.)"""
    worker = start_worker(concurrency=2000, pool="thread")
    results = [tasks.nap_and_mark.delay(1.0, str(tmp_path)) for _ in range(2000)]

    def marks(kind: str) -> int:
        return len(list(tmp_path.glob(f"{kind}-*")))

    wait_for(lambda: marks("start") == 2000, 30, "2,000 tasks running")
    broker.kill()
    wait_for(lambda: marks("end") == 2000, 30, "the 2,000 runs to end")
    broker.restart()
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids, timeout=15)
    deadline = time.monotonic() + 60
    assert all(r.get(timeout=max(0.1, deadline - time.monotonic())) == 1.0 for r in results)


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_task_longer_than_the_liveness_window_is_not_redelivered(app, start_worker, pool):
    """Heartbeats come from the supervisor, not the task: a CPU-bound task running past
    3 s (the dead-after window) keeps its worker alive and runs once."""
    worker = start_worker(concurrency=1, pool=pool)
    res = tasks.burn.delay(4.0)
    assert res.get(timeout=20)["pid"] in (worker.pid, *_children(worker.pid))
    counters = app.status()["counters"]
    assert counters.get("redelivered", 0) == 0
    assert counters["done"] == 1


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(c) for c in f.read().split()]
