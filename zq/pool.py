"""Where tasks run: what both pools share, and the thread pool.

The worker's supervisor thread owns the pool (this module's :class:`ThreadPool`, or
:class:`zq.procpool.ProcessPool`, the default). A pool exposes file descriptors for
the supervisor to poll and turns what becomes readable into events: :class:`Started`,
:class:`Progress` and :class:`Done`, named tuples whose first field names their kind
(``("started", task_id)``, ``("done", task_id, state, body, runtime, extras)``), as in
the process pool's messages from its children.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from zq import protocol as p
from zq.app import App, Task
from zq.context import TaskContext, running
from zq.errors import Retry

#: The kinds of events, each one's first field.
STARTED = "started"
PROGRESS = "progress"
DONE = "done"


class _StartedFields(NamedTuple):
    kind: str
    task_id: str


class Started(_StartedFields):
    """A task began to run: the worker reports it STARTED (unless it ends in the same
    turn of the supervisor's loop)."""

    # Each event class fills in its kind; built straight from a tuple (the field
    # class's own __new__ would be a second Python call per event, many per task).
    __slots__ = ()

    def __new__(cls, task_id: str) -> Started:
        return tuple.__new__(cls, (STARTED, task_id))


class _ProgressFields(NamedTuple):
    kind: str
    task_id: str
    info: dict[str, Any]


class Progress(_ProgressFields):
    """A running task's progress report (see :func:`zq.current_task`)."""

    __slots__ = ()

    def __new__(cls, task_id: str, info: dict[str, Any]) -> Progress:
        return tuple.__new__(cls, (PROGRESS, task_id, info))


class _DoneFields(NamedTuple):
    kind: str
    task_id: str
    state: str
    body: bytes
    runtime: float | None
    extras: dict[str, Any]


class Done(_DoneFields):
    """A task ended here, or was ended unrun: what its DONE says. ``body`` is the
    encoded value or failure; ``runtime`` is None for a task that did not run (it must
    not count in the broker's run times); ``extras`` go into the DONE header."""

    __slots__ = ()

    def __new__(
        cls, task_id: str, state: str, body: bytes, runtime: float | None, extras: dict[str, Any]
    ) -> Done:
        return tuple.__new__(cls, (DONE, task_id, state, body, runtime, extras))


Event = Started | Progress | Done
Outcome = tuple[str, bytes, dict[str, Any]]


def execute(
    app: App,
    header: dict[str, Any],
    payload: bytes,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Run one task of ``app``: (state, encoded value or failure info, DONE header extras).
    ``report`` carries the task's progress reports (see :func:`zq.current_task`)."""
    name = header.get("name", "")
    task = app.tasks.get(name)
    if task is None:
        done = unknown(app, header.get("id", ""), name)
        return done.state, done.body, done.extras
    try:
        args, kwargs = p.decode(payload)
        with running(TaskContext(header, report)):
            value = task.fn(*args, **kwargs)
    except Exception as exc:
        return _failed(task, header, exc)
    try:
        return p.SUCCESS, p.encode(value), {}
    except TypeError as exc:
        return p.FAILURE, p.failure("TypeError", f"the task's return value: {exc}"), {}


def _failed(task: Task, header: dict[str, Any], exc: Exception) -> Outcome:
    """FAILURE, or RETRY with a countdown if the task asked for one and has retries left."""
    policy = task.retry
    asked = isinstance(exc, Retry)
    cause = exc.exc if asked and exc.exc is not None else exc  # type: ignore[union-attr]
    info = p.failure(_type_name(cause), str(cause), traceback.format_exc())
    if not asked and not isinstance(exc, policy.autoretry_for):
        return p.FAILURE, info, {}
    attempt = int(header.get("retries", 0))
    if attempt >= policy.retries:
        message = f"{cause} (gave up after {attempt} retries)"
        return p.FAILURE, p.failure(_type_name(cause), message, traceback.format_exc()), {}
    try:
        countdown = policy.countdown(attempt, exc.countdown if asked else None)  # type: ignore[union-attr]
    except Exception as bad:  # a countdown the broker could not hold: fail, clearly
        return p.FAILURE, p.failure("ValueError", f"{bad} (on retrying: {cause})"), {}
    return p.RETRY, info, {"countdown": countdown}


def fenced(task_id: str, runtime: float | None) -> Done:
    """The DONE event of a keyed task stopped, or not started, because the worker's
    lease was past the fence: LOST, run again elsewhere, not counted as a crash."""
    why = "the worker lost touch with the broker: a keyed task stops (it runs again)"
    return Done(task_id, p.LOST, p.failure("zq.Fenced", why), runtime, {"fenced": True})


def unknown(app: App, task_id: str, name: str) -> Done:
    """The event for a task whose name this worker's app does not register: handed
    back (LOST ``unknown``), so the broker sends it to a worker that has the name and
    sends this one no more of it. The failure says which names the app has."""
    names = sorted(app.tasks)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    why = (
        f"task {name!r} is not registered in app {app.name!r} on this worker, which has "
        f"{len(names)} task(s): {shown or 'none'}. Is the worker running the right module?"
    )
    return Done(task_id, p.LOST, p.failure("zq.UnknownTask", why), None, {"unknown": True})


def returned(task_id: str, runtime: float | None = None) -> Done:
    """The event for a task handed back unrun (LOST ``returned``: requeued by the
    broker, not counted as a redelivery); ``runtime``: how long slots were stuck."""
    return Done(task_id, p.LOST, b"", runtime, {"returned": True})


def revoked(task_id: str, why: str) -> Done:
    """The event for a task revoked (with terminate) before or while it ran."""
    return Done(task_id, p.REVOKED, p.failure("zq.Revoked", why), 0.0, {})


def fence_closed(lease: float, fence_after: float) -> bool:
    """True once the worker's ``lease`` (the send time of its latest message the
    broker answered) is over ``fence_after`` s old: the broker may give this worker's
    keys to another, so no keyed task may start."""
    return time.monotonic() - lease > fence_after


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# -------------------------------------------------------------- thread pool


class ThreadPool:
    """``size`` threads in the supervisor's process, for I/O-bound tasks.

    A running task cannot be stopped: no time limits, no terminate, and no fence for a
    keyed task that is running when the worker is cut off. A keyed task is not started
    while the worker's lease is past the fence, though (it comes back LOST)."""

    failure: str | None = None  # (never: see ProcessPool.failure)

    def __init__(self, app: App, size: int, *, fence_after: float = float("inf")) -> None:
        self.app = app
        self.size = size
        # The lease (see ProcessPool.set_lease) and the fence: plain floats the threads
        # read (set_lease and set_fence write them).
        self._lease = time.monotonic()
        self._fence_after = fence_after
        self._jobs: queue.SimpleQueue[tuple[dict[str, Any], bytes, object] | None] = (
            queue.SimpleQueue()
        )
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_pending = False  # a byte is in the pipe that on_readable has not read
        self._running: dict[str, None] = {}  # ids held, in arrival order
        # Which jobs a thread may still take, under a lock shared with the threads:
        # task id -> the token of its job in the queue. A job withdrawn (given back,
        # revoked) stays in the queue; a thread skips a job whose token is not the one
        # listed here (none, or that of the same task submitted again since).
        self._lock = threading.Lock()
        self._waiting: dict[str, object] = {}
        self._threads: list[threading.Thread] = []
        self.changed = True

    def start(self) -> None:
        for i in range(self.size):
            thread = threading.Thread(target=self._serve, name=f"zq-task-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            header, payload, token = job
            task_id = header["id"]
            with self._lock:
                if self._waiting.get(task_id) is not token:
                    continue  # withdrawn
                del self._waiting[task_id]
            if header.get("key") is not None and fence_closed(self._lease, self._fence_after):
                self._emit(fenced(task_id, None))  # e.g. the process was frozen (SIGSTOP)
                continue
            self._emit(Started(task_id))
            start = time.monotonic()

            def report(info: dict[str, Any], task_id: str = task_id) -> None:
                self._emit(Progress(task_id, info))

            state, body, extra = execute(self.app, header, payload, report)
            self._emit(Done(task_id, state, body, time.monotonic() - start, extra))

    def _emit(self, event: Event) -> None:
        self._events.put(event)
        # One write per batch of events, not per event (a system call and a thread
        # switch each): on_readable clears the flag after reading the pipe and before
        # it drains the queue, so an event put here is seen by that drain or wakes it.
        if not self._wake_pending:
            self._wake_pending = True
            os.write(self._wake_w, b"x")

    def fds(self) -> list[int]:
        self.changed = False
        return [self._wake_r]

    def running(self) -> list[str]:
        return list(self._running)

    def set_fence(self, seconds: float) -> None:
        """The lease's age after which no keyed task starts."""
        self._fence_after = seconds

    def set_lease(self, when: float) -> None:
        self._lease = when

    def fence(self) -> list[Event]:
        return []  # a running thread cannot be stopped (unstarted keyed tasks are)

    def tick(self) -> list[Event]:
        return []

    def next_due(self) -> float | None:
        return None  # (no time limits, nothing to replace)

    def started(self) -> list[Event]:
        return []  # the threads report each task started themselves

    def terminate(self, task_id: str) -> list[Event] | None:
        """Drop ``task_id`` if no thread has taken it (its DONE event, REVOKED); else
        None: threads cannot be killed, a running task runs to its end (use the
        process pool)."""
        if not self._take_back([task_id]):
            return None
        return [revoked(task_id, "revoked before it started")]

    def waiting(self) -> int:
        """Tasks held that no thread has taken."""
        return len(self._waiting)

    def withdraw(self) -> list[str]:
        """Take back every task no thread has taken; their ids."""
        return self._take_back(list(self._waiting))

    def _take_back(self, ids: list[str]) -> list[str]:
        with self._lock:
            taken = [task_id for task_id in ids if task_id in self._waiting]
            for task_id in taken:
                del self._waiting[task_id]
        for task_id in taken:
            del self._running[task_id]
        return taken

    def submit(self, header: dict[str, Any], payload: bytes) -> None:
        task_id = header["id"]
        self._running[task_id] = None
        token = object()
        with self._lock:
            self._waiting[task_id] = token
        self._jobs.put((header, payload, token))

    def on_readable(self, fd: int) -> list[Event]:
        os.read(self._wake_r, 65536)
        self._wake_pending = False
        events: list[Event] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event.kind == DONE:
                self._running.pop(event.task_id, None)
            events.append(event)

    def close(self, timeout: float = 2.0) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        os.close(self._wake_r)
        os.close(self._wake_w)
