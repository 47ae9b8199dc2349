"""Where tasks run: a pool of child processes (default) or of threads.

The worker's supervisor thread owns the pool. A pool exposes file descriptors for the
supervisor to poll and turns what becomes readable into events::

    ("started", task_id)
    ("done", task_id, state, payload_bytes, runtime_seconds, header_extras)

(``progress`` events too.) The process pool reports a task started once it is still
with its child at the end of the supervisor's next loop turn (:meth:`ProcessPool.started`):
a message from the child for it cost the supervisor a pipe read and a wake-up per task,
and a task that ends by then needs no STARTED at all.

Child processes are started with the ``spawn`` method, so no ZeroMQ context or socket
ever crosses a ``fork()``; they talk to the supervisor over a pipe in msgpack (never
pickle). Each child watches its supervisor: if the supervisor dies or stops ticking
(SIGKILL, SIGSTOP), the child exits before the broker can declare the worker dead
and hand its keys to another worker (fencing; see docs/protocol.md).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import resource
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zq import protocol as p
from zq.app import App, Task, load_app
from zq.context import TaskContext, running
from zq.errors import Retry, SoftTimeLimitExceeded

Event = tuple[Any, ...]
Outcome = tuple[str, bytes, dict[str, Any]]

#: Exit code of a child that fenced itself off because its supervisor went silent.
FENCED_EXIT = 70
#: Seconds between a child's checks of its fence (at most; a tenth of the fence time
#: if that is less, so short heartbeats keep their margin).
FENCE_POLL = 0.1
#: Bytes read from a supervisor-child socket at a time.
READ_SIZE = 1 << 16
#: The supervisor-child framing (multiprocessing.Connection's): a length, then the
#: message (2 GiB and more: -1, then a 64-bit length).
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


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
        return (
            p.FAILURE,
            p.failure(
                "zq.UnknownTask",
                f"task {name!r} is not registered in app {app.name!r} on this worker "
                f"(it registers {len(app.tasks)} task(s); is the worker running the right app?)",
            ),
            {},
        )
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
    countdown = policy.countdown(attempt, exc.countdown if asked else None)  # type: ignore[union-attr]
    return p.RETRY, info, {"countdown": countdown}


def _fenced(task_id: str, runtime: float | None) -> Event:
    """The DONE event of a keyed task stopped, or not started, because the supervisor
    had not heard from the broker for the fence time: LOST, run again elsewhere, not
    counted as a crash."""
    why = "the worker lost touch with the broker: a keyed task stops (it runs again)"
    return ("done", task_id, p.LOST, p.failure("zq.Fenced", why), runtime, {"fenced": True})


def _fence_closed(heard: float, fence_after: float) -> bool:
    """True once the worker's lease (``heard``: the send time of its latest message the
    broker answered) is over ``fence_after`` s old: the broker may give this worker's
    keys to another, so no keyed task may start."""
    return time.monotonic() - heard > fence_after


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# ------------------------------------------------------------- process pool


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Worker-wide limits; a task's own ``time_limit``/``soft_time_limit`` win."""

    soft_time_limit: float | None = None  # seconds, then SoftTimeLimitExceeded in the task
    time_limit: float | None = None  # seconds, then the child process is killed
    max_tasks_per_child: int | None = None  # then the child is replaced
    max_memory_per_child: int | None = None  # KiB of peak RSS, then the child is replaced

    def for_task(self, app: App, name: str) -> tuple[float | None, float | None]:
        """(soft, hard) time limits for the task called ``name``."""
        task = app.tasks.get(name)
        soft = task.soft_time_limit if task and task.soft_time_limit else self.soft_time_limit
        hard = task.time_limit if task and task.time_limit else self.time_limit
        return soft, hard


def _soft_limit_reached(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("the task's soft time limit was reached")


def _child_main(
    spec: str, sock: socket.socket, heard: Any, fence_after: Any, parent: int, limits: Limits
) -> None:
    """Entry point of a pool child: run the tasks the supervisor sends, one at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGALRM, _soft_limit_reached)
    keyed = threading.Event()  # set while the task running here has a key
    args = (heard, fence_after, parent, keyed)
    threading.Thread(target=_fence, args=args, daemon=True).start()
    app = load_app(spec)
    retiring = False
    framer = _Framer()
    for ran in itertools.count(1):
        while not framer.messages:  # the supervisor sends one task at a time
            data = sock.recv(READ_SIZE)
            if not data:
                return  # the supervisor closed our socket
            framer.add(data)
        header, payload = p.decode(framer.messages.popleft())
        task_id = header["id"]
        if header.get("key") is not None:
            if _fence_closed(heard.value, fence_after.value):
                _send_message(sock, p.encode([*_fenced(task_id, None), False]))
                continue
            keyed.set()
        soft, _ = limits.for_task(app, header.get("name", ""))
        start = time.monotonic()
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)

        def report(info: dict[str, Any], task_id: str = task_id) -> None:
            _send_message(sock, p.encode(["progress", task_id, info]))

        try:
            state, body, extra = execute(app, header, payload, report)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        runtime = time.monotonic() - start
        keyed.clear()
        # Recycled after this task (task count or peak memory): said in its "done", so
        # that the supervisor gives it no other task to die with (it would come back
        # LOST, as if the child had crashed) and starts a fresh child when it exits.
        if limits.max_tasks_per_child is not None and ran >= limits.max_tasks_per_child:
            retiring = True
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if limits.max_memory_per_child and peak_kib > limits.max_memory_per_child:
            retiring = True
        done = ["done", header["id"], state, body, runtime, extra, retiring]
        _send_message(sock, p.encode(done))
        if retiring:
            # Out now, whatever the task left running (a non-daemon thread would keep
            # a normal exit waiting, and the child would hold its slot with no task).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _fence(heard: Any, fence_after: Any, parent: int, keyed: threading.Event) -> None:
    """Exit the child when its supervisor is gone (SIGKILL), or, while it runs a keyed
    task, when the supervisor's lease is over ``fence_after`` seconds old (a partition
    either way, a frozen supervisor or broker): the broker may soon give the key to another
    worker, and a key must never run twice at once. Unkeyed tasks run on."""
    while True:
        time.sleep(min(FENCE_POLL, fence_after.value / 10))
        if os.getppid() != parent:
            os._exit(FENCED_EXIT)
        if keyed.is_set() and _fence_closed(heard.value, fence_after.value):
            os._exit(FENCED_EXIT)


class _Child:
    __slots__ = (
        "deadline",
        "fed_turn",
        "framer",
        "hard",
        "keyed",
        "proc",
        "reported",
        "retiring",
        "sock",
        "started",
        "task",
    )

    def __init__(self, proc: Any, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock  # blocking, but read only with MSG_DONTWAIT
        self.framer = _Framer()
        self.task: str | None = None
        self.keyed = False  # its task has a key
        self.started = 0.0  # when it was given its task
        self.fed_turn = 0  # the supervisor's loop turn it was given its task in
        self.reported = False  # its task was reported started
        self.retiring = False  # it exits after its task (recycled): feed it nothing more
        self.deadline: float | None = None  # when the hard time limit kills it
        self.hard = 0.0


class ProcessPool:
    """``size`` child processes running tasks of the app named by ``spec``."""

    def __init__(
        self, app: App, spec: str, size: int, *, fence_after: float, limits: Limits
    ) -> None:
        self.app = app
        self.spec = spec
        self.size = size
        self.fence_after = fence_after
        self.limits = limits
        self._mp = multiprocessing.get_context("spawn")
        # Shared with the children: the lease (see hear), and the fence.
        self._heard = self._mp.RawValue("d", time.monotonic())
        self._fence_after = self._mp.RawValue("d", fence_after)
        self._children: dict[int, _Child] = {}  # by pipe fd
        self._backlog: deque[tuple[dict[str, Any], bytes]] = deque()
        self._turn = 0  # the supervisor's loop turns, counted by started()
        self.changed = True  # the set of fds to poll changed

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        # A socket pair read in whole buffers: one recv per wake-up for all that came.
        # (A multiprocessing Connection cost the supervisor a poll, with a selector
        # made per call, two reads and another poll per message.)
        mine, theirs = socket.socketpair()
        proc = self._mp.Process(
            target=_child_main,
            name="zq-child",
            daemon=True,
            args=(self.spec, theirs, self._heard, self._fence_after, os.getpid(), self.limits),
        )
        proc.start()
        theirs.close()
        self._children[mine.fileno()] = _Child(proc, mine)
        self.changed = True

    def fds(self) -> list[int]:
        self.changed = False
        return list(self._children)

    def running(self) -> list[str]:
        held = [c.task for c in self._children.values() if c.task is not None]
        return held + [h["id"] for h, _ in self._backlog]

    def waiting(self) -> int:
        """Tasks held that no child has started."""
        return len(self._backlog)

    def withdraw(self) -> list[str]:
        """Take back every task no child has started; their ids."""
        ids = [header["id"] for header, _ in self._backlog]
        self._backlog.clear()
        return ids

    def set_fence(self, seconds: float) -> None:
        """The lease's age after which children running keyed tasks stop."""
        self._fence_after.value = seconds

    def started(self) -> list[Event]:
        """At the end of each supervisor loop turn: the tasks given to a child in an
        earlier turn that have not ended, as started (each once)."""
        events: list[Event] = []
        for child in self._children.values():
            if child.task is not None and not child.reported and child.fed_turn < self._turn:
                child.reported = True
                events.append(("started", child.task))
        self._turn += 1
        return events

    def hear(self, when: float) -> None:
        """The broker answered a message this worker sent at ``when`` (the lease): the
        children fence themselves on it."""
        self._heard.value = when

    def fence(self) -> list[Event]:
        """Stop every keyed task given to a child (running, or still in its pipe): the
        supervisor gave its connection up, the broker may give the keys to others. The
        children would stop them on their own, unless they were frozen too and thaw
        only once a new connection has made the broker's silence look over."""
        events: list[Event] = []
        for fd, child in list(self._children.items()):
            if child.task is not None and child.keyed:
                events += self.on_readable(fd)  # it may have ended it: no kill then
                if self._children.get(fd) is child and child.task is not None:
                    events.append(_fenced(*self._stop(fd, child)))
        return events

    def tick(self) -> list[Event]:
        """Kill the children past their task's hard time limit."""
        now = time.monotonic()
        events: list[Event] = []
        for fd, child in list(self._children.items()):
            if child.deadline is not None and now >= child.deadline and child.task is not None:
                reason = (
                    f"the hard time limit ({child.hard:g}s) was exceeded; the process "
                    "running the task was killed and replaced"
                )
                events.append(self._kill(fd, child, p.FAILURE, "zq.TimeLimitExceeded", reason))
        if events:
            self._feed()
        return events

    def terminate(self, task_id: str) -> Event | None:
        """Stop ``task_id`` (revoke with terminate): kill the child process running it
        (the one the supervisor gave it to, and no other) or drop it from the backlog.
        Returns its DONE event (REVOKED), or None if it is not here."""
        for fd, child in list(self._children.items()):
            if child.task == task_id:
                pid = child.proc.pid
                why = f"revoked: the process running it (pid {pid}) was killed and replaced"
                event = self._kill(fd, child, p.REVOKED, "zq.Revoked", why)
                self._feed()
                return event
        for item in self._backlog:
            if item[0]["id"] == task_id:
                self._backlog.remove(item)
                why = "revoked before it started"
                return ("done", task_id, p.REVOKED, p.failure("zq.Revoked", why), 0.0, {})
        return None

    def _kill(self, fd: int, child: _Child, state: str, kind: str, why: str) -> Event:
        """Kill a child for a reason of ours (its task is not LOST) and replace it."""
        task, runtime = self._stop(fd, child)
        return ("done", task, state, p.failure(kind, why), runtime, {})

    def _stop(self, fd: int, child: _Child) -> tuple[str, float]:
        """Kill a child and replace it; its task's id and how long it had it."""
        child.proc.kill()
        task, child.task = child.task, None
        self._bury(fd, child)
        assert task is not None
        return task, time.monotonic() - child.started

    def submit(self, header: dict[str, Any], payload: bytes) -> None:
        self._backlog.append((header, payload))
        self._feed()

    def _feed(self) -> None:
        for fd, child in list(self._children.items()):
            if not self._backlog:
                return
            if child.task is not None or child.retiring:
                continue
            header, payload = self._backlog.popleft()
            try:
                _send_message(child.sock, p.encode([header, payload]))
            except OSError:  # it died (e.g. fenced) before we read its EOF: use another
                self._backlog.appendleft((header, payload))
                self._bury(fd, child)
                self._feed()  # the replacement can take it (its pipe buffers until it runs)
                return
            child.task = header["id"]
            child.keyed = header.get("key") is not None
            child.started = time.monotonic()
            child.fed_turn, child.reported = self._turn, False
            _, hard = self.limits.for_task(self.app, header.get("name", ""))
            child.hard = hard or 0.0
            child.deadline = time.monotonic() + hard if hard else None

    def on_readable(self, fd: int) -> list[Event]:
        child = self._children.get(fd)
        if child is None:  # buried in this turn (time limit, terminate) after the poll
            return []
        events: list[Event] = []
        closed = self._read(child)
        messages = child.framer.messages
        while messages:  # what it said before it died still counts
            event = tuple(p.decode(messages.popleft()))
            if event[0] == "done":
                child.task = None
                child.retiring = bool(event[6:7] and event[6])
                event = event[:6]
            events.append(event)
        if closed:
            events += self._bury(fd, child)
        self._feed()
        return events

    @staticmethod
    def _read(child: _Child) -> bool:
        """Read all a child's socket holds into its framer; whether it has closed."""
        while True:
            try:
                # Without waiting: the fd may be a replacement child's that reuses a
                # buried one's number and has nothing to say (a bare read would block).
                data = child.sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            child.framer.add(data)
            if len(data) < READ_SIZE:
                return False

    def _bury(self, fd: int, child: _Child) -> list[Event]:
        """A child died: report its task LOST, start a replacement."""
        del self._children[fd]
        child.sock.close()
        child.proc.join(1.0)
        code = child.proc.exitcode
        self._spawn()
        if child.task is None:
            return []
        # LOST: the broker runs it again (at the head of its key's lane), or after too
        # many deaths makes it a dead letter, so a poison task neither loops nor vanishes.
        if code == FENCED_EXIT:
            return [_fenced(child.task, time.monotonic() - child.started)]
        reason = f"the worker process running the task died (exit code {code})"
        return [("done", child.task, p.LOST, p.failure("zq.WorkerLost", reason), 0.0, {})]

    def close(self, timeout: float = 2.0) -> None:
        for child in self._children.values():
            child.sock.close()
        deadline = time.monotonic() + timeout
        for child in self._children.values():
            child.proc.join(max(0.0, deadline - time.monotonic()))
            if child.proc.is_alive():
                child.proc.kill()
                child.proc.join(1.0)
        self._children.clear()


class _Framer:
    """Whole messages out of the bytes read from a supervisor-child socket, in
    :attr:`messages`; a large one comes in many reads and is joined once."""

    __slots__ = ("_chunks", "_held", "_need", "messages")

    def __init__(self) -> None:
        self.messages: deque[memoryview] = deque()
        self._chunks: list[bytes] = []  # read, not yet a whole message
        self._held = 0  # their bytes
        self._need = 1  # bytes the next message needs, once its length is in

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held < self._need:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        at, end, self._need = 0, len(data), 1
        while end - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(data, at)
            start = at + _LENGTH.size
            if size == -1:
                if end - start < _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(data, start)
                start += _LONG_LENGTH.size
            if end - start < size:
                self._need = start + size - at
                break
            self.messages.append(memoryview(data)[start : start + size])
            at = start + size
        self._chunks = [data[at:]] if at < end else []
        self._held = end - at


def _send_message(sock: socket.socket, message: bytes) -> None:
    """Send one whole message over a supervisor-child socket, framed for a
    :class:`_Framer` (blocking while the other side's socket buffer is full)."""
    size = len(message)
    head = _LENGTH.pack(size) if size < 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    if size <= 16384:  # one write for a small message (a copy costs less than a syscall)
        sock.sendall(head + message)
    else:
        sock.sendall(head)
        sock.sendall(message)


# -------------------------------------------------------------- thread pool


class ThreadPool:
    """``size`` threads in the supervisor's process, for I/O-bound tasks.

    A running task cannot be stopped: no time limits, no terminate, and no fence for a
    keyed task that is running when the broker goes silent. A keyed task is not
    started while the broker is silent past the fence, though (it comes back LOST)."""

    def __init__(self, app: App, size: int, *, fence_after: float = float("inf")) -> None:
        self.app = app
        self.size = size
        # The lease (see ProcessPool.hear) and the fence: plain floats the threads
        # read (hear and set_fence write them).
        self._heard = time.monotonic()
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
            if header.get("key") is not None and _fence_closed(self._heard, self._fence_after):
                self._emit(_fenced(task_id, None))  # e.g. the process was frozen (SIGSTOP)
                continue
            self._emit(("started", task_id))
            start = time.monotonic()

            def report(info: dict[str, Any], task_id: str = task_id) -> None:
                self._emit(("progress", task_id, info))

            state, body, extra = execute(self.app, header, payload, report)
            self._emit(("done", task_id, state, body, time.monotonic() - start, extra))

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

    def hear(self, when: float) -> None:
        self._heard = when

    def fence(self) -> list[Event]:
        return []  # a running thread cannot be stopped (unstarted keyed tasks are)

    def tick(self) -> list[Event]:
        return []

    def started(self) -> list[Event]:
        return []  # the threads report each task started themselves

    def terminate(self, task_id: str) -> Event | None:
        """Drop ``task_id`` if no thread has taken it (its DONE event, REVOKED); else
        None: threads cannot be killed, a running task runs to its end (use the
        process pool)."""
        if not self._take_back([task_id]):
            return None
        return (
            "done",
            task_id,
            p.REVOKED,
            p.failure("zq.Revoked", "revoked before it started"),
            0.0,
            {},
        )

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
            if event[0] == "done":
                self._running.pop(event[1], None)
            events.append(event)

    def close(self, timeout: float = 2.0) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        os.close(self._wake_r)
        os.close(self._wake_w)
