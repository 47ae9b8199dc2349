"""Customer-sticky routing end to end: several worker processes, keyed and unkeyed work.

Every keyed run writes its own record and checks exclusivity with a kernel lock
(see tests/tasks.py), so these tests fail if two runs of a key ever overlap.
"""

from __future__ import annotations

import random

from tests import tasks
from tests.tasks import read_records
from zq.testing import check_key_records


def test_keys_are_exclusive_and_fifo_across_workers(app, start_worker, tmp_path):
    start_worker(concurrency=3)
    start_worker(concurrency=3)
    rng = random.Random(7)
    keys = [f"cust-{i}" for i in range(30)]
    seqs = dict.fromkeys(keys, 0)
    keyed, unkeyed = [], []
    for i in range(300):
        key = rng.choice(keys)
        seqs[key] += 1
        keyed.append(tasks.keyed.delay(key, seqs[key], rng.uniform(0, 0.03), str(tmp_path)))
        if i % 10 == 0:
            unkeyed.append(tasks.add.delay(i, 1))
    for res in keyed:
        res.get(timeout=60)
    assert [r.get(timeout=10) for r in unkeyed] == [i + 1 for i in range(0, 300, 10)]

    records = read_records(tmp_path)
    assert len(records) == 300
    assert not [r for r in records if r["overlap"]], "two runs of one key held its lock at once"
    assert check_key_records(records) == []
    assert len({r["worker"] for r in records}) == 2, "both workers took keyed work"


def test_unkeyed_work_flows_while_a_key_is_busy(app, start_worker, tmp_path):
    start_worker(concurrency=3)
    busy = [tasks.keyed.delay("hot", seq, 0.4, str(tmp_path)) for seq in range(1, 6)]
    quick = [tasks.add.delay(i, i) for i in range(30)]
    assert [r.get(timeout=10) for r in quick] == [2 * i for i in range(30)]
    quick_done = max(r.date_done for r in quick)
    for res in busy:
        res.get(timeout=20)
    last_hot = max(read_records(tmp_path), key=lambda r: r["seq"])
    # The key's five runs take 2 s in a row; the unkeyed tasks did not wait behind them.
    assert quick_done < last_hot["start"]
    assert check_key_records(read_records(tmp_path)) == []


def test_a_key_sticks_to_the_worker_that_ran_it_last(app, start_worker, tmp_path):
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    keys = ["a", "b", "c"]
    for seq in range(1, 6):  # a round at a time, so a slot is free on every worker
        for res in [tasks.keyed.delay(k, seq, 0.01, str(tmp_path)) for k in keys]:
            res.get(timeout=10)
    records = read_records(tmp_path)
    for key in keys:
        workers = {r["worker"] for r in records if r["key"] == key}
        assert len(workers) == 1, f"key {key} moved between workers: {workers}"
