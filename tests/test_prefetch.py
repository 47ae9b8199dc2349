"""Prefetch end to end: with ``auto`` (the default) short tasks wait in a worker beyond
its slots, so the round trip to the broker does not idle them; long tasks never do.
``--prefetch 0`` never sends a worker more than its free slots."""

from __future__ import annotations

import contextlib
import select
import signal
import time
from collections.abc import Callable, Iterator

import pytest

import zq
from tests import tasks
from tests.test_worker_fuzz import FakeBroker, worker_on_fake_broker
from zq import protocol as p
from zq.dispatch import PREFETCH_MAX
from zq.pool import ThreadPool
from zq.testing import BrokerProcess, WorkerProcess, wait_for

pytestmark = pytest.mark.timeout(90)


class Cluster:
    """A broker and thread-pool workers of 1 slot, all stopped by pid at the end."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.endpoint = ""

    def start(self, *args: str, workers: int = 1) -> zq.App:
        """A broker with ``args``, then ``workers`` workers; the app of tests.tasks."""
        self.endpoint = self.stack.enter_context(BrokerProcess("tcp://127.0.0.1:*", *args)).endpoint
        tasks.app.broker = self.endpoint
        self.stack.callback(tasks.app.close)
        for _ in range(workers):
            self.add_worker()
        return tasks.app

    def add_worker(self, concurrency: int = 1) -> None:
        worker = WorkerProcess("tests.tasks", self.endpoint, concurrency=concurrency, pool="thread")
        self.stack.enter_context(worker)
        wait_for(
            lambda: worker.pid in {w["pid"] for w in tasks.app.status()["workers"]},
            20,
            "the worker in the broker's status",
        )


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        yield Cluster(stack)


def most_in_flight(app: zq.App, results: list, timeout: float) -> int:
    """Poll the broker's status until every result is in: the most tasks one worker
    held at a time (as often as the status round trip allows)."""
    most, deadline = 0, time.monotonic() + timeout
    while not all(r.ready_here() for r in results):
        assert time.monotonic() < deadline, "the tasks did not all finish in time"
        most = max([most, *(w["in_flight"] for w in app.status()["workers"])])
    return most


def test_auto_prefetch_sends_short_tasks_beyond_the_free_slots(cluster):
    app = cluster.start()  # --prefetch auto is the default
    results = [tasks.sleep.delay(0.0005) for _ in range(3000)]
    most = most_in_flight(app, results, 60)
    assert all(r.get(timeout=10) == 0.0005 for r in results)
    # 1 slot x 2 ms / ~0.6 ms per task: a few tasks wait in the worker at a time.
    assert 1 < most <= 1 + PREFETCH_MAX


def test_prefetch_0_never_sends_more_than_the_free_slots(cluster):
    app = cluster.start("--prefetch", "0")
    results = [tasks.sleep.delay(0.0005) for _ in range(1000)]
    assert most_in_flight(app, results, 60) == 1
    assert all(r.get(timeout=10) == 0.0005 for r in results)


def test_long_tasks_are_never_prefetched_and_spread_over_the_workers(cluster):
    app = cluster.start(workers=2)
    results = [tasks.whoami_after.delay(0.4) for _ in range(6)]
    assert most_in_flight(app, results, 30) == 1
    assert len({r.get(timeout=10)["pid"] for r in results}) == 2  # thread pools


def test_tasks_waiting_behind_a_long_one_go_back_to_another_worker(cluster):
    app = cluster.start()
    assert [r.get(timeout=20) for r in [tasks.add.delay(i, 0) for i in range(200)]] == list(
        range(200)
    )  # the worker's run times are short now: it is sent tasks beyond its one slot
    long = tasks.sleep.delay(8)
    quick = [tasks.add.delay(i, 1) for i in range(10)]  # all sent to it, behind `long`
    cluster.add_worker()
    # Stuck for 0.1 s with no slot freed, the first worker hands the waiting tasks back
    # and the second runs them, while the long task still runs.
    assert [r.get(timeout=6) for r in quick] == list(range(1, 11))
    assert not long.ready_here()
    assert app.status()["counters"]["given_back"] >= 1


def test_a_big_worker_that_stalled_is_not_sent_its_given_back_tasks_again(cluster):
    """100 slots: the stalled worker's prefetch must go to 0, not to 100 x 2 ms / 0.1 s
    = 2, or it is sent tasks it gives back again every 0.1 s."""
    app = cluster.start(workers=0)
    cluster.add_worker(concurrency=100)
    assert [r.get(timeout=20) for r in [tasks.add.delay(i, 0) for i in range(300)]] == list(
        range(300)
    )
    long = [tasks.sleep.delay(1.5) for _ in range(100)]  # every slot
    quick = [tasks.add.delay(i, 1) for i in range(20)]  # prefetched, then given back
    assert [r.get(timeout=20) for r in quick] == list(range(1, 21))
    assert all(r.get(timeout=20) == 1.5 for r in long)
    assert 1 <= app.status()["counters"]["given_back"] <= 20, "given back more than once"


# ------------------------------------------------- the worker's side, on a fake broker


@contextlib.contextmanager
def fake_broker(pool: str, give_back: float | None) -> Iterator[FakeBroker]:
    """A real worker (1 slot) on a bare ROUTER that welcomes it with ``give_back``."""
    with worker_on_fake_broker(pool, give_back) as (broker, _):
        yield broker


def send_task(broker: FakeBroker, task_id: str, name: str, args: list, delivery: int = 1) -> None:
    header = {"id": task_id, "name": name, "queue": "default", "client": "ab"}
    header["delivery"] = delivery
    broker.send(p.BROKER, p.TASK, p.pack_header(header), p.encode([args, {}]))


def outcomes(broker: FakeBroker, until: set[str], timeout: float = 10.0) -> list[dict]:
    """Every DONE entry, in order, until each of ``until`` ended with a final state."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until <= {e["id"] for e in seen if e["state"] in p.FINAL_STATES}:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no final state for {until - {e['id'] for e in seen}}"
        seen.extend(entry for entry, _ in broker.dones(1, timeout=remaining).values())
    return seen


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_stalled_worker_gives_its_waiting_tasks_back_and_runs_them_if_sent_again(pool):
    with fake_broker(pool, give_back=0.2) as broker:
        send_task(broker, "long", "tests.tasks.sleep", [1.5])
        for i in range(3):
            send_task(broker, f"quick-{i}", "tests.tasks.add", [i, 1])
        quick = {f"quick-{i}" for i in range(3)}
        back: dict[str, dict] = {}
        deadline = time.monotonic() + 5
        while set(back) < quick:
            assert time.monotonic() < deadline, "the waiting tasks did not come back"
            back.update((i, e) for i, (e, _) in broker.dones(1, timeout=5).items())
        assert "long" not in back, "the running task was given back"
        for task_id in quick:
            assert back[task_id]["state"] == p.LOST and back[task_id]["returned"] is True
            assert back[task_id]["runtime"] >= 0.2  # how long its slot was stuck
        assert [e["id"] for e in outcomes(broker, {"long"})] == ["long"]
        for i in range(3):  # the broker sends them again (here: to the same worker)
            send_task(broker, f"quick-{i}", "tests.tasks.add", [i, 1], delivery=2)
        seen = outcomes(broker, quick)
        assert sorted(e["id"] for e in seen) == sorted(quick), "run twice, or not at all"
        assert all(e["state"] == p.SUCCESS and e["delivery"] == 2 for e in seen)


def test_a_thread_pool_revokes_a_task_no_thread_has_taken():
    with fake_broker("thread", give_back=None) as broker:
        send_task(broker, "long", "tests.tasks.sleep", [1.5])
        send_task(broker, "waiting", "tests.tasks.add", [1, 1])
        broker.send(p.BROKER, p.REVOKE, p.pack_header({"id": "waiting", "delivery": 1}))
        seen = outcomes(broker, {"waiting", "long"})
        assert [(e["id"], e["state"]) for e in seen] == [
            ("waiting", p.REVOKED),
            ("long", p.SUCCESS),
        ]


def test_a_worker_runs_a_task_sent_again_while_its_give_back_is_unacknowledged():
    with fake_broker("thread", give_back=0.1) as broker:
        send_task(broker, "long", "tests.tasks.sleep", [1.0])
        send_task(broker, "x", "tests.tasks.add", [1, 1])
        # x's give-back, then the long task's end; neither acknowledged, so the LOST
        # for x stays in the worker's outbox.
        deadline, seen = time.monotonic() + 5, set()
        while not {("x", p.LOST), ("long", p.SUCCESS)} <= seen:
            assert time.monotonic() < deadline, f"only {seen}"
            command, header = broker.recv(5)
            entries = header.get("done", [header]) if command == p.DONE else []
            seen.update((e.get("id"), e.get("state")) for e in entries)
        send_task(broker, "x", "tests.tasks.add", [1, 1], delivery=2)
        seen = outcomes(broker, {"x"})
        assert [(e["id"], e["state"], e["delivery"]) for e in seen if e["id"] == "x"] == [
            ("x", p.SUCCESS, 2)
        ], "answered the new TASK with the old give-back instead of running it"


# -------------------------------------------------------------- the thread pool alone


def _pool_events(pool: ThreadPool, until: Callable[[list], bool], timeout: float = 10.0) -> list:
    events: list = []
    deadline = time.monotonic() + timeout
    while not until(events):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"events so far: {events}"
        fds = pool.fds()
        if select.select(fds, [], [], remaining)[0]:
            events += pool.on_readable(fds[0])
    return events


def test_a_task_withdrawn_twice_leaves_every_thread_working():
    """Given back, sent again, given back again before the first copy left the queue:
    both stale copies are skipped, and the threads live on to run what comes next."""
    pool = ThreadPool(tasks.app, 1)
    pool.start()
    try:

        def job(task_id: str, name: str, args: list) -> tuple[dict, bytes]:
            return {"id": task_id, "name": name, "queue": "default"}, p.encode([args, {}])

        pool.submit(*job("long", "tests.tasks.sleep", [0.3]))
        wait_for(lambda: pool.waiting() == 0, 5, "the thread to take the long task")
        for _ in range(2):
            pool.submit(*job("x", "tests.tasks.add", [1, 1]))
            assert pool.withdraw() == ["x"]
        pool.submit(*job("y", "tests.tasks.add", [2, 2]))
        events = _pool_events(pool, lambda ev: ("done", "y") in {e[:2] for e in ev})
        assert [e[:3] for e in events if e[0] == "done"] == [
            ("done", "long", p.SUCCESS),
            ("done", "y", p.SUCCESS),
        ]
        assert all(thread.is_alive() for thread in pool._threads)
        assert pool.running() == [] and pool.waiting() == 0
    finally:
        pool.close()


def test_a_late_acknowledgement_of_an_earlier_delivery_keeps_a_newer_result():
    """ACCEPTED names the delivery each DONE was for: a late one about an earlier report
    of the task (say a LOST sent again after a reconnect) must not take the DONE of a
    later run out of the worker's outbox."""
    with worker_on_fake_broker() as (broker, _):
        send_task(broker, "s", "tests.tasks.stamp", ["run"], delivery=2)
        deadline = time.monotonic() + 10
        first = None
        while first is None:  # not acknowledged: it stays in the outbox
            assert time.monotonic() < deadline, "no DONE"
            command, header = broker.recv(5)
            if command == p.DONE:
                entries = header.get("done", [header])
                for entry, body in zip(entries, broker.payload, strict=True):
                    if entry["id"] == "s":
                        first = p.decode(body)
        stale = {"ids": ["s"], "deliveries": [1]}
        broker.send(p.BROKER, p.ACCEPTED, p.pack_header(stale))
        send_task(broker, "s", "tests.tasks.stamp", ["run"], delivery=3)
        answer = broker.expect(p.DONE, "s")
        assert answer["delivery"] == 3
        assert p.decode(broker.payload[0]) == first, "ran again: the late ACCEPTED dropped it"


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_a_stopping_worker_hands_back_a_task_that_crossed_its_draining_ready(pool):
    """A TASK the broker sent just before it read the worker's draining READY is not
    claimed in that READY, so the broker puts it back for others; the stopping worker
    must not run it too (it did: a task ran twice, a key's tasks overlapped)."""
    with worker_on_fake_broker(pool) as (broker, worker):
        send_task(broker, "running", "tests.tasks.sleep", [1.0])
        broker.expect(p.STARTED, "running")
        worker.signal(signal.SIGTERM)
        ready = broker.expect(p.READY)
        assert ready["draining"] and list(ready["running"]) == ["running"]
        send_task(broker, "crossed", "tests.tasks.add", [1, 2])
        done = broker.dones(2)
        assert done["crossed"][0]["state"] == p.LOST and done["crossed"][0]["returned"]
        assert done["running"][0]["state"] == p.SUCCESS
