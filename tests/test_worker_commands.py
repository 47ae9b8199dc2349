"""A worker's handling of the broker's commands, through its dispatch table, with
neither a socket nor a pool: a stub pool records what the worker asks of it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from zq import protocol as p
from zq.worker import Worker


class StubPool:
    """What the command handlers below use of a pool."""

    def __init__(self) -> None:
        self.lease: float | None = None
        self.fence: float | None = None

    def set_lease(self, when: float) -> None:
        self.lease = when

    def set_fence(self, seconds: float) -> None:
        self.fence = seconds


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker("tests.tasks")
    worker.pool = StubPool()  # type: ignore[assignment]
    yield worker
    os.close(worker._wake_r)  # (run() closes its wake-up pipe; it never ran)
    os.close(worker._wake_w)


def test_each_command_a_broker_sends_a_worker_has_a_handler():
    assert set(Worker._HANDLERS) == {p.TASK, p.HEARTBEAT, p.ACCEPTED, p.REVOKE, p.WELCOME, p.ERROR}


def test_a_heartbeat_echo_renews_the_lease(worker):
    sent = time.monotonic()
    worker._handle(p.BROKER, p.HEARTBEAT, {"t": sent}, [])
    assert worker.pool.lease == sent
    worker._handle(p.BROKER, p.HEARTBEAT, {"t": sent + 3600}, [])  # not sent yet: no lease
    assert worker.pool.lease == sent


def test_an_acknowledgement_lets_go_of_the_dones_of_its_deliveries_only(worker):
    worker._outbox = {
        "a": ({"id": "a", "delivery": 1}, b""),
        "b": ({"id": "b", "delivery": 2}, b""),
    }
    worker._handle(p.BROKER, p.ACCEPTED, {"ids": ["a", "b"], "deliveries": [1, 1]}, [])
    assert list(worker._outbox) == ["b"]


def test_a_welcome_sets_the_fence_from_its_heartbeat_and_sends_the_outbox_again(worker):
    worker._outbox = {"a": ({"id": "a"}, b"x")}
    welcome = {"heartbeat": 2.0, "liveness": 3, "max_message_size": p.DEFAULT_MAX_MESSAGE}
    worker._handle(p.BROKER, p.WELCOME, {**welcome, "give_back": 0.5}, [])
    assert worker.pool.fence == 3.0 and worker._give_back == 0.5
    assert worker._dones == [({"id": "a"}, b"x")]


def test_a_command_no_broker_sends_a_worker_is_ignored(worker):
    worker._handle(p.BROKER, p.SUBMIT, {"tasks": []}, [])
    worker._handle(p.BROKER, b"\xee", {}, [])
    assert worker.pool.lease is None and worker._dropped == 0
