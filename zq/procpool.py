"""The process pool: child processes that run tasks, fed and heard by the supervisor.

The pool reports a task started once it is still with its child at the end of the
supervisor's next loop turn (:meth:`ProcessPool.started`): a message from the child
for it cost the supervisor a read and a wake-up per task, and a task that ends by
then needs no STARTED at all.

Child processes are started with the ``spawn`` method, so no ZeroMQ context or socket
ever crosses a ``fork()``; they talk to the supervisor over a socket pair in msgpack
(never pickle). Each child watches its supervisor: if the supervisor dies or its lease
with the broker runs out (SIGKILL, SIGSTOP, a partition), the child stops a keyed task
before the broker can declare the worker dead and hand its keys to another worker
(fencing; see docs/protocol.md).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from zq import protocol as p
from zq.app import App, load_app
from zq.errors import SoftTimeLimitExceeded
from zq.pool import Event, execute, fence_closed, fenced

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
            if fence_closed(heard.value, fence_after.value):
                _send_message(sock, p.encode([*fenced(task_id, None), False]))
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
        if keyed.is_set() and fence_closed(heard.value, fence_after.value):
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
                    events.append(fenced(*self._stop(fd, child)))
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
            return [fenced(child.task, time.monotonic() - child.started)]
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
