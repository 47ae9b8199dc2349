"""What the worker's and the broker's logs tell an operator, read from real processes."""

from __future__ import annotations

import os
import re
import signal

import pytest

import zq
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(60)

_WORKER_ID = re.compile(r"^zq worker (\S+) for ")


def _worker_id(worker) -> str:
    return next(m.group(1) for line in worker.output if (m := _WORKER_ID.match(line)))


def _lines(proc, text: str) -> list[str]:
    return [line for line in proc.output if text in line]


def test_the_worker_logs_a_pool_process_that_dies_and_its_replacement(broker, start_worker):
    worker = start_worker(concurrency=1)
    app = zq.App("t", broker=broker.endpoint)
    try:
        child = app.send_task("tests.tasks.whoami").get(timeout=15)["pid"]
        os.kill(child, signal.SIGKILL)  # idle: no task is lost, only the process
        said = worker.read_until(
            re.compile(
                rf"pool process {child} died \(killed by SIGKILL\); "
                r"pool process (\d+) replaces it"
            ),
            15,
        )
        replacement = int(said.group(1))
        # The one named is the one that runs the next task.
        assert app.send_task("tests.tasks.whoami").get(timeout=15)["pid"] == replacement
    finally:
        app.close()


def test_the_worker_logs_losing_the_broker_once_and_finding_it_again(broker, start_worker):
    # At debug level the reconnects that follow the first show, so the test can wait for
    # several of them; the warning must come once only.
    worker = start_worker(concurrency=1, env={"ZQ_LOG_LEVEL": "debug"})
    broker.kill()
    wait_for(lambda: len(_lines(worker, "reconnecting")) >= 3, 20, "three reconnects to the broker")
    warnings = [line for line in _lines(worker, "reconnecting") if " WARNING " in line]
    assert len(warnings) == 1, "".join(worker.output)
    assert f"lost broker {broker.endpoint}: no answer for" in warnings[0]

    broker.restart()
    worker.read_until(re.compile(rf"broker {re.escape(broker.endpoint)} answers again, after"), 20)


def test_the_broker_logs_a_worker_stopped_with_sigterm_going_offline(broker, start_worker):
    worker = start_worker(concurrency=1)
    wid = _worker_id(worker)
    assert worker.terminate() == 0
    broker.read_until(re.compile(rf"worker {wid} offline \(disconnected\); 0 task"), 15)
    # Its draining READY (no new tasks) said so, not that it came online again.
    assert len(_lines(broker, f"worker {wid} online")) == 1, "".join(broker.output)
    assert len(_lines(broker, f"worker {wid} stopping: no new tasks")) == 1
    worker.read_until(re.compile(rf"^zq worker {wid} stopped$"), 10)
