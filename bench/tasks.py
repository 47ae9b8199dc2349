"""The tasks the benchmarks run: ``zq worker bench.tasks`` (run from the repository root)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import zq

app = zq.App("bench")


@app.task(name="bench.noop")
def noop(*args: Any) -> None:
    """Do nothing: the cost of a task is then all queue."""
    return None


@app.task(name="bench.add")
def add(x: float, y: float) -> float:
    return x + y


@app.task(name="bench.keyed_sleep", key=lambda key, seconds: key)
def keyed_sleep(key: str, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds`` under ``key``; return when it ran (wall clock) and where."""
    start = time.time()
    time.sleep(seconds)
    return {
        "key": key,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }
