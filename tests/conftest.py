"""Fixtures: real broker and worker processes on random loopback ports, killed by pid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import zq
from zq.testing import BrokerProcess, WorkerProcess, wait_for


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker; parametrize it indirectly with a tuple of ``zq broker`` options."""
    with BrokerProcess("tcp://127.0.0.1:*", *getattr(request, "param", ())) as proc:
        yield proc


@pytest.fixture
def app(broker: BrokerProcess) -> Iterator[zq.App]:
    from tests import tasks

    tasks.app.broker = broker.endpoint
    yield tasks.app
    tasks.app.close()


@pytest.fixture
def start_worker(broker: BrokerProcess) -> Iterator:
    """Start workers of tests.tasks on the broker (or on ``endpoint``, a way to it);
    waits until the broker lists them."""
    started: list[WorkerProcess] = []

    def start(
        spec: str = "tests.tasks",
        *,
        concurrency: int = 2,
        wait: bool = True,
        endpoint: str | None = None,
        **kwargs,
    ) -> WorkerProcess:
        proc = WorkerProcess(spec, endpoint or broker.endpoint, concurrency=concurrency, **kwargs)
        started.append(proc)
        if wait:
            wait_for_workers(broker.endpoint, lambda pids: proc.pid in pids)
        return proc

    yield start
    for proc in started:
        proc.close()


def wait_for_workers(endpoint: str, check, timeout: float = 20.0) -> dict:
    """Poll the broker's status until ``check(set of worker pids)`` holds."""
    probe = zq.App("probe", broker=endpoint)

    def status_if_ok():
        status = probe.status()
        return status if check({w["pid"] for w in status["workers"]}) else None

    try:
        return wait_for(status_if_ok, timeout, "workers in the broker's status")
    finally:
        probe.close()
