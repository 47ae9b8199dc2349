"""An app whose process-pool children load it slowly, or not at all: for the tests of
a child's start. The supervisor (no multiprocessing parent) imports it at once; a pool
child sleeps ``ZQ_TEST_CHILD_BOOT`` seconds first, or exits if that says ``fail``."""

from __future__ import annotations

import multiprocessing
import os
import time

import zq

_BOOT = os.environ.get("ZQ_TEST_CHILD_BOOT")
if _BOOT and multiprocessing.parent_process() is not None:
    if _BOOT == "fail":
        raise SystemExit(3)
    time.sleep(float(_BOOT))

app = zq.App("slow_boot")


@app.task
def size(blob: bytes) -> int:
    return len(blob)
