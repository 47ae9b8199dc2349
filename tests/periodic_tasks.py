"""An app with periodic schedules, for tests/test_periodic.py only (its workers are
the only ones that declare them). Runs are recorded in ``$ZQ_TEST_RECORDS``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import zq
from tests.records import write_record

app = zq.App("periodic-tests")


def _record(name: str) -> Path:
    directory = Path(os.environ["ZQ_TEST_RECORDS"])
    record = {"name": name, "start": time.time(), "id": zq.current_task().id}
    path = directory / f"{name}-{record['start']:.6f}-{os.getpid()}.json"
    write_record(path, record)
    return path


@app.periodic(every=1.0)
@app.task
def tick() -> None:
    _record("tick")


@app.periodic(every=0.5, key="slow")
@app.task
def slow() -> None:
    path = _record("slow")
    time.sleep(1.2)
    record = json.loads(path.read_text())
    record["end"] = time.time()
    write_record(path, record)


@app.periodic(cron="* * * * * */2", name="every-2s-cron", args=("cron",))
@app.task
def by_cron(label: str) -> str:
    _record(label)
    return label
