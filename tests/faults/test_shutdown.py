"""Graceful shutdown: SIGTERM to a worker drains it; SIGTERM to the broker flushes the
journal so that a restart finds every accepted task."""

from __future__ import annotations

import signal
import time

from tests import tasks
from tests.conftest import wait_for_workers
from tests.tasks import read_records
from zq.testing import wait_for


def test_sigterm_lets_running_tasks_finish(app, broker, start_worker, tmp_path):
    worker = start_worker(concurrency=1)
    res = tasks.keyed.delay("k", 1, 1.5, str(tmp_path))
    wait_for(lambda: res.status == "STARTED", 10, "task started")
    waiting = tasks.keyed.delay("k", 2, 0.0, str(tmp_path))  # must not go to the leaver
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0
    assert res.get(timeout=5)["worker"] == worker.pid, "it finished where it ran"
    assert waiting.status == "QUEUED"
    survivor = start_worker(concurrency=1)
    assert waiting.get(timeout=10)["worker"] == survivor.pid
    assert len(read_records(tmp_path)) == 2, "nothing ran twice"


def test_sigterm_hands_back_what_outlasts_the_shutdown_timeout(app, broker, start_worker):
    leaver = start_worker(concurrency=1, extra=["--shutdown-timeout", "0.5"])
    res = tasks.sleep.delay(3)
    wait_for(lambda: res.status == "STARTED", 10, "task started")
    stopped_at = time.monotonic()
    leaver.signal(signal.SIGTERM)
    assert leaver.proc.wait(15) == 0
    assert time.monotonic() - stopped_at < 5
    start_worker(concurrency=1)
    assert res.get(timeout=15) == 3
    counters = app.status()["counters"]
    assert counters["redelivered"] == 1 and "dead" not in counters


def test_broker_sigterm_flushes_the_journal(app, broker, start_worker):
    queued = [tasks.add.delay(i, i) for i in range(50)]  # no worker yet: they wait
    assert app.client.flush(10)
    broker.signal(signal.SIGTERM)
    assert broker.proc.wait(10) == 0
    assert any("zq broker stopped" in line for line in broker.output)
    broker.restart()
    worker = start_worker(concurrency=2, wait=False)
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids)
    assert [r.get(timeout=20) for r in queued] == [2 * i for i in range(50)]
