"""The pools on their own, driven as the worker's supervisor drives them: the lease
check, reading large results, and the process pool's batches (several short tasks
given to one child in one message) under revoke, crashes, recycling and give-back."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator

import pytest

from tests import tasks
from zq import protocol as p
from zq.pool import Event, ThreadPool
from zq.procpool import Limits, ProcessPool


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


@pytest.fixture
def one_child() -> Iterator[ProcessPool]:
    pool = ProcessPool(tasks.app, "tests.tasks", 1, fence_after=60.0, limits=Limits())
    pool.start()
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


def test_a_recycled_child_hands_back_the_rest_of_its_batch():
    pool = ProcessPool(
        tasks.app, "tests.tasks", 1, fence_after=60.0, limits=Limits(max_tasks_per_child=2)
    )
    pool.start()
    try:
        pid = _batch_behind(pool, *(_task(f"t{i}", "whoami") for i in range(4)))
        done = _outcomes(_drive(pool, _done("t0", "t1", "t2", "t3")))
        pids = [_pid(done[f"t{i}"][0]) for i in range(4)]  # none LOST: each ran once
        assert pids[0] == pid  # the opener's child ran its second task, then retired
        assert pids[1] == pids[2] != pid and pids[3] not in (pid, pids[1])
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
