"""Periodic tasks: fired by the broker, journaled, caught up once after a restart."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import zq
from tests.conftest import wait_for_workers
from zq.cli import main
from zq.schedule import Schedule, first_fire, following
from zq.testing import wait_for

pytestmark = pytest.mark.timeout(90)


def runs(directory: Path, name: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in directory.glob(f"{name}-*.json")]
    return sorted(found, key=lambda r: r["start"])


@pytest.fixture
def records(tmp_path: Path) -> Path:
    directory = tmp_path / "records"
    directory.mkdir()
    return directory


def start(start_worker, records: Path, **kwargs):
    return start_worker(
        "tests.periodic_tasks",
        pool="thread",
        concurrency=4,
        env={"ZQ_TEST_RECORDS": str(records)},
        **kwargs,
    )


def test_interval_fires_on_schedule_and_once_per_time(broker, start_worker, records):
    start(start_worker, records)
    start(start_worker, records)  # two workers declare it: it still fires once per time
    wait_for(lambda: len(runs(records, "tick")) >= 4, 20, "four ticks")
    ticks = runs(records, "tick")
    gaps = [b["start"] - a["start"] for a, b in itertools.pairwise(ticks)]
    # A fire doubled (by the two workers' declarations) would start ~0 s after the
    # other; a loaded machine may delay a start by some 100 ms, never by 0.6 s here.
    assert all(0.4 <= gap <= 2.5 for gap in gaps), gaps
    span = ticks[-1]["start"] - ticks[0]["start"]
    assert len(ticks) - 1 - 0.6 <= span <= len(ticks) - 1 + 1.0, (len(ticks), span)
    assert len({r["id"] for r in ticks}) == len(ticks)


def test_cron_schedule(broker, start_worker, records):
    start(start_worker, records)
    wait_for(lambda: len(runs(records, "cron")) >= 2, 20, "two cron runs")
    first, second = runs(records, "cron")[:2]
    assert 1.2 <= second["start"] - first["start"] <= 3.0


def test_a_keyed_schedule_never_overlaps_itself(broker, start_worker, records):
    start(start_worker, records)
    wait_for(lambda: len(runs(records, "slow")) >= 3, 20, "three slow runs")
    done = [r for r in runs(records, "slow") if "end" in r]
    for a, b in itertools.pairwise(done):
        assert b["start"] >= a["end"], "a keyed periodic run started before the last ended"
    probe = zq.App("probe", broker=broker.endpoint)
    try:
        skipped = probe.status()["counters"].get("periodic_skipped", 0)
    finally:
        probe.close()
    assert skipped >= 1, "fires due while the previous run was going were skipped"


def test_restart_neither_doubles_nor_floods(broker, start_worker, records):
    worker = start(start_worker, records)
    wait_for(lambda: len(runs(records, "tick")) >= 2, 20, "two ticks")
    broker.kill()
    killed = time.time()
    time.sleep(3.2)  # three fire times pass while the broker is down
    broker.restart()
    restarted = time.time()
    wait_for_workers(broker.endpoint, lambda pids: worker.pid in pids)
    wait_for(
        lambda: len([r for r in runs(records, "tick") if r["start"] > restarted]) >= 3,
        20,
        "ticks after the restart",
    )
    ticks = runs(records, "tick")
    assert not [r for r in ticks if killed + 1.0 < r["start"] < restarted]
    after = [r for r in ticks if r["start"] > restarted]
    gaps = [b["start"] - a["start"] for a, b in itertools.pairwise(after)]
    # One catch-up run for the missed ones, then the usual cadence: no flood.
    assert all(gap >= 0.4 for gap in gaps), gaps
    assert len({r["id"] for r in ticks}) == len(ticks)


def test_zq_periodic_lists_and_removes(broker, start_worker, records):
    start(start_worker, records)
    runner = CliRunner()
    result = runner.invoke(main, ["periodic", "--broker", broker.endpoint])
    assert result.exit_code == 0, result.output
    assert "tests.periodic_tasks.tick" in result.output
    assert "every 1s" in result.output and "cron * * * * * */2" in result.output
    assert "3 schedule(s)" in result.output
    result = runner.invoke(main, ["periodic", "--broker", broker.endpoint, "--remove", "nope"])
    assert "nope: no such schedule" in result.output


def test_schedule_rules():
    every = Schedule("s", "t", every=10.0)
    assert first_fire(every, None, 100.0) == 110.0
    assert first_fire(every, 95.0, 100.0) == 105.0  # not missed: keeps its cadence
    assert first_fire(every, 50.0, 100.0) == 100.0  # missed (several): one run now
    assert following(every, 100.0, 100.5) == 110.0
    assert following(every, 100.0, 135.0) == 145.0  # late: no flood of past times
    with pytest.raises(ValueError, match="cron"):
        Schedule("s", "t", cron="not a cron")
    with pytest.raises(ValueError, match="either"):
        Schedule("s", "t", every=1, cron="* * * * *")
    with pytest.raises(ValueError, match="every"):
        Schedule("s", "t", every=0)
    app = zq.App("x")
    with pytest.raises(ValueError, match="cron"):
        app.periodic(cron="61 * * * *")(lambda: None)
    task = app.periodic(every=dt.timedelta(minutes=5), args=(1,))(lambda x: x)
    assert app.schedules[task.name].every == 300.0


def test_schedules_that_never_fire_are_refused():
    with pytest.raises(ValueError, match="never fires"):
        Schedule("s", "t", cron="0 0 30 2 *")  # February 30th
    with pytest.raises(ValueError, match="five fields"):
        Schedule("s", "t", cron="0 0 1 1 * 0 2031")  # a year field: not ours


def test_a_bad_schedule_from_a_worker_costs_itself_only(broker):
    """A READY declaring a schedule the broker refuses still registers the worker,
    which then gets tasks."""
    import zmq

    from zq import protocol as p

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    probe = zq.App("probe", broker=broker.endpoint)
    bad = {"name": "feb30", "task": "t", "cron": "0 0 30 2 *", "payload": b"\x92\x90\x80"}
    ready = {"worker": "w-raw", "concurrency": 1, "queues": ["q"], "periodic": [bad]}
    ready["tasks"] = ["some.task"]  # it takes the task sent below
    try:
        sock.send_multipart(p.message(p.WORKER, p.READY, ready))
        assert sock.poll(5000), "no WELCOME"
        assert p.parse(sock.recv_multipart())[1] == p.WELCOME
        assert probe.status()["counters"].get("bad_schedules") == 1
        res = probe.send_task("some.task", queue="q")
        assert sock.poll(5000), "the worker got no task"
        _, command, header, _ = p.parse(sock.recv_multipart())
        assert command == p.TASK and header["id"] == res.id
    finally:
        probe.close()
        sock.close()
        ctx.term()
