"""The Celery side of :mod:`bench.peers` (imported only when celery is installed).

The broker and result backend come from ``$BENCH_CELERY_BROKER`` (a Redis URL).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-not-found]

_url = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=_url, backend=_url)
app.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack"])


@app.task(name="bench.celery.noop")
def noop(*args: Any) -> None:
    """Do nothing, as bench.noop does for zq."""
    return None
