"""A poison task kills its worker process every time: it becomes a dead letter after
the allowed redeliveries instead of looping, its key moves on, and it can be requeued."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import zq
from tests import tasks
from tests.tasks import read_records


def zq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zq", *args], capture_output=True, text=True, timeout=30
    )


def test_poison_task_becomes_dead_then_requeued(app, broker, start_worker, tmp_path):
    start_worker(concurrency=2)
    antidote = tmp_path / "antidote"
    res = tasks.poison.delay("cust-1", str(antidote))
    after = tasks.keyed.delay("cust-1", 1, 0.0, str(tmp_path))  # same key, queued behind it

    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=30)
    assert info.value.exc_type == "zq.DeadLetter"
    assert "died 4 times" in info.value.exc_message
    assert res.status == "DEAD" and res.failed()
    assert after.get(timeout=10)["seq"] == 1, "the key moved on past the dead letter"
    assert len(read_records(tmp_path)) == 1

    counters = app.status()["counters"]
    assert counters["redelivered"] == 3 and counters["dead"] == 1

    listing = zq_cli("dead", "list", "--broker", broker.endpoint)
    assert listing.returncode == 0, listing.stderr
    assert res.id in listing.stdout and "died=4" in listing.stdout

    antidote.touch()
    requeued = zq_cli("dead", "requeue", res.id, "--broker", broker.endpoint)
    assert requeued.returncode == 0, requeued.stderr
    assert f"{res.id}: requeued" in requeued.stdout
    assert zq.App("fresh", broker=broker.endpoint).AsyncResult(res.id).get(timeout=15) == "cured"
    assert "0 dead letter(s)" in zq_cli("dead", "list", "--broker", broker.endpoint).stdout
    again = zq_cli("dead", "requeue", res.id, "--broker", broker.endpoint)
    assert again.returncode == 1 and "not a dead letter" in again.stdout


def test_dead_letters_survive_a_broker_restart(app, broker, start_worker, tmp_path):
    start_worker(concurrency=1)
    res = tasks.poison.delay("cust-2", str(tmp_path / "never"))
    with pytest.raises(zq.TaskFailed):
        res.get(timeout=30)
    broker.kill()
    broker.restart()
    out = zq_cli("dead", "list", "--broker", broker.endpoint)
    assert res.id in out.stdout
    status = json.loads(zq_cli("status", "--json", "--broker", broker.endpoint).stdout)
    assert status["dead"] == 1
