"""Prefetch end to end: with ``auto`` (the default) short tasks wait in a worker beyond
its slots, so the round trip to the broker does not idle them; long tasks never do.
``--prefetch 0`` never sends a worker more than its free slots."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

import zq
from tests import tasks
from zq.dispatch import PREFETCH_MAX
from zq.testing import BrokerProcess, WorkerProcess, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def run() -> Iterator:
    """Start a broker with ``args`` and ``workers`` thread-pool workers of 1 slot."""
    with contextlib.ExitStack() as stack:

        def start(*args: str, workers: int = 1) -> zq.App:
            broker = stack.enter_context(BrokerProcess("tcp://127.0.0.1:*", *args))
            for _ in range(workers):
                worker = WorkerProcess("tests.tasks", broker.endpoint, concurrency=1, pool="thread")
                stack.enter_context(worker)
            tasks.app.broker = broker.endpoint
            stack.callback(tasks.app.close)
            wait_for(lambda: len(tasks.app.status()["workers"]) == workers, 20, "workers")
            return tasks.app

        yield start


def most_in_flight(app: zq.App, results: list, timeout: float) -> int:
    """Poll the broker's status until every result is in: the most tasks one worker
    held at a time (as often as the status round trip allows)."""
    most, deadline = 0, time.monotonic() + timeout
    while not all(r.ready_here() for r in results):
        assert time.monotonic() < deadline, "the tasks did not all finish in time"
        most = max([most, *(w["in_flight"] for w in app.status()["workers"])])
    return most


def test_auto_prefetch_sends_short_tasks_beyond_the_free_slots(run):
    app = run()  # --prefetch auto is the default
    results = [tasks.sleep.delay(0.0005) for _ in range(3000)]
    most = most_in_flight(app, results, 60)
    assert all(r.get(timeout=10) == 0.0005 for r in results)
    # 1 slot x 2 ms / ~0.6 ms per task: a few tasks wait in the worker at a time.
    assert 1 < most <= 1 + PREFETCH_MAX


def test_prefetch_0_never_sends_more_than_the_free_slots(run):
    app = run("--prefetch", "0")
    results = [tasks.sleep.delay(0.0005) for _ in range(1000)]
    assert most_in_flight(app, results, 60) == 1
    assert all(r.get(timeout=10) == 0.0005 for r in results)


def test_long_tasks_are_never_prefetched_and_spread_over_the_workers(run):
    app = run(workers=2)
    results = [tasks.whoami_after.delay(0.4) for _ in range(6)]
    assert most_in_flight(app, results, 30) == 1
    assert len({r.get(timeout=10)["pid"] for r in results}) == 2  # thread pools
