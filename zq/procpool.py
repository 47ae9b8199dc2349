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

import bisect
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zq import protocol as p
from zq.app import App, load_app
from zq.errors import SoftTimeLimitExceeded
from zq.pool import Done, Event, Progress, Started, execute, fence_closed, fenced, returned, revoked
from zq.poolwire import (
    READ_SIZE,
    Cancel,
    Ended,
    Framer,
    FromChild,
    Given,
    Ready,
    Run,
    Skipped,
    from_child,
    read_now,
    send,
    to_child,
)
from zq.settings import setting

log = logging.getLogger("zq.worker")

#: Seconds before a child that died loading the app is replaced, doubled for each
#: such death in a row (a child that cannot start must not make the supervisor a loop
#: of process starts).
BOOT_RETRY = 0.5
#: Children in a row that die loading the app before the pool gives up (see failure).
BOOT_FAILURES_MAX = 5
#: Exit code of a child that fenced itself off because its supervisor went silent.
FENCED_EXIT = 70
#: Seconds between a child's checks of its fence (at most; a tenth of the fence time
#: if that is less, so short heartbeats keep their margin).
FENCE_POLL = 0.1


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Worker-wide limits; a task's own ``time_limit``/``soft_time_limit`` win."""

    soft_time_limit: float | None = setting(
        None,
        help="Seconds after which zq.SoftTimeLimitExceeded is raised inside a task, unless "
        "the task sets its own.",
        shown="none",
    )
    time_limit: float | None = setting(
        None,
        help="Seconds after which the process running a task is killed and replaced and "
        "the task fails, unless the task sets its own.",
        shown="none",
    )
    max_tasks_per_child: int | None = setting(
        None, help="Replace a child process after it ran this many tasks.", shown="never"
    )
    max_memory_per_child: int | None = setting(
        None,
        help="Replace a child process after a task left its peak memory (RSS) above this many KiB.",
        shown="never",
    )

    def for_task(self, app: App, name: str) -> tuple[float | None, float | None]:
        """(soft, hard) time limits for the task called ``name``."""
        task = app.tasks.get(name)
        soft = task.soft_time_limit if task and task.soft_time_limit else self.soft_time_limit
        hard = task.time_limit if task and task.time_limit else self.time_limit
        return soft, hard


def _soft_limit_reached(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("the task's soft time limit was reached")


def _child_main(
    spec: str,
    sock: socket.socket,
    lease: Any,
    fence_after: Any,
    parent: int,
    limits: Limits,
    at: Any,
) -> None:
    """Entry point of a pool child: run the tasks the supervisor sends, in order, one
    at a time, and say each one's outcome as soon as it has it.

    Messages (:mod:`zq.poolwire`) in: :class:`Run` (a batch: several short tasks for
    one write) and :class:`Cancel` (do not start these). Out: :class:`Ready` once the
    app is loaded (nothing is sent to a child before: a large payload would fill the
    socket and block the supervisor until the import ended), ``Progress`` and
    :class:`Ended` events, and :class:`Skipped` for a cancelled task.
    Before a task starts, ``at`` says its number, then the socket is read again for
    cancels: see :meth:`ProcessPool._cancel` for why that order is safe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGALRM, _soft_limit_reached)
    keyed = threading.Event()  # set while the task running here has a key
    args = (lease, fence_after, parent, keyed)
    threading.Thread(target=_fence, args=args, daemon=True).start()
    app = load_app(spec)
    try:
        send(sock, Ready())
    except OSError:  # the supervisor gave up on us while we loaded the app
        return
    framer = Framer()
    queued: deque[Given] = deque()
    cancelled: set[int] = set()
    ran = 0
    while True:
        _take(framer, queued, cancelled)
        if not queued:
            try:
                data = sock.recv(READ_SIZE)  # nothing to do: wait for the supervisor
            except OSError:  # reset: it closed our socket with messages unread
                data = b""
            if not data:
                return  # it closed our socket
            framer.add(data)
            continue
        seq, header, payload = queued[0]
        at.value = seq  # first, then look for a cancel of it
        read_now(sock, framer)  # (closed: the blocking read after this task finds out)
        _take(framer, queued, cancelled)
        queued.popleft()
        task_id = header["id"]
        if seq in cancelled:
            cancelled.discard(seq)
            send(sock, Skipped(seq))
            continue
        if header.get("key") is not None:
            if fence_closed(lease.value, fence_after.value):
                send(sock, Ended(fenced(task_id, None), False))
                continue
            keyed.set()
        ran += 1
        soft, _ = limits.for_task(app, header.get("name", ""))
        start = time.monotonic()
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)

        def report(info: dict[str, Any], task_id: str = task_id) -> None:
            send(sock, Progress(task_id, info))

        try:
            state, body, extra = execute(app, header, payload, report)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        runtime = time.monotonic() - start
        keyed.clear()
        # Recycled after this task (task count or peak memory): said as it ends, so
        # that the supervisor takes back what it queued here (it would come back LOST,
        # as if the child had crashed) and starts a fresh child when it exits.
        retiring = limits.max_tasks_per_child is not None and ran >= limits.max_tasks_per_child
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if limits.max_memory_per_child and peak_kib > limits.max_memory_per_child:
            retiring = True
        send(sock, Ended(Done(task_id, state, body, runtime, extra), retiring))
        if retiring:
            # Out now, whatever the task left running (a non-daemon thread would keep
            # a normal exit waiting, and the child would hold its slot with no task).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _take(framer: Framer, queued: deque[Given], cancelled: set[int]) -> None:
    """A child takes in the whole messages read so far: tasks to run, cancels."""
    while framer.messages:
        message = to_child(framer.messages.popleft())
        if isinstance(message, Run):
            queued.extend(message.tasks)
        elif queued:  # a Cancel: of a number already passed it would stay, so not those
            cancelled.update(seq for seq in message.seqs if seq >= queued[0].seq)


def _fence(lease: Any, fence_after: Any, parent: int, keyed: threading.Event) -> None:
    """Exit the child when its supervisor is gone (SIGKILL), or, while it runs a keyed
    task, when the supervisor's lease is over ``fence_after`` seconds old (a partition
    either way, a frozen supervisor or broker): the broker may soon give the key to another
    worker, and a key must never run twice at once. Unkeyed tasks run on."""
    while True:
        time.sleep(min(FENCE_POLL, fence_after.value / 10))
        if os.getppid() != parent:
            os._exit(FENCED_EXIT)
        if keyed.is_set() and fence_closed(lease.value, fence_after.value):
            os._exit(FENCED_EXIT)


#: A task the pool holds and no child has (its backlog): (header, payload). A plain
#: tuple: one is made per task submitted, and a named one costs 5 times as much.
_Job = tuple[dict[str, Any], bytes]


class _Child:
    __slots__ = (
        "at",
        "booted",
        "cancelled",
        "deadline",
        "done",
        "framer",
        "given",
        "head_turn",
        "numbered",
        "proc",
        "reported",
        "retiring",
        "sock",
        "started",
    )

    def __init__(self, proc: Any, sock: socket.socket, at: Any) -> None:
        self.proc = proc
        self.sock = sock  # blocking, but read only with MSG_DONTWAIT
        self.at = at  # shared: the number of the task it starts or runs
        self.booted = False  # it said "ready": it has loaded the app, it reads its socket
        self.framer = Framer()
        # Given to it, in order, and not reported back: the first may be running, the
        # others have not started (it runs them in order and reports each at once).
        self.given: deque[Given] = deque()
        self.numbered = 0  # the number of the last task given to it
        # Cancelled, by number: what a "skipped" does. None: nothing (taken back at the
        # cancel); for those it may still start: "revoked" or "returned" (an event
        # says so), "requeue" (back to the backlog: see _steal).
        self.cancelled: dict[int, str | None] = {}
        self.done = 0  # tasks it reported done (its budget, with max_tasks_per_child)
        self.started = 0.0  # when its first task became first
        self.head_turn = 0  # the supervisor's loop turn that happened in
        self.reported = False  # its first task was reported started
        self.retiring = False  # it exits after its task (recycled): feed it nothing more
        self.deadline: float | None = None  # when the hard time limit kills its first task

    @property
    def task(self) -> str | None:
        """The task it runs (or is about to start)."""
        return self.given[0].header["id"] if self.given else None

    @property
    def keyed(self) -> bool:
        """Its first task has a key (keyed tasks go alone)."""
        return bool(self.given) and self.given[0].header.get("key") is not None


class ProcessPool:
    """``size`` child processes running tasks of the app named by ``spec``.

    An idle child gets one task, or, when more tasks wait than there are idle children
    (the broker prefetched short tasks), an even share of them, up to ``BATCH`` and
    ``BATCH_BYTES``, in one message: a write and a wake-up per batch instead of per
    task. Keyed tasks and tasks with a hard time limit always go alone (the fence and
    the limit are per child). A child that goes idle with nothing waiting takes the
    unstarted half of the longest queue (see :meth:`_steal`), so one slow task holds
    up nothing another child could run."""

    BATCH = 8
    #: Payload bytes a batch may add to its first task: well under what a socket
    #: pair buffers (~200 KB), so that sending it never waits for the child (one
    #: that is still importing the app, say), and the supervisor never stalls.
    BATCH_BYTES = 64 * 1024

    def __init__(
        self, app: App, spec: str, size: int, *, fence_after: float, limits: Limits
    ) -> None:
        self.app = app
        self.spec = spec
        self.size = size
        self.limits = limits
        self._mp = multiprocessing.get_context("spawn")
        # Shared with the children: the lease (see set_lease), and the fence.
        self._lease = self._mp.RawValue("d", time.monotonic())
        self._fence_after = self._mp.RawValue("d", fence_after)
        self._children: dict[int, _Child] = {}  # by socket fd
        self._backlog: deque[_Job] = deque()
        self._turn = 0  # the supervisor's loop turns, counted by started()
        self._boot_failures = 0  # children in a row that died loading the app
        self._respawns: list[float] = []  # when to replace those (see tick)
        #: Why the pool cannot run tasks (its children die loading the app), or None.
        self.failure: str | None = None
        self.changed = True  # the set of fds to poll changed

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> int:
        # A socket pair read in whole buffers: one recv per wake-up for all that came.
        # (A multiprocessing Connection cost the supervisor a poll, with a selector
        # made per call, two reads and another poll per message.)
        mine, theirs = socket.socketpair()
        at = self._mp.RawValue("q", 0)
        proc = self._mp.Process(
            target=_child_main,
            name="zq-child",
            daemon=True,
            args=(
                self.spec,
                theirs,
                self._lease,
                self._fence_after,
                os.getpid(),
                self.limits,
                at,
            ),
        )
        proc.start()
        theirs.close()
        self._children[mine.fileno()] = _Child(proc, mine, at)
        self.changed = True
        return proc.pid

    def fds(self) -> list[int]:
        self.changed = False
        return list(self._children)

    def running(self) -> list[str]:
        held = [entry.header["id"] for c in self._children.values() for entry in c.given]
        return held + [header["id"] for header, _ in self._backlog]

    def waiting(self) -> int:
        """Tasks held that no child has started (as far as the supervisor knows), less
        one for each child still loading the app: it takes one as soon as it can (a
        slot that is starting up is not a slot stuck on a long task)."""
        queued = sum(len(c.given) - 1 for c in self._children.values() if c.given)
        return max(0, len(self._backlog) - self._booting()) + queued

    def _booting(self) -> int:
        """Children still loading the app (each about to take a task)."""
        return sum(not c.booted for c in self._children.values())

    def withdraw(self) -> list[str]:
        """Take back the tasks no child has started; their ids. A task queued in a
        child that may have just started it stays, and comes back later as a DONE,
        or as LOST ``returned`` if the child skips it. So do the first tasks of the
        backlog, one for each child still loading the app: it takes one as soon as it
        can, as a task already given to it would (see :meth:`waiting`)."""
        kept = [self._backlog.popleft() for _ in range(min(self._booting(), len(self._backlog)))]
        ids = [header["id"] for header, _ in self._backlog]
        self._backlog.clear()
        self._backlog.extend(kept)
        for child in list(self._children.values()):
            if len(child.given) > 1:
                taken = self._cancel(child, list(child.given)[1:], "returned")
                ids += [entry.header["id"] for entry in taken]
        return ids

    def set_fence(self, seconds: float) -> None:
        """The lease's age after which children running keyed tasks stop."""
        self._fence_after.value = seconds

    def started(self) -> list[Event]:
        """At the end of each supervisor loop turn: each child's first task, if it
        became first in an earlier turn and has not ended, as started (each once)."""
        events: list[Event] = []
        for child in self._children.values():
            if child.given and not child.reported and child.head_turn < self._turn:
                child.reported = True
                events.append(Started(child.given[0].header["id"]))
        self._turn += 1
        return events

    def set_lease(self, when: float) -> None:
        """The broker answered a message this worker sent at ``when`` (the lease): the
        children fence themselves on it."""
        self._lease.value = when

    def fence(self) -> list[Event]:
        """Stop every keyed task given to a child (running, or still in its socket):
        the supervisor gave its connection up, the broker may give the keys to others.
        The children would stop them on their own, unless they were frozen too and
        thaw only once a new connection has made the broker's silence look over."""
        events: list[Event] = []
        for fd, child in list(self._children.items()):
            if child.keyed:
                events += self.on_readable(fd)  # it may have ended it: no kill then
                if self._children.get(fd) is child and child.given:
                    events.append(fenced(*self._stop(fd, child)))
        return events

    def next_due(self) -> float | None:
        """When :meth:`tick` next has something to do (a hard time limit, a child to
        replace), or None: the supervisor's poll waits no longer."""
        deadlines = [c.deadline for c in self._children.values() if c.given and c.deadline]
        return min(deadlines + self._respawns[:1], default=None)

    def tick(self) -> list[Event]:
        """Kill the children past their task's hard time limit; replace those that
        died loading the app, once their wait is over."""
        now = time.monotonic()
        while self._respawns and self._respawns[0] <= now:
            self._respawns.pop(0)
            self._spawn()
        events: list[Event] = []
        for fd, child in list(self._children.items()):
            if child.deadline is not None and now >= child.deadline and child.given:
                _, hard = self.limits.for_task(self.app, child.given[0].header.get("name", ""))
                reason = (
                    f"the hard time limit ({hard:g}s) was exceeded; the process "
                    "running the task was killed and replaced"
                )
                events.append(self._kill(fd, child, p.FAILURE, "zq.TimeLimitExceeded", reason))
        if events:
            self._feed()
        return events

    def terminate(self, task_id: str) -> list[Event] | None:
        """Stop ``task_id`` (revoke with terminate): drop it from the backlog, have the
        child it was given to skip it, or kill that child if it runs it (that one and
        no other; what was queued behind it goes to other children). Returns the
        events that settle it (its REVOKED, or its DONE if it ended meanwhile), or
        None if it is not here. A child caught between choosing the task and reading
        the cancel is killed too (the task ends REVOKED, never run)."""
        events: list[Event] = []
        while True:  # again if the child it was with died: it went back, maybe elsewhere
            for job in self._backlog:
                if job[0]["id"] == task_id:
                    self._backlog.remove(job)
                    return [*events, revoked(task_id, "revoked before it started")]
            held = [
                (fd, child, entry)
                for fd, child in self._children.items()
                for entry in child.given
                if entry.header["id"] == task_id
            ]
            if not held:
                return events or None
            fd, child, entry = held[0]
            if entry is not child.given[0] and self._cancel(child, [entry], "revoked"):
                return [*events, revoked(task_id, "revoked before it started")]
            events += self.on_readable(fd)  # it may have ended, or been skipped, by now
            if self._children.get(fd) is child and child.task == task_id:
                pid = child.proc.pid
                why = f"revoked: the process running it (pid {pid}) was killed and replaced"
                events.append(self._kill(fd, child, p.REVOKED, "zq.Revoked", why))
                self._feed()
                return events
            if task_id not in self.running():
                return events

    def _cancel(self, child: _Child, entries: list[Given], why: str) -> list[Given]:
        """Tell ``child`` not to start ``entries`` (not its first); those it surely
        will not start are taken back from it and returned. For the others ``why``
        says what their "skipped" does, if the child skips them (it may have started
        one already: then its DONE comes as usual).

        The child writes a task's number to ``at`` *before* it reads its socket for
        cancels and starts the task; this side sends the cancel *before* it reads
        ``at``. So a task numbered above what ``at`` says here cannot have been
        checked yet: the child will see the cancel and skip it. (Both sides go through
        a system call on the same socket between their write and their read, and the
        kernel takes that socket's lock in both: the two cannot pass each other.)"""
        try:
            send(child.sock, Cancel([entry.seq for entry in entries]))
        except OSError:  # it has died: it can start nothing more
            at = -1
        else:
            at = child.at.value
        taken: list[Given] = []
        for entry in entries:
            if at < 0 or entry.seq > at:
                child.given.remove(entry)
                if at >= 0:
                    child.cancelled[entry.seq] = None  # its "skipped" will say nothing
                taken.append(entry)
            else:  # a first cancel's word stands (a revoke is not undone by a steal)
                child.cancelled.setdefault(entry.seq, why)
        return taken

    def _kill(self, fd: int, child: _Child, state: str, kind: str, why: str) -> Done:
        """Kill a child for a reason of ours (its task is not LOST) and replace it."""
        task, runtime = self._stop(fd, child, _KILLED_FOR.get(kind, kind))
        return Done(task, state, p.failure(kind, why), runtime, {})

    def _stop(
        self, fd: int, child: _Child, reason: str = "stopped: the broker's lease ran out (fenced)"
    ) -> tuple[str, float]:
        """Kill a child and replace it; its first task's id and how long it had it
        (what was queued behind it goes back to the backlog). ``reason`` is for the log."""
        child.proc.kill()
        task_id = child.given.popleft().header["id"]
        self._take_back(child, 0)
        self._bury(fd, child, killed=f"task {task_id} {reason}")
        return task_id, time.monotonic() - child.started

    def submit(self, header: dict[str, Any], payload: bytes) -> None:
        self._backlog.append((header, payload))
        self._feed()

    def _feed(self) -> None:
        """Give the idle children work: from the backlog, one task each, or, with more
        tasks than idle children, an even share each of the tasks that may go
        together; with the backlog empty, what waits in a busy child (see _steal)."""
        idle = [
            (fd, c)
            for fd, c in self._children.items()
            if c.booted and not c.given and not c.retiring
        ]
        if not idle:  # (most calls: a child reported while the others are busy)
            return
        booting = self._booting()
        while idle and (self._backlog or self._steal()):
            fd, child = idle.pop()
            batch = self._batch(child, len(idle) + 1 + booting)  # a share for each
            if not self._give(fd, child, batch):
                self._backlog.extendleft(reversed(batch))
                self._feed()  # the replacement can take it (it reads once it runs)
                return

    def _batch(self, child: _Child, idle: int) -> list[_Job]:
        """The backlog's first task, and, if it may go with others, those after it
        that may too: up to an even share over ``idle`` children, BATCH, BATCH_BYTES
        and the tasks ``child`` has left before it is recycled."""
        batch = [self._backlog.popleft()]
        if not self._batchable(batch[0][0]):
            return batch
        share = min(self.BATCH, -(-(len(self._backlog) + 1) // idle))
        if self.limits.max_tasks_per_child is not None:
            share = min(share, max(1, self.limits.max_tasks_per_child - child.done))
        size = 0
        while len(batch) < share and self._backlog and self._batchable(self._backlog[0][0]):
            size += len(self._backlog[0][1])
            if size > self.BATCH_BYTES:
                break
            batch.append(self._backlog.popleft())
        return batch

    def _batchable(self, header: dict[str, Any]) -> bool:
        return (
            header.get("key") is None
            and not self.limits.for_task(self.app, header.get("name", ""))[1]
        )

    def _steal(self) -> bool:
        """Take back, into the backlog, the unstarted back half of the longest queue
        in a child (a child is idle and nothing else waits); whether any came."""
        busiest = max(self._children.values(), key=lambda c: len(c.given), default=None)
        if busiest is None or len(busiest.given) < 2:
            return False
        unstarted = [e for e in list(busiest.given)[1:] if e.seq not in busiest.cancelled]
        if not unstarted:
            return False
        taken = self._cancel(busiest, unstarted[len(unstarted) // 2 :], "requeue")
        self._backlog.extend((entry.header, entry.payload) for entry in taken)
        return bool(taken)

    def _give(self, fd: int, child: _Child, batch: list[_Job]) -> bool:
        """Send an idle child its tasks; False if it died meanwhile (buried now)."""
        given = []
        for header, payload in batch:
            child.numbered += 1
            given.append(Given(child.numbered, header, payload))
        try:
            send(child.sock, Run(given))
        except OSError:  # it died (e.g. fenced) before we read its EOF
            self._bury(fd, child)
            return False
        child.given.extend(given)
        self._became_first(child)
        return True

    def _became_first(self, child: _Child) -> None:
        """Its first task changed (given, or the one before it ended): time it from
        now, report it started at the end of the next turn, arm its hard limit."""
        if not child.given:
            return  # (its deadline counts only while it holds a task: see tick)
        child.started = time.monotonic()
        child.head_turn, child.reported = self._turn, False
        _, hard = self.limits.for_task(self.app, child.given[0].header.get("name", ""))
        child.deadline = child.started + hard if hard else None

    def on_readable(self, fd: int) -> list[Event]:
        child = self._children.get(fd)
        if child is None:  # buried in this turn (time limit, terminate) after the poll
            return []
        events: list[Event] = []
        # Without waiting: the fd may be a replacement child's that reuses a buried
        # one's number and has nothing to say (a bare read would block).
        closed = read_now(child.sock, child.framer)
        messages = child.framer.messages
        while messages:  # what it said before it died still counts
            message = from_child(messages.popleft())
            events += self._FROM_CHILD[type(message)](self, child, message)
        if closed:
            events += self._bury(fd, child)
        self._feed()
        return events

    def _on_ready(self, child: _Child, _: Ready) -> list[Event]:
        child.booted = True
        self._boot_failures = 0
        return []

    def _on_progress(self, child: _Child, progress: Progress) -> list[Event]:
        return [progress]

    def _on_ended(self, child: _Child, ended: Ended) -> list[Event]:
        """A task given to ``child`` ended: it is no longer held there; if the child
        retires, it starts nothing more (what it held behind comes back)."""
        child.done += 1
        task_id = ended.done.task_id
        for at, entry in enumerate(child.given):
            if entry.header["id"] == task_id:
                self._drop(child, at)
                break
        if ended.retiring:
            child.retiring = True
            self._take_back(child, 0)
        return [ended.done]

    def _drop(self, child: _Child, at: int) -> Given:
        """Remove the ``at``-th task given to ``child``, which it reported back."""
        entry = child.given[at]
        del child.given[at]
        child.cancelled.pop(entry.seq, None)
        if at == 0:
            self._became_first(child)
        return entry

    def _on_skipped(self, child: _Child, skipped: Skipped) -> list[Event]:
        """The child skipped a task on a cancel: settle it as the cancel said (nothing
        if it was taken back when cancelled)."""
        seq = skipped.seq
        why = child.cancelled.get(seq)
        at = next((i for i, entry in enumerate(child.given) if entry.seq == seq), None)
        if why is None or at is None:
            child.cancelled.pop(seq, None)
            return []
        _, header, payload = self._drop(child, at)
        if why == "requeue":
            self._backlog.appendleft((header, payload))
            return []
        if why == "revoked":
            return [revoked(header["id"], "revoked before it started")]
        return [returned(header["id"])]

    def _take_back(self, child: _Child, first: int) -> None:
        """Back to the front of the backlog, in order: the tasks given to ``child``
        from the ``first``-th on, which it has not started (it runs them in order)."""
        while len(child.given) > first:
            _, header, payload = child.given.pop()
            self._backlog.appendleft((header, payload))

    def _bury(self, fd: int, child: _Child, *, killed: str | None = None) -> list[Event]:
        """A child died (or was ``killed``, for that reason): report its first task
        LOST, give what it held behind that to the others, start a replacement."""
        del self._children[fd]
        child.sock.close()
        child.proc.join(1.0)
        code = child.proc.exitcode
        if child.booted:
            _log_replaced(child, code, killed, self._spawn())
        else:  # it held no task (none goes to a child before it is ready)
            self._boot_failures += 1
            pid = child.proc.pid
            why = f"pool process {pid} died loading the app {self.spec} (exit code {code})"
            if self._boot_failures >= BOOT_FAILURES_MAX:
                self.failure = f"{self._boot_failures} in a row: {why}"
            else:
                wait = BOOT_RETRY * 2 ** (self._boot_failures - 1)
                bisect.insort(self._respawns, time.monotonic() + wait)
                log.error("%s; the next one starts in %.1fs", why, wait)
        self._take_back(child, 1)
        if not child.given:
            return []
        task_id = child.given[0].header["id"]
        child.given.clear()
        # LOST: the broker runs it again (at the head of its key's lane), or after too
        # many deaths makes it a dead letter, so a poison task neither loops nor vanishes.
        if code == FENCED_EXIT:
            return [fenced(task_id, time.monotonic() - child.started)]
        reason = f"the worker process running the task died (exit code {code})"
        return [Done(task_id, p.LOST, p.failure("zq.WorkerLost", reason), 0.0, {})]

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

    #: What each message from a child does (see on_readable); each returns events.
    _FROM_CHILD: dict[type[FromChild], Callable[[Any, _Child, Any], list[Event]]] = {
        Ready: _on_ready,
        Progress: _on_progress,
        Ended: _on_ended,
        Skipped: _on_skipped,
    }


#: Why the pool killed a child, by the failure kind its task ends with (for the log).
_KILLED_FOR = {
    "zq.TimeLimitExceeded": "passed its hard time limit",
    "zq.Revoked": "was revoked with terminate",
}


def _log_replaced(child: _Child, code: int | None, killed: str | None, new_pid: int) -> None:
    """Log a child that went, why, and the one that takes its place: the broker logs
    the task's fate, but the worker's operator must see the process die here."""
    pid, task = child.proc.pid, child.task  # (a child killed for its task: in ``killed``)
    running = f" running task {task}" if task else ""
    if killed is not None:
        log.warning("killed pool process %d: %s; pool process %d replaces it", pid, killed, new_pid)
    elif child.retiring:
        log.info(
            "pool process %d retired after %d tasks; pool process %d replaces it",
            pid,
            child.done,
            new_pid,
        )
    elif code == FENCED_EXIT:
        log.warning(
            "pool process %d stopped%s: the broker's lease ran out (fenced); "
            "pool process %d replaces it",
            pid,
            running,
            new_pid,
        )
    else:
        log.warning(
            "pool process %d died (%s)%s; pool process %d replaces it",
            pid,
            _exit_status(code),
            running,
            new_pid,
        )


def _exit_status(code: int | None) -> str:
    """``exit code 3``, ``killed by SIGKILL``: how a child process ended."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
