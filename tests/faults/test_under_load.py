"""Faults injected mid-load: hundreds of keyed and unkeyed tasks through real processes.

Each scenario checks, from the records the tasks wrote themselves, that every accepted
task reached a final state with the right result, that no key ever ran twice at once
(kernel lock) and that each key's tasks started in order; then it prints accepted,
completed, redelivered and lost (which must be 0).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import zq
from tests import tasks
from tests.conftest import wait_for_workers
from tests.tasks import read_records
from zq.testing import check_key_records, wait_for

KEYED, KEYS, UNKEYED = 240, 24, 60


def _submit(record_dir: str) -> tuple[list[zq.AsyncResult], list[zq.AsyncResult]]:
    rng = random.Random(11)
    seqs: Counter[str] = Counter()
    keyed, unkeyed = [], []
    for i in range(KEYED):
        key = f"cust-{rng.randrange(KEYS)}"
        seqs[key] += 1
        keyed.append(tasks.keyed.delay(key, seqs[key], rng.uniform(0.0, 0.04), record_dir))
        if i % 4 == 0:
            unkeyed.append(tasks.add.delay(i, 7))
    return keyed, unkeyed


def _check(app: zq.App, name: str, keyed, unkeyed, record_dir: str) -> None:
    values = [r.get(timeout=90) for r in keyed]
    assert [v["seq"] for v in values] == [r.get(timeout=1)["seq"] for r in keyed]
    assert [r.get(timeout=30) for r in unkeyed] == [i + 7 for i in range(0, KEYED, 4)]
    records = read_records(record_dir)
    assert {(r["key"], r["seq"]) for r in records} == {(v["key"], v["seq"]) for v in values}
    assert not [r for r in records if r["overlap"]], "a key ran twice at once"
    assert check_key_records(records) == []
    accepted = len(keyed) + len(unkeyed)
    completed = sum(r.status == "SUCCESS" for r in keyed + unkeyed)
    counters = app.status()["counters"]
    print(
        f"\n[{name}] accepted {accepted}, completed {completed}, "
        f"redelivered {counters.get('redelivered', 0)}, "
        f"ran twice {len(records) - len(values)}, lost {accepted - completed}"
    )
    assert completed == accepted


def _mid_load(keyed) -> None:
    wait_for(lambda: sum(r.ready_here() for r in keyed) >= KEYED // 4, 60, "a quarter done")


FAULTS = ["worker-sigkill", "worker-sigstop", "broker-sigkill", "poison", "hard-time-limit"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_mid_load(fault, app, broker, start_worker, tmp_path):
    victim = start_worker(concurrency=3)
    start_worker(concurrency=3)
    keyed, unkeyed = _submit(str(tmp_path))
    _mid_load(keyed)
    if fault == "worker-sigkill":
        victim.signal(signal.SIGKILL)
        start_worker(concurrency=3)  # its replacement
    elif fault == "worker-sigstop":
        victim.signal(signal.SIGSTOP)
        time.sleep(4.0)  # the fault: frozen past the 3 s dead-after window
        victim.signal(signal.SIGCONT)
    elif fault == "broker-sigkill":
        broker.signal(signal.SIGKILL)
        broker.proc.wait(10)
        broker.restart()
    elif fault == "poison":  # kills its process every time, on a busy key
        bad = tasks.poison.delay("cust-1", str(tmp_path / "no-antidote"))
        with pytest.raises(zq.TaskFailed, match="died 4 times"):
            bad.get(timeout=60)
    else:  # stuck past its hard time limit (1 s)
        with pytest.raises(zq.TaskFailed, match="hard time limit"):
            tasks.hard_limited.delay(60).get(timeout=30)
    _check(app, fault, keyed, unkeyed, str(tmp_path))


CLIENT = """
import os, signal, sys
from tests import tasks
tasks.app.broker = sys.argv[1]
ids = [tasks.add.delay(i, 1).id for i in range(200)]
assert tasks.app.client.flush(20)
print(" ".join(ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # gone without a goodbye
"""


def test_client_killed_after_submit(app, broker, start_worker):
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, broker.endpoint], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    ids = proc.stdout.split()
    assert len(ids) == 200
    worker = start_worker(concurrency=2, wait=False)
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids)
    results = [app.AsyncResult(task_id).get(timeout=30) for task_id in ids]
    assert results == [i + 1 for i in range(200)]
    print(f"\n[client-killed] accepted 200, completed {len(results)}, lost {200 - len(results)}")
