"""Broker SIGKILL under load and restart on its journal: nothing accepted is lost,
results from before the crash are still there, running tasks are not run twice."""

from __future__ import annotations

import random
import re
import signal
from collections import Counter

import zq
from tests import tasks
from tests.conftest import wait_for_workers
from tests.tasks import read_records
from zq.testing import check_key_records, wait_for


def test_broker_killed_under_load_loses_nothing_and_runs_nothing_twice(
    app, broker, start_worker, tmp_path
):
    workers = [start_worker(concurrency=2), start_worker(concurrency=2)]
    rng = random.Random(3)
    record_dir = str(tmp_path)
    # Long tasks that will be running on the workers while the broker is down.
    long = [tasks.keyed.delay(f"long-{i}", 1, 2.5, record_dir) for i in range(2)]
    seqs: Counter[str] = Counter()
    submitted = []
    for _ in range(200):
        key = f"cust-{rng.randrange(20)}"
        seqs[key] += 1
        submitted.append(tasks.keyed.delay(key, seqs[key], rng.uniform(0, 0.02), record_dir))
    wait_for(lambda: all(r.status == "STARTED" for r in long), 15, "long tasks running")
    early = submitted[0]
    assert early.get(timeout=15)["seq"] == 1  # a result the broker had before the crash

    broker.signal(signal.SIGKILL)
    broker.proc.wait(10)
    during = [tasks.add.delay(i, 1000) for i in range(20)]  # sent while it is down
    broker.restart()

    pids = {w.pid for w in workers}
    wait_for_workers(broker.endpoint, lambda seen: pids <= seen, timeout=20)
    assert [r.get(timeout=30) for r in during] == [i + 1000 for i in range(20)]
    for res in long + submitted:
        res.get(timeout=60)

    # The restarted broker found the long tasks in its journal, held by their workers.
    assert any(re.search(r"[1-9]\d* held by [1-9]", line) for line in broker.output)
    records = read_records(record_dir)
    runs = Counter((r["key"], r["seq"]) for r in records)
    assert len(runs) == 202, "every accepted keyed task ran"
    twice = {k: n for k, n in runs.items() if n > 1}
    assert not twice, f"ran more than once: {twice}"
    assert not [r for r in records if r["overlap"]]
    assert check_key_records(records) == []

    # Another process (a new client) still gets a pre-crash result by id.
    other = zq.App("other", broker=broker.endpoint)
    try:
        assert other.AsyncResult(early.id).get(timeout=10)["seq"] == 1
    finally:
        other.close()
    counters = app.status()["counters"]
    print(
        f"accepted after restart: {counters.get('accepted', 0)}, "
        f"duplicates dropped: {counters.get('duplicates', 0)}, "
        f"stale DONEs: {counters.get('stale_done', 0)}, lost: 0"
    )
