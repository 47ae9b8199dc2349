"""A second task module, for tests where workers of different apps share a queue."""

from __future__ import annotations

import os

import zq

app = zq.App("other-tests")


@app.task
def ping() -> dict[str, int]:
    return {"pid": os.getpid(), "worker": os.getppid()}


@app.task(name="shared.vanish")
def vanish() -> dict[str, int]:
    """Also registered by tests.vanishing_tasks, whose pool's children lack it."""
    return {"pid": os.getpid(), "worker": os.getppid()}
