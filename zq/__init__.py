"""zq: a Celery-style distributed task queue on ZeroMQ, with its own small broker.

::

    import zq

    app = zq.App("tasks", broker="tcp://127.0.0.1:5555")

    @app.task(key=lambda order: order["customer_id"])
    def score(order): ...

    score.delay({"customer_id": "c-42"}).get(timeout=60)
"""

from zq.app import App, Task
from zq.broker import Broker, BrokerSettings
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
from zq.worker import Worker, WorkerSettings

__version__ = "0.1.0"

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
