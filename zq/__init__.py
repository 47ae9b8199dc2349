"""zq: a Celery-style distributed task queue on ZeroMQ, with its own small broker.

::

    import zq

    app = zq.App("tasks", broker="tcp://127.0.0.1:5555")

    @app.task(key=lambda order: order["customer_id"])
    def score(order): ...

    score.delay({"customer_id": "c-42"}).get(timeout=60)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zq.app import App, Task
from zq.canvas import GroupResult, Signature, chain, chord, group
from zq.client import AsyncResult
from zq.context import TaskContext, current_task
from zq.errors import (
    BrokerUnavailable,
    ProtocolError,
    ResultUnavailable,
    Retry,
    SoftTimeLimitExceeded,
    TaskError,
    TaskFailed,
    TaskRejected,
    TimeoutError,
    WorkerError,
    ZQError,
)

if TYPE_CHECKING:
    from zq.broker import Broker, BrokerSettings
    from zq.worker import Worker, WorkerSettings

__version__ = "0.1.0"

#: Loaded when first used, so that a web process that only submits tasks loads
#: neither the broker, its journal (sqlite3) nor the process pool.
_LAZY = {
    "Broker": "zq.broker",
    "BrokerSettings": "zq.broker",
    "Worker": "zq.worker",
    "WorkerSettings": "zq.worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "App",
    "AsyncResult",
    "Broker",
    "BrokerSettings",
    "BrokerUnavailable",
    "GroupResult",
    "ProtocolError",
    "ResultUnavailable",
    "Retry",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskRejected",
    "TimeoutError",
    "Worker",
    "WorkerError",
    "WorkerSettings",
    "ZQError",
    "__version__",
    "chain",
    "chord",
    "current_task",
    "group",
]
