"""An app whose worker registers ``shared.vanish`` in its READY but whose pool's
children do not have it (they import this module afresh, and skip it), so each run
answers UnknownTask: how a worker looks whose code changed under it."""

from __future__ import annotations

import multiprocessing
import os

import zq

app = zq.App("vanishing-tests")

if multiprocessing.parent_process() is None:  # the supervisor, not a pool child

    @app.task(name="shared.vanish")
    def vanish() -> dict[str, int]:
        return {"pid": os.getpid(), "worker": os.getppid()}


@app.task
def here() -> int:
    return os.getpid()
