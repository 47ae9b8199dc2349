"""A partition between a worker and the broker (the broker frozen with SIGSTOP): the
worker stops its keyed tasks before the broker could hand their keys to another
worker; unkeyed tasks run on. Timing margins: docs/protocol.md, "Fencing"."""

from __future__ import annotations

import signal
import time

from tests import tasks
from tests.tasks import read_records
from zq.testing import check_key_records, wait_for


def test_keyed_tasks_are_fenced_when_the_broker_goes_silent(app, broker, start_worker, tmp_path):
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    keyed = tasks.keyed.delay("k", 1, 3.0, str(tmp_path))
    follower = tasks.keyed.delay("k", 2, 0.0, str(tmp_path))
    unkeyed = tasks.sleep.delay(3.0)
    wait_for(lambda: keyed.status == "STARTED" and unkeyed.status == "STARTED", 10, "running")
    broker.signal(signal.SIGSTOP)
    try:
        time.sleep(4.0)  # the fault itself: a 4 s partition, longer than the dead-after window
    finally:
        broker.signal(signal.SIGCONT)
    try:
        assert keyed.get(timeout=20)["seq"] == 1
    except Exception:
        print("BROKER", "".join(broker.output), sep="\n")
        print("STATUS", keyed.status, follower.status, unkeyed.status, app.status())
        raise
    assert follower.get(timeout=10)["seq"] == 2
    assert unkeyed.get(timeout=10) == 3.0
    records = read_records(tmp_path)
    assert not [r for r in records if r["overlap"]]
    assert check_key_records(records) == []
    assert sorted(r["seq"] for r in records) == [1, 2], "the fenced run left no record"
    counters = app.status()["counters"]
    assert counters["redelivered"] >= 1, "the keyed task was stopped and run again"
    assert "dead" not in counters, "a fenced stop is not a crash"
