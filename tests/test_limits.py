"""Bounds: queued tasks, results kept, message size; a flood is REJECTED, not absorbed."""

from __future__ import annotations

import pytest
import zmq

import zq
from tests import tasks
from zq import protocol as p
from zq.testing import BrokerProcess, wait_for


@pytest.fixture
def bounded() -> BrokerProcess:
    extra = [
        "--max-queued",
        "2000",
        "--max-queued-per-queue",
        "1500",
        "--max-results",
        "10",
        "--max-message-size",
        str(1024 * 1024),
    ]
    with BrokerProcess("tcp://127.0.0.1:*", *extra) as proc:
        yield proc


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_flood_past_the_bounds_is_rejected_and_memory_stays_bounded(bounded):
    app = zq.App("flood", broker=bounded.endpoint)
    try:
        baseline = _rss_kib(bounded.pid)
        body = "x" * 1024
        flood = [app.send_task("tests.tasks.add", [body, "!"], queue="a") for _ in range(1800)]
        flood += [app.send_task("tests.tasks.add", [body, "!"], queue="b") for _ in range(18_200)]
        assert app.client.flush(60)
        states = [r.status for r in flood[:1800:100]] + [r.status for r in flood[-100:]]
        assert set(states) <= {"QUEUED", "REJECTED"}
        with pytest.raises(zq.TaskRejected, match="queue 'a' full"):
            flood[1700].get(timeout=5)
        with pytest.raises(zq.TaskRejected, match="broker full"):
            flood[-1].get(timeout=5)
        status = app.status()
        assert status["queues"] == {"a": 1500, "b": 500}
        assert status["counters"]["rejected"] == 20_000 - 2000
        grown_mib = (_rss_kib(bounded.pid) - baseline) / 1024
        print(f"\nbroker RSS grew {grown_mib:.1f} MiB for 2000 queued 1 KiB tasks")
        assert grown_mib < 64, "stated bound: 64 MiB for 2000 queued 1 KiB tasks"
    finally:
        app.close()


def test_results_kept_are_bounded(bounded):
    app = zq.App("results", broker=bounded.endpoint)
    from zq.testing import WorkerProcess

    try:
        with WorkerProcess("tests.tasks", bounded.endpoint, pool="thread", concurrency=2):
            results = [app.send_task("tests.tasks.add", [i, 1]) for i in range(30)]
            assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(30)]
        status = app.status()
        assert status["results"] == 10 and status["results_evicted"] == 20
        # The journal dropped them too: a restart brings back the 10 kept, no more.
        bounded.kill()
        bounded.restart()
        status = app.status(timeout=10)
        assert status["results"] == 10 and status["results_evicted"] == 0
        assert app.AsyncResult(results[-1].id).get(timeout=10) == 30  # a FETCH
    finally:
        app.close()


def test_oversized_arguments_fail_in_the_caller(bounded):
    app = zq.App("big", broker=bounded.endpoint)
    try:
        # Before the broker said its limit, the client holds the task and rejects it
        # itself once it knows (sending it would only get the connection cut).
        early = app.send_task("tests.tasks.add", ["x" * (1536 * 1024), "!"])
        with pytest.raises(zq.TaskRejected, match="message size limit"):
            early.get(timeout=10)
        # Once it knows, it refuses at once, in the caller.
        with pytest.raises(ValueError, match="exceed the broker's message size"):
            app.send_task("tests.tasks.add", ["x" * (1536 * 1024), "!"])
    finally:
        app.close()


def test_an_oversized_raw_message_cuts_off_only_its_sender(bounded):
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(bounded.endpoint)
    app = zq.App("bystander", broker=bounded.endpoint)
    try:
        task = {"id": "huge", "name": "x", "queue": "default"}
        raw.send_multipart(
            p.message(
                p.CLIENT, p.SUBMIT, {"client": "ab", "tasks": [task]}, b"x" * (2 * 1024 * 1024)
            )
        )
        assert not raw.poll(1000), "no reply to an oversized message"
        assert app.status()["counters"].get("accepted", 0) == 0
        assert wait_for(lambda: app.status()["broker"], 5, "the broker still serves")
    finally:
        app.close()
        raw.close()
        ctx.term()


def test_a_worker_fails_a_result_too_large_for_the_broker(bounded):
    from zq.testing import WorkerProcess

    app = tasks.app
    app.broker = bounded.endpoint
    try:
        with WorkerProcess("tests.tasks", bounded.endpoint, pool="thread", concurrency=1):
            res = tasks.blob.delay(2 * 1024 * 1024)
            with pytest.raises(zq.TaskFailed, match="ResultTooLarge"):
                res.get(timeout=20)
    finally:
        app.close()
