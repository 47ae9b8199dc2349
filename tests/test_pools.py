"""The pools on their own, driven as the worker's supervisor drives them: the lease
check, reading large results, and the process pool's batches (several short tasks
given to one child in one message) under revoke, crashes, recycling and give-back."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests import slow_boot, tasks
from zq import protocol as p
from zq.pool import Event, ThreadPool
from zq.procpool import Limits, ProcessPool
from zq.testing import wait_for


def _task(task_id: str, name: str, *args: object, **header: object) -> tuple[dict, bytes]:
    return {"id": task_id, "name": f"tests.tasks.{name}", "queue": "default", **header}, p.encode(
        [list(args), {}]
    )


def _drive(pool, until: Callable[[list[Event]], bool], timeout: float = 20.0) -> list[Event]:
    """Poll ``pool`` as the supervisor does until ``until(events so far)``."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"gave up waiting; events so far: {events}"
        for fd in select.select(pool.fds(), [], [], 0.05)[0]:
            events += pool.on_readable(fd)
        events += pool.tick() + pool.started()
    return events


def _done(*ids: str) -> Callable[[list[Event]], bool]:
    return lambda events: set(ids) <= {e[1] for e in events if e[0] == "done"}


def _outcomes(events: list[Event]) -> dict[str, list[Event]]:
    """Each task's done events (a task must have exactly one)."""
    found: dict[str, list[Event]] = {}
    for event in events:
        if event[0] == "done":
            found.setdefault(event[1], []).append(event)
    return found


def _pid(event: Event) -> int:
    assert event[2] == p.SUCCESS, event
    return p.decode(event[3])["pid"]


def _ready(pool: ProcessPool) -> None:
    """Start ``pool`` and wait until its children have loaded the app (nothing goes to
    a child before), so that tasks are given as a running pool gives them."""
    pool.start()
    _drive(pool, lambda _: all(c.booted for c in pool._children.values()))


@pytest.fixture
def one_child() -> Iterator[ProcessPool]:
    pool = ProcessPool(tasks.app, "tests.tasks", 1, fence_after=60.0, limits=Limits())
    _ready(pool)
    yield pool
    pool.close()


def _batch_behind(pool: ProcessPool, *rest: tuple[dict, bytes]) -> int:
    """Run a task alone, with ``rest`` waiting; once it ends they go to the idle
    child together (a batch). Returns the child's pid."""
    pool.submit(*_task("opener", "whoami_after", 0.2))
    for header, payload in rest:
        pool.submit(header, payload)
    events = _drive(pool, _done("opener"))
    assert not pool._backlog, "the tasks waiting went to the child as one batch"
    return _pid(_outcomes(events)["opener"][0])


def _running_with(pool: ProcessPool, seconds: float, *queued: str) -> int:
    """A batch whose first task, "running" (``seconds`` long), has started, with
    ``queued`` (quick tasks) behind it in the same child; the child's pid."""
    pid = _batch_behind(
        pool, _task("running", "whoami_after", seconds), *(_task(q, "whoami") for q in queued)
    )
    _drive(pool, lambda events: ("started", "running") in events)
    return pid


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_pool_starts_no_keyed_task_while_the_broker_is_silent_past_the_fence(kind):
    """The pool's own check, for a supervisor that froze after it read a TASK and
    before it handed it over (its connection check came before the freeze): the keyed
    task comes back LOST (fenced) unrun; an unkeyed one runs."""
    pool = (
        ProcessPool(tasks.app, "tests.tasks", 1, fence_after=1.5, limits=Limits())
        if kind == "process"
        else ThreadPool(tasks.app, 1, fence_after=1.5)
    )
    pool.start()
    try:
        pool.set_lease(time.monotonic() - 2.0)  # the lease is 2 s old
        pool.submit(*_task("keyed", "add", 1, 1, key="cust-1"))
        pool.submit(*_task("plain", "add", 1, 1))
        done = _outcomes(_drive(pool, _done("keyed", "plain")))
        assert done["keyed"][0][2] == p.LOST and done["keyed"][0][5] == {"fenced": True}
        assert done["plain"][0][2] == p.SUCCESS and p.decode(done["plain"][0][3]) == 2
    finally:
        pool.close()


def test_a_process_pool_reads_a_large_result_without_waiting_for_it():
    """A result of megabytes comes through the child's socket in many reads; the
    supervisor takes each part as it comes (it used to block until the last) and
    hears the other children meanwhile."""
    pool = ProcessPool(tasks.app, "tests.tasks", 2, fence_after=60.0, limits=Limits())
    pool.start()
    try:
        size = 3 * 1024 * 1024
        pool.submit(*_task("large", "blob", size))
        pool.submit(*_task("small", "add", 2, 3))
        done = _outcomes(_drive(pool, _done("large", "small")))
        assert done["large"][0][2] == p.SUCCESS and p.decode(done["large"][0][3]) == "x" * size
        assert done["small"][0][2] == p.SUCCESS and p.decode(done["small"][0][3]) == 5
    finally:
        pool.close()


def test_terminate_of_a_task_queued_in_a_childs_batch_skips_it_and_kills_nothing(one_child):
    pool = one_child
    pid = _running_with(pool, 1.0, "revoked", "after")
    assert pool.terminate("revoked") == [
        (
            "done",
            "revoked",
            p.REVOKED,
            p.failure("zq.Revoked", "revoked before it started"),
            0.0,
            {},
        )
    ]
    done = _outcomes(_drive(pool, _done("running", "after")))
    assert _pid(done["running"][0]) == pid  # the child was not killed
    assert _pid(done["after"][0]) == pid
    assert "revoked" not in done  # skipped: it never ran, and nothing more is said of it
    assert pool.running() == []


def test_terminate_of_a_batchs_running_task_kills_its_child_and_the_rest_run_elsewhere(
    one_child,
):
    pool = one_child
    pid = _running_with(pool, 30.0, "next", "last")
    [event] = pool.terminate("running")
    assert event[:3] == ("done", "running", p.REVOKED)
    done = _outcomes(_drive(pool, _done("next", "last")))
    assert _pid(done["next"][0]) == _pid(done["last"][0]) != pid  # the replacement


def test_a_child_that_dies_mid_batch_loses_only_the_task_it_ran(one_child):
    pool = one_child
    pid = _batch_behind(pool, _task("fatal", "die"), _task("next", "whoami"))
    done = _outcomes(_drive(pool, _done("fatal", "next")))
    assert done["fatal"][0][2] == p.LOST
    assert _pid(done["next"][0]) != pid
    assert all(len(events) == 1 for events in done.values())


@pytest.mark.parametrize(
    "limits",
    [Limits(max_memory_per_child=1), Limits(max_tasks_per_child=2)],
    ids=["memory", "count"],
)
def test_a_recycled_child_hands_back_the_rest_of_its_batch(limits):
    """A child recycled after a task (past its memory limit: after every task here)
    starts nothing more; what was queued behind it runs on the next child, once."""
    pool = ProcessPool(tasks.app, "tests.tasks", 1, fence_after=60.0, limits=limits)
    _ready(pool)
    try:
        for i in range(6):
            pool.submit(*_task(f"t{i}", "whoami"))
        done = _outcomes(_drive(pool, _done(*(f"t{i}" for i in range(6)))))
        pids = [_pid(done[f"t{i}"][0]) for i in range(6)]  # none LOST: each ran once
        per_child = 1 if limits.max_memory_per_child else 2
        assert max(pids.count(pid) for pid in pids) == per_child
    finally:
        pool.close()


def test_withdraw_takes_back_what_waits_in_a_child_not_what_it_runs(one_child):
    pool = one_child
    pid = _running_with(pool, 1.0, "waiting-1", "waiting-2")
    assert pool.waiting() == 2
    assert pool.withdraw() == ["waiting-1", "waiting-2"]
    assert pool.running() == ["running"] and pool.waiting() == 0
    events = _drive(pool, _done("running"))
    pool.submit(*_task("later", "whoami"))  # after the skipped ones: nothing said of them
    events += _drive(pool, _done("later"))
    done = _outcomes(events)
    assert sorted(done) == ["later", "running"]
    assert _pid(done["running"][0]) == _pid(done["later"][0]) == pid


def test_a_batch_stays_well_under_what_a_childs_socket_buffers(one_child):
    """Sending a batch must never wait for the child (one still importing the app
    would stall the supervisor, and its lease, for as long): a batch adds at most
    BATCH_BYTES of payloads to its first task."""
    pool = one_child
    pool.submit(*_task("opener", "whoami_after", 0.2))
    for i in range(6):
        pool.submit(*_task(f"big-{i}", "add", "x" * 40_000, ""))
    _drive(pool, _done("opener"))
    [child] = pool._children.values()
    assert [entry[1]["id"] for entry in child.given] == ["big-0", "big-1"]
    assert _drive(pool, _done(*(f"big-{i}" for i in range(6))))


def test_an_idle_child_takes_what_waits_behind_a_slow_task_in_another():
    """The tasks batched behind a slow one run on the other child once it is idle,
    not after the slow one (they waited behind it for its whole run)."""
    pool = ProcessPool(tasks.app, "tests.tasks", 2, fence_after=60.0, limits=Limits())
    _ready(pool)
    try:
        pool.submit(*_task("a", "whoami_after", 0.2))
        pool.submit(*_task("b", "whoami_after", 0.6))
        pool.submit(*_task("slow", "whoami_after", 3.0))
        quick = [f"q{i}" for i in range(5)]
        for task_id in quick:
            pool.submit(*_task(task_id, "whoami"))
        events = _drive(pool, _done(*quick))
        assert "slow" not in _outcomes(events)  # the quick ones did not wait for it
        done = _outcomes(events + _drive(pool, _done("slow")))
        assert {_pid(done[q][0]) for q in quick} != {_pid(done["slow"][0])}
    finally:
        pool.close()


def test_withdraw_takes_back_what_waited_in_a_child_that_just_died(one_child):
    """A child killed behind the supervisor's back (its EOF not read yet) starts
    nothing more: what waited in it comes back, and does not run here later."""
    pool = one_child
    pid = _running_with(pool, 5.0, "waiting")
    [child] = pool._children.values()
    os.kill(pid, signal.SIGKILL)
    hangup = select.poll()  # once its end of the socket is gone (the kernel closes a
    hangup.register(child.sock, select.POLLHUP)  # dead process's files a tick later)
    wait_for(lambda: hangup.poll(0), 10, "the child's end of its socket to close")
    assert pool.withdraw() == ["waiting"]
    events = _drive(pool, _done("running"))
    pool.submit(*_task("later", "whoami"))
    done = _outcomes(events + _drive(pool, _done("later")))
    assert sorted(done) == ["later", "running"] and done["running"][0][2] == p.LOST


def _slow_boot_pool(monkeypatch, boot: str) -> ProcessPool:
    monkeypatch.setenv("ZQ_TEST_CHILD_BOOT", boot)  # the children get it when spawned
    pool = ProcessPool(slow_boot.app, "tests.slow_boot", 1, fence_after=60.0, limits=Limits())
    pool.start()
    return pool


def _blob(task_id: str, size: int) -> tuple[dict, bytes]:
    header = {"id": task_id, "name": "tests.slow_boot.size", "queue": "default"}
    return header, p.encode([[b"x" * size], {}])


def test_nothing_goes_to_a_child_before_it_has_loaded_the_app(monkeypatch):
    """A child still importing the app reads nothing: a payload larger than its socket
    buffers would block the supervisor (its heartbeats, its lease) for the whole import."""
    pool = _slow_boot_pool(monkeypatch, "2")
    try:
        start = time.monotonic()
        pool.submit(*_blob("big", 2_000_000))
        assert time.monotonic() - start < 0.5, "the submit waited for the child's import"
        [done] = _outcomes(_drive(pool, _done("big")))["big"]
        assert done[2] == p.SUCCESS and p.decode(done[3]) == 2_000_000
    finally:
        pool.close()


def test_a_child_that_dies_loading_the_app_loses_nothing_and_is_replaced_after_a_wait(
    monkeypatch, caplog
):
    pool = _slow_boot_pool(monkeypatch, "fail")
    try:
        pool.submit(*_blob("t", 10))
        deadline = time.monotonic() + 1.2
        events = _drive(pool, lambda _: time.monotonic() > deadline)
        assert not events, "no task went to a child that could not load the app"
        assert pool.waiting() == 1  # (so the worker gives it back: see _give_back_if_stalled)
        deaths = [r for r in caplog.records if "died loading the app" in r.getMessage()]
        # At 0 s and after waits of 0.5 and 1 s: not a loop of process starts.
        assert 1 <= len(deaths) <= 2, [r.getMessage() for r in deaths]
        monkeypatch.delenv("ZQ_TEST_CHILD_BOOT")  # the next child loads the app
        [done] = _outcomes(_drive(pool, _done("t")))["t"]
        assert done[2] == p.SUCCESS and p.decode(done[3]) == 10
    finally:
        pool.close()


def test_a_pool_whose_children_cannot_load_the_app_gives_up(monkeypatch):
    """After BOOT_FAILURES_MAX children in a row die loading the app, the pool says
    why in ``failure`` (the worker then stops) instead of starting more for ever."""
    monkeypatch.setattr("zq.procpool.BOOT_RETRY", 0.05)
    pool = _slow_boot_pool(monkeypatch, "fail")
    try:
        pool.submit(*_blob("t", 10))
        _drive(pool, lambda _: pool.failure is not None)
        assert "5 in a row" in pool.failure and "died loading the app" in pool.failure
        assert "(exit code 3)" in pool.failure and pool.waiting() == 1
    finally:
        pool.close()


def test_withdraw_leaves_a_booting_child_its_share(monkeypatch):
    """A task that waits for a child still loading the app is as good as given to it
    (it was, before children said "ready"): a give-back must not take it."""
    pool = _slow_boot_pool(monkeypatch, "1")
    try:
        for i in range(3):
            pool.submit(*_blob(f"t{i}", i))
        assert pool.waiting() == 2
        assert pool.withdraw() == ["t1", "t2"]
        [done] = _outcomes(_drive(pool, _done("t0")))["t0"]
        assert done[2] == p.SUCCESS
    finally:
        pool.close()
