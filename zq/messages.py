"""The message schema: each command's header checked once, at the edge, and turned
into a typed value.

:func:`zq.protocol.parse` splits frames and decodes a header map; the functions here
check one command's fields and return a frozen dataclass, or raise
:class:`~zq.errors.ProtocolError` with the reason the peer is told (an ERROR reply,
counted as ``malformed``). Handlers past this point read typed fields and never
check a field again. (A task's own header inside a SUBMIT is checked per task, by
:func:`zq.protocol.check_task_header`, so one bad task costs itself only.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zq import protocol as p
from zq.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Submit:
    """SUBMIT: tasks of one client, numbered for ordering (``n``, ``since``)."""

    client: str
    tasks: list[Any]  # task headers, each checked on its own
    n: int | None = None
    since: int | None = None


@dataclass(frozen=True, slots=True)
class Fetch:
    """FETCH: results by id; ``wait`` seconds for those not finished (0: state now)."""

    ids: list[str]
    wait: float


@dataclass(frozen=True, slots=True)
class Revoke:
    """REVOKE from a client: these ids; a running one is stopped only with terminate."""

    ids: list[str]
    terminate: bool
    req: Any


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """DEAD_LETTERS: list them, requeueing these ids first."""

    requeue: list[str]
    req: Any


@dataclass(frozen=True, slots=True)
class PeriodicRequest:
    """PERIODIC: list the schedules, removing these names first."""

    remove: list[str]
    req: Any


@dataclass(frozen=True, slots=True)
class Ready:
    """READY: a worker's registration (also after a reconnect, and when draining)."""

    worker: str
    concurrency: int
    queues: list[str]
    names: list[str]  # the task names it registers (READY's "tasks")
    running: dict[str, int | None]  # what it still runs or holds a DONE for
    periodic: list[Any]  # schedules its app declares, each checked on its own
    draining: bool
    sent: float | None  # its send time "t" (the worker's monotonic clock)
    info: dict[str, Any]  # worker, host, pid, concurrency, queues: for status and events


@dataclass(frozen=True, slots=True)
class Started:
    """STARTED: one task (``id``) or several (``ids`` with ``deliveries``, in step)."""

    ids: list[Any]
    deliveries: list[Any]


@dataclass(frozen=True, slots=True)
class Progress:
    """PROGRESS: a running task's report."""

    id: str
    delivery: int | None
    progress: dict[str, Any]


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def submit(header: dict[str, Any], payload: list[Any]) -> Submit:
    client, tasks = header.get("client"), header.get("tasks")
    if (
        not isinstance(client, str)
        or not 0 < len(client) <= p.MAX_ID_LEN
        or not isinstance(tasks, list)
    ):
        # The client id goes into every task's header: a long one would multiply.
        raise ProtocolError(
            f"SUBMIT needs 'client' (string of 1..{p.MAX_ID_LEN}) and 'tasks' (list)"
        )
    if len(tasks) != len(payload):
        raise ProtocolError(f"SUBMIT has {len(tasks)} tasks but {len(payload)} payloads")
    n, since = header.get("n"), header.get("since")
    if type(n) is not int or type(since) is not int:
        n = since = None  # a client that does not number its submits
    return Submit(client, tasks, n, since)


def fetch(header: dict[str, Any]) -> Fetch:
    ids = header.get("ids")
    if not _strings(ids):
        raise ProtocolError("FETCH needs 'ids' (list of strings)")
    wait = header.get("wait", 0)
    if not isinstance(wait, (int, float)) or not 0 <= wait < math.inf:  # also refuses NaN
        raise ProtocolError("FETCH 'wait' must be a number of seconds >= 0")
    return Fetch(ids, float(wait))


def revoke(header: dict[str, Any]) -> Revoke:
    ids = header.get("ids")
    if not _strings(ids):
        raise ProtocolError("REVOKE needs 'ids' (list of task ids)")
    return Revoke(ids, header.get("terminate", False) is True, header.get("req"))


def dead_letters(header: dict[str, Any]) -> DeadLetters:
    requeue = header.get("requeue", [])
    if not _strings(requeue):
        raise ProtocolError("DEAD_LETTERS 'requeue' must be a list of task ids")
    return DeadLetters(requeue, header.get("req"))


def periodic(header: dict[str, Any]) -> PeriodicRequest:
    remove = header.get("remove", [])
    if not _strings(remove):
        raise ProtocolError("PERIODIC 'remove' must be a list of schedule names")
    return PeriodicRequest(remove, header.get("req"))


def ready(header: dict[str, Any]) -> Ready:
    wid, concurrency = header.get("worker"), header.get("concurrency")
    queues, running = header.get("queues"), header.get("running", [])
    if (
        not isinstance(wid, str)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= p.MAX_CONCURRENCY
    ):
        raise ProtocolError(
            f"READY needs 'worker' (string) and 'concurrency' (int 1..{p.MAX_CONCURRENCY})"
        )
    if not _strings(queues):
        raise ProtocolError("READY needs 'queues' (list of strings)")
    if _strings(running):
        running = dict.fromkeys(running)  # ids without deliveries (any delivery)
    if not isinstance(running, dict) or not all(
        isinstance(t, str) and (d is None or isinstance(d, int)) for t, d in running.items()
    ):
        raise ProtocolError("READY 'running' must map task ids to delivery numbers")
    names = header.get("tasks", [])
    if not _strings(names):
        raise ProtocolError("READY 'tasks' must be a list of task names")
    schedules = header.get("periodic", [])
    if not isinstance(schedules, list):
        raise ProtocolError("READY 'periodic' must be a list of schedules")
    info = {k: header.get(k) for k in ("worker", "host", "pid", "concurrency", "queues")}
    info["tasks"] = len(names)
    info["names"] = names
    draining = bool(header.get("draining"))
    return Ready(
        wid, concurrency, queues, names, running, schedules, draining, sent_at(header), info
    )


def started(header: dict[str, Any]) -> Started:
    ids = header.get("ids")
    if ids is None:  # one task
        return Started([header.get("id")], [header.get("delivery")])
    deliveries = header.get("deliveries")  # several: "ids" and "deliveries", in step
    if not isinstance(ids, list) or not isinstance(deliveries, list):
        raise ProtocolError("STARTED needs 'id' or 'ids' and 'deliveries' (lists)")
    if len(ids) != len(deliveries):
        raise ProtocolError("STARTED 'ids' and 'deliveries' differ in length")
    return Started(ids, deliveries)


def progress(header: dict[str, Any]) -> Progress:
    task_id, info = header.get("id"), header.get("progress")
    if not isinstance(task_id, str) or not isinstance(info, dict):
        raise ProtocolError("PROGRESS needs 'id' and 'progress' (a map)")
    return Progress(task_id, delivery(header), info)


def done_batch(header: dict[str, Any], payload: list[Any]) -> list[tuple[Any, Any]]:
    """DONE: (header, result frame) per task; one DONE, or a batch under ``done``.
    Each entry's own fields are checked where it is handled: one bad entry costs
    itself only."""
    batch = header.get("done")
    if batch is None:
        return [(header, payload[0] if payload else b"")]
    if not isinstance(batch, list) or len(batch) != len(payload):
        raise ProtocolError("DONE 'done' must list one header per payload frame")
    return list(zip(batch, payload, strict=True))


def sent_at(header: dict[str, Any]) -> float | None:
    """A worker's send time ``t`` (its monotonic clock), if it says one."""
    sent = header.get("t")
    return sent if type(sent) is float else None


def delivery(header: dict[str, Any]) -> int | None:
    """The delivery a worker's report is about (see Dispatcher.held)."""
    value = header.get("delivery")
    return value if isinstance(value, int) else None
