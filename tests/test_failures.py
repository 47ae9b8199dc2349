"""Failure recovery with real processes: worker SIGKILL and SIGSTOP, broker restart.

Default heartbeat settings (1 s, dead after 3 missed), as users run them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests import tasks
from tests.conftest import wait_for_workers
from tests.partition import UP, Partition
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


@pytest.fixture
def partition(broker) -> Iterator[Partition]:
    """A proxy to the broker that can cut one direction of the traffic."""
    proxy = Partition(broker.endpoint)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("broker", [("--heartbeat", "0.5")], indirect=True)
def test_a_worker_cut_off_one_way_stops_its_keyed_task_before_the_key_moves(
    app, broker, start_worker, partition, tmp_path
):
    """Only the worker-to-broker direction is cut: the worker still hears the broker,
    the broker hears nothing and gives the key to another worker after the dead-after
    window. The cut-off worker used to run its keyed task on to its end, beside the
    other worker's run of it (for 0.9 s at the defaults); its heartbeats go unanswered
    now, so its lease lapses and the task stops first."""
    cut = start_worker(concurrency=1, endpoint=partition.endpoint)
    first = tasks.keyed.delay("one-way", 1, 4.0, str(tmp_path))
    wait_for(lambda: first.status == "STARTED", 15, "the first task to start")
    survivor = start_worker(concurrency=1)
    partition.hold(UP)
    second = tasks.keyed.delay("one-way", 2, 0.0, str(tmp_path))
    assert [r.get(timeout=30)["seq"] for r in (first, second)] == [1, 2]
    records = read_records(tmp_path)
    # Only the survivor's runs ended: the cut-off worker's was stopped (fenced).
    runs = sorted((r["seq"], r["worker"]) for r in records)
    assert runs == [(1, survivor.pid), (2, survivor.pid)]
    assert not [r for r in records if r["overlap"]]
    partition.heal()  # and it comes back
    wait_for_workers(broker.endpoint, lambda pids: cut.pid in pids, timeout=15)


def _holds(broker, worker, count: int) -> None:
    wait_for_workers(
        broker.endpoint,
        lambda _: any(
            w["pid"] == worker.pid and w["in_flight"] == count
            for w in tasks.app.status()["workers"]
        ),
    )


@pytest.mark.parametrize("broker", [("--prefetch", "2")], indirect=True)  # never given back
@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_thawed_worker_starts_none_of_the_tasks_it_held_unstarted(
    app, broker, start_worker, pool, tmp_path
):
    """Frozen past the dead-after window, a worker held keyed tasks it had not started:
    one prefetched behind a running task, one sent to it while it was frozen (in its
    socket's buffers). Another worker ran both, then their keys' next tasks. Thawed,
    the frozen worker must start neither: it would run a key's task after the next one
    (and, were the tasks long, beside it). It did, for tasks of a few milliseconds."""
    frozen = start_worker(concurrency=1, pool=pool)
    blocker = tasks.sleep.delay(1.0)
    wait_for(lambda: blocker.status == "STARTED", 15, "the blocker to start")
    held = [tasks.keyed.delay("thaw-a", 1, 0.0, str(tmp_path))]  # prefetched behind it
    _holds(broker, frozen, 2)
    frozen.signal(signal.SIGSTOP)
    try:
        held.append(tasks.keyed.delay("thaw-b", 1, 0.0, str(tmp_path)))  # sent, unread
        _holds(broker, frozen, 3)
        survivor = start_worker(concurrency=2, pool=pool)
        later = [tasks.keyed.delay(key, 2, 0.0, str(tmp_path)) for key in ("thaw-a", "thaw-b")]
        assert [r.get(timeout=20)["seq"] for r in held + later] == [1, 1, 2, 2]
        assert blocker.get(timeout=20) == 1.0
    finally:
        frozen.signal(signal.SIGCONT)
    wait_for_workers(broker.endpoint, lambda pids: frozen.pid in pids, timeout=10)
    survivor.close()
    wait_for_workers(broker.endpoint, lambda pids: pids == {frozen.pid}, timeout=10)
    # Its one slot runs what it is given in turn: this ends after anything it held.
    assert tasks.add.delay(2, 2).get(timeout=10) == 4
    records = read_records(tmp_path)
    assert sorted((r["key"], r["seq"]) for r in records) == [
        ("thaw-a", 1),
        ("thaw-a", 2),
        ("thaw-b", 1),
        ("thaw-b", 2),
    ]
    assert check_key_records(records) == []


def test_a_task_sent_to_a_worker_that_renewed_its_connection_is_no_redelivery(
    app, broker, start_worker
):
    """Frozen past the fence but not the dead-after window, a worker gives its
    connection up on thaw with a TASK unread in it. The broker sends the task again;
    it never ran, so it must not count towards making it a dead letter (it did)."""
    worker = start_worker(concurrency=1)
    worker.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        res = tasks.redeliveries.delay()
        _holds(broker, worker, 1)
        time.sleep(max(0.0, 1.7 - (time.monotonic() - frozen_at)))  # the fault: 1.7 s
    finally:
        worker.signal(signal.SIGCONT)
    assert res.get(timeout=15) == 0
    assert app.status()["counters"].get("redelivered", 0) == 0


def test_a_keyed_task_in_a_frozen_childs_pipe_never_starts_after_its_key_moved(
    app, broker, start_worker, tmp_path
):
    """A worker and its child frozen (a cgroup freeze, say) with a keyed task handed
    to the child but not yet read; another worker runs it and the key's next task.
    Thawed, the supervisor first (it renews its connection and hears the broker again,
    so the child's own check would pass), the worker must stop that task."""
    victim = start_worker(concurrency=1)
    assert tasks.add.delay(1, 1).get(timeout=10) == 2  # its child has loaded the app
    [child] = _pool_children(victim.pid)
    os.kill(child, signal.SIGSTOP)
    try:
        first = tasks.keyed.delay("fed", 1, 0.0, str(tmp_path))
        wait_for(lambda: first.status == "STARTED", 10, "the task handed to the child")
        victim.signal(signal.SIGSTOP)
        survivor = start_worker(concurrency=1)
        second = tasks.keyed.delay("fed", 2, 0.0, str(tmp_path))
        assert [first.get(timeout=20)["seq"], second.get(timeout=20)["seq"]] == [1, 2]
        victim.signal(signal.SIGCONT)
        wait_for_workers(broker.endpoint, lambda pids: victim.pid in pids, timeout=10)
        # Stopped while still frozen: thawed later, it would start the task (the new
        # connection made the broker's silence look over).
        wait_for(lambda: not os.path.exists(f"/proc/{child}"), 10, "the child stopped")
    finally:
        victim.signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    survivor.close()
    wait_for_workers(broker.endpoint, lambda pids: pids == {victim.pid}, timeout=10)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4  # through its one slot
    records = read_records(tmp_path)
    assert sorted(r["seq"] for r in records) == [1, 2]
    assert check_key_records(records) == []


def _pool_children(pid: int) -> list[int]:
    """The pool's child processes of worker ``pid`` (multiprocessing may add others)."""
    found = []
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"resource_tracker" not in f.read():
                found.append(child)
    return found


def test_broker_restart_is_found_again_by_workers_and_clients(app, broker, start_worker):
    worker = start_worker(concurrency=1)
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    broker.kill()
    while_down = tasks.add.delay(2, 3)  # held by the client until the broker returns
    broker.restart()
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids, timeout=15)
    assert while_down.get(timeout=15) == 5
    assert tasks.add.delay(3, 4).get(timeout=10) == 7


def test_keyed_tasks_sent_with_the_welcome_after_an_outage_run_at_once(
    app, broker, start_worker, tmp_path
):
    """A worker that waited out a broker outage reads the WELCOME and its first TASKs
    in one go: its pool must count the WELCOME as word from the broker, or it turns
    each keyed task back as fenced (the broker's silence looked ongoing)."""
    results = [tasks.keyed.delay(f"k{i}", 1, 0.0, str(tmp_path)) for i in range(4)]
    assert app.client.flush(10)
    broker.kill()
    worker = start_worker(concurrency=2, wait=False)
    wait_for(lambda: any("no answer from broker" in line for line in worker.output), 10, "silence")
    broker.restart()
    assert sorted(r.get(timeout=20)["key"] for r in results) == ["k0", "k1", "k2", "k3"]
    assert app.status()["counters"].get("redelivered", 0) == 0


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
