"""The broker's core: one owner for every accepted task's life.

A task is entered (it waits for its workflow parents, or its ETA, or goes to its
queue), assigned, run, retried, handed back, and finished: SUCCESS or FAILURE from its
worker, or ended without a run (EXPIRED, REVOKED, a workflow step whose parent
failed), or buried as a dead letter. :class:`Tasks` holds that state and decides
every step; what the steps send and write goes to the :class:`zq.outbox.Outbox`
and the journal's open transaction, and the timers it arms go into its heap. It
touches no socket: the shell (:mod:`zq.broker`) parses messages, calls in here, and
sends the outbox once the journal commit is on disk.

Where a task is, is its state: in :attr:`Tasks.dispatch` (queued, running, waiting
out a retry), :attr:`Tasks.scheduled` (waiting for its ETA), :attr:`Tasks.graph`
(waiting for its parents), :attr:`Tasks.results` (finished) or
:attr:`Tasks.dead_letters`; :meth:`Tasks.state_of` reads it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from zq import protocol as p
from zq.dispatch import Assignment, Dispatcher, Task
from zq.journal import Journal, NullJournal
from zq.outbox import Outbox
from zq.results import ResultStore, Waiters
from zq.timers import TimerHeap
from zq.workers import Workers
from zq.workflow import Graph, check_links

if TYPE_CHECKING:
    from zq.broker import BrokerSettings

log = logging.getLogger("zq.broker")

#: Longest a FETCH may ask the broker to hold a wait for a result.
MAX_WAIT = 3600.0
#: Payloads up to this many bytes are kept as bytes rather than zero-copy frames.
SMALL_PAYLOAD = 4096

# What a timer in the heap is for: (kind, task id).
RETRY = "retry"  # a retry delay ran out: back to the head of the task's lane
ETA = "eta"  # a scheduled task's time came: into its queue
EXPIRE = "expire"  # a task not started by now ends EXPIRED


class Tasks:
    """Every accepted task, from SUBMIT to its final state (see the module docstring)."""

    def __init__(
        self, settings: BrokerSettings, counters: Counter[str], outbox: Outbox, workers: Workers
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.outbox = outbox
        self.workers = workers
        self.journal: Journal | NullJournal = NullJournal()  # the broker opens the real one
        self.dispatch = Dispatcher(max_redeliveries=settings.max_redeliveries)
        self.dead_letters: dict[str, Task] = {}
        self.scheduled: dict[str, Task] = {}  # accepted, waiting for their ETA
        self.graph = Graph()  # accepted, waiting for their parents (workflows)
        self.inputs: dict[str, list[Any]] = {}  # task id -> its parents' result bodies
        self.terminating: set[str] = set()  # running tasks revoked with terminate
        self.results = ResultStore(
            settings.result_ttl, settings.max_results, on_drop=self.result_dropped
        )
        self.waiters = Waiters()
        self.timers = TimerHeap()  # also the periodic schedules' (zq.periodic)
        self._unserved: set[tuple[str, str | None]] = set()  # (queue, name) logged unserved
        self.replaying = False  # no worker has connected yet: nothing is unserved

    # ------------------------------------------------------------ from clients

    def submit(self, client: str, tasks: list[Any], payload: list[Any]) -> tuple[list, dict]:
        """Accept what can be of one SUBMIT: returns (accepted ids, rejected id ->
        reason). A known id is a resend: accepted again, queued once."""
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        out: list[Assignment] = []
        for index, (task_header, body) in enumerate(zip(tasks, payload, strict=True)):
            reason = p.check_task_header(task_header) or check_links(task_header)
            if reason is None:
                unknown = [i for i in task_header.get("after") or () if not self.known(i)]
                if unknown:
                    reason = f"after: unknown task {unknown[0]!r}"
            if reason is not None:
                task_id = task_header.get("id") if isinstance(task_header, dict) else None
                if not isinstance(task_id, str) or not 0 < len(task_id) <= p.MAX_ID_LEN:
                    task_id = f"#{index}"  # no usable id: name it by its place in the batch
                rejected[task_id] = reason
                continue
            task_id = task_header["id"]
            if self.known(task_id):
                accepted.append(task_id)
                self.counters["duplicates"] += 1  # a resend: accepted once already
                continue
            full = self.full(task_header["queue"])
            if full is not None:
                rejected[task_id] = full
                continue
            accepted.append(task_id)
            task_header["client"] = client
            if len(body) <= SMALL_PAYLOAD:
                # A zero-copy frame would keep its share of libzmq's receive buffer
                # alive for as long as the task waits; a small payload is cheaper copied.
                body = _bytes(body)
            task = make_task(task_id, task_header, body)
            if self.journal.durable:
                self.journal.task_accepted(task_id, p.pack_header(task_header), _bytes(body))
            self.enter(task, out)
        self.dispatched(out)  # before the ACCEPTED: a lone task's latency runs through it
        self.counters["accepted"] += len(accepted)
        self.counters["rejected"] += len(rejected)
        return accepted, rejected

    def fetch(self, ident: bytes, ids: list[str], wait: float) -> None:
        """Answer a FETCH: each stored result now; with ``wait``, the others when they
        end (or until ``wait`` seconds pass); without, each one's state now."""
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        for task_id in ids:
            result = self.results.get(task_id)
            if result is not None:
                self.outbox.forward(ident, p.RESULT, result.header, result.payload)
                continue
            if wait:
                self.waiters.add(task_id, ident, deadline)
                continue
            reply = {"id": task_id, "state": self.state_of(task_id)}
            task = self.dispatch.tasks.get(task_id)
            if task is not None and task.progress is not None:
                reply["progress"] = task.progress
            if task is not None and self.waits_unserved(task):
                # So a caller can say why it waits.
                reply["unserved"] = {"queue": task.queue, "name": task.name}
            self.outbox.send(ident, p.RESULT, reply)

    def revoke(self, ids: list[str], terminate: bool) -> dict[str, list[str]]:
        """Revoke tasks: a waiting one ends REVOKED at once; a running one is stopped
        only with ``terminate`` (its worker kills the process running it and reports
        REVOKED). Returns what became of each id, by outcome."""
        reply: dict[str, list[str]] = {outcome: [] for outcome in p.REVOKE_OUTCOMES}
        out: list[Assignment] = []
        for task_id in ids:
            task = self.scheduled.pop(task_id, None) or self.graph.remove(task_id)
            if task is None:
                task, more = self.dispatch.cancel(task_id)
                out += more
            if task is not None:
                self.end_unrun(task, p.REVOKED, "was revoked before it ran")
                reply["revoked"].append(task_id)
                continue
            task = self.dispatch.tasks.get(task_id)
            if task is not None and task.worker is not None:
                if terminate:
                    # Remembered until it ends: a worker that re-attaches it, or one it
                    # is handed to, is told again (see stop_if_terminating).
                    self.terminating.add(task_id)
                    self.stop_if_terminating(task)
                    reply["terminating"].append(task_id)
                else:
                    reply["running"].append(task_id)
            elif task_id in self.results:
                reply["finished"].append(task_id)
            else:
                reply["unknown"].append(task_id)
        self.counters["revoke_requests"] += 1
        self.dispatched(out)
        return reply

    def requeue_dead(self, ids: list[str]) -> list[str]:
        """Run dead letters again, now (whatever their ETA or expiry said); returns the
        ids requeued."""
        requeued, out = [], []
        for task_id in ids:
            task = self.dead_letters.get(task_id)
            if task is None or task_id in self.dispatch.tasks:
                continue  # not a dead letter, or its id was submitted again meanwhile
            del self.dead_letters[task_id]
            self.results.discard(task_id)
            self.journal.dead_dropped(task_id)
            self.journal.result_dropped(task_id)
            task_header, body = task.data
            for field in ("redeliveries", "expires", "eta"):  # run it now, whatever it said
                task_header.pop(field, None)
            fresh = make_task(task.id, task_header, body)
            fresh.delivery = task.delivery  # late reports about old runs stay stale
            if self.journal.durable:
                self.journal.task_accepted(task_id, p.pack_header(task_header), _bytes(body))
            self.gather_inputs(fresh)
            out += self.dispatch.submit(fresh)
            requeued.append(task_id)
        self.dispatched(out)
        return requeued

    def dead_listing(self) -> list[dict[str, Any]]:
        """The dead letters, for ``zq dead list``."""
        return [
            {
                "id": t.id,
                "name": t.data[0]["name"],
                "queue": t.queue,
                "key": t.key,
                "redeliveries": t.redeliveries,
            }
            for t in self.dead_letters.values()
        ]

    # ------------------------------------------------------------------ timers

    def due(self, kind: str, task_id: str) -> None:
        """A timer of this core's came: a retry delay ran out (the task goes back to the
        head of its lane), an ETA came (into the queue), an expiry time passed."""
        if kind == RETRY:
            task = self.dispatch.tasks.get(task_id)
            if task is not None and task.retrying:
                self.journal.task_retrying(task_id, task.retries, None)
                self.dispatched(self.dispatch.release(task_id))
        elif kind == ETA:
            task = self.scheduled.pop(task_id, None)
            if task is not None:
                self.dispatched(self.dispatch.submit(task))
        elif kind == EXPIRE:
            self.expire(task_id)

    # -------------------------------------------------------------- the steps

    def now_served(self, queues: list[str], names: list[str]) -> None:
        """A worker takes these names from these queues: log them unserved again if
        they ever are."""
        self._unserved.difference_update((q, n) for q in queues for n in names)

    def worker_gone(self, wid: bytes, *, counts: bool = True) -> list[Task]:
        """A worker died or left: its tasks go back to the head of their lanes (or are
        given up on). ``counts``: a crash, not a departure on purpose. Returns them."""
        lost, out = self.dispatch.remove_worker(wid, counts=counts)
        self.count_redelivered(lost)
        self.end_terminated(lost)
        self.dispatched(out)
        return lost

    def known(self, task_id: str) -> bool:
        """True if the id was accepted already (a resent SUBMIT is a duplicate)."""
        return (
            self.unfinished_id(task_id) or task_id in self.results or task_id in self.dead_letters
        )

    def unfinished(self) -> int:
        return len(self.dispatch.tasks) + len(self.scheduled) + len(self.graph)

    def unfinished_id(self, task_id: str) -> bool:
        """True if the task was accepted and has not ended."""
        return task_id in self.dispatch.tasks or task_id in self.scheduled or task_id in self.graph

    def enter(self, task: Task, out: list[Assignment]) -> None:
        """An accepted task waits for its parents (``after``), or is admitted now."""
        after = task.data[0].get("after")
        if after is None:
            self.admit(task, out)
            return
        unfinished = []
        for parent in after:
            result = self.results.get(parent)
            if result is not None and result.state != p.SUCCESS:
                self._fail_dependent(task, parent, result.state, result.payload)
                return
            if result is None:
                if not self.unfinished_id(parent):
                    why = f"its parent task {parent} is not known (its result expired?)"
                    self.end_unrun(task, p.FAILURE, why)
                    return
                unfinished.append(parent)
        if unfinished:
            self.graph.add(task.id, task, unfinished)
        else:
            self._release_waiting(task, out)

    def _release_waiting(self, task: Task, out: list[Assignment]) -> None:
        """Every parent succeeded: take their results along, and admit the task."""
        header = task.data[0]
        args_from = header.get("args_from")
        if args_from is not None:
            bodies = []
            for parent in args_from:
                result = self.results.get(parent)
                if result is None:
                    why = f"the result of its parent task {parent} is no longer kept"
                    self.end_unrun(task, p.FAILURE, why)
                    return
                bodies.append(result.payload)
            self.inputs[task.id] = bodies
        countdown = header.get("countdown")
        if countdown is not None:  # a workflow step's countdown starts when it is released
            header["eta"] = time.time() + countdown
        self.admit(task, out)

    def _fail_dependent(self, task: Task, parent: str, state: str, body: Any) -> None:
        """A parent did not succeed: the task ends with the parent's outcome."""
        self.finish(task, state, self._caused(task, state, parent), body)

    def _caused(self, task: Task, state: str, parent: str) -> bytes:
        """The result header of a workflow step ended by its parent's outcome."""
        self.counters["workflow_cancelled"] += 1
        return p.pack_header({"id": task.id, "state": state, "cause": parent})

    def admit(self, task: Task, out: list[Assignment]) -> None:
        """An accepted task goes to its queue, or waits for its ETA; one whose expiry
        time has passed ends EXPIRED at once."""
        header = task.data[0]
        now, wall = time.monotonic(), time.time()
        expires = header.get("expires")
        if expires is not None:
            if expires <= wall:
                self.end_unrun(task, p.EXPIRED, "expired before a worker started it")
                return
            self.timers.add(now + (expires - wall), (EXPIRE, task.id))
        eta = header.get("eta")
        if eta is not None and eta > wall:
            self.scheduled[task.id] = task
            self.timers.add(now + (eta - wall), (ETA, task.id))
            return
        out += self.dispatch.submit(task)
        self.check_served(task)

    def check_served(self, task: Task) -> None:
        """Log, once until a worker takes it, that no connected worker takes this task's
        (queue, name): its tasks wait, and a user should hear why."""
        route = (task.queue, task.name)
        if self.replaying:
            return  # no worker has connected yet: they get the grace to re-attach
        if task.worker is None and not self.dispatch.serves(*route) and route not in self._unserved:
            self._unserved.add(route)
            what = "periodic task" if task.data[0].get("periodic") else "task"
            log.warning(
                "no connected worker serves %s %s on queue %r: its tasks wait until one "
                "that registers it connects (zq status lists them)",
                what,
                task.name,
                task.queue,
            )

    def end_unrun(self, task: Task, state: str, why: str) -> None:
        """Finish a task that no worker holds (expired, revoked, a workflow step that
        cannot get its inputs) without running it."""
        self.counters[state.lower()] += 1
        kind = _UNRUN_KINDS[state]
        body = p.failure(kind, f"task {task.id} {why}")
        self.finish(task, state, p.pack_header({"id": task.id, "state": state}), body)

    def full(self, queue: str) -> str | None:
        """Why the broker cannot take one more task for ``queue`` now, or None."""
        s = self.settings
        unfinished = self.unfinished()
        if unfinished >= s.max_queued:
            return f"broker full: {unfinished} tasks unfinished (limit {s.max_queued})"
        limit = s.max_queued_per_queue or s.max_queued
        if self.dispatch.queued.get(queue, 0) >= limit:
            return f"queue {queue!r} full: {limit} tasks waiting"
        return None

    def waits_unserved(self, task: Task) -> bool:
        """True if the task waits in a queue, for a name, that no connected worker takes."""
        return (
            task.worker is None
            and not task.retrying
            and not self.dispatch.serves(task.queue, task.name)
        )

    def state_of(self, task_id: str) -> str:
        task = self.dispatch.tasks.get(task_id)
        if task is None and (task_id in self.scheduled or task_id in self.graph):
            return p.QUEUED
        if task is None:
            result = self.results.get(task_id)
            return result.state if result is not None else p.PENDING
        if task.retrying:
            return p.RETRY
        return p.STARTED_STATE if task.started else p.QUEUED

    def stop_if_terminating(self, task: Task) -> None:
        """Tell the worker holding ``task`` to stop it, if it was revoked with terminate
        (a placeholder worker is told when it comes back)."""
        if task.id in self.terminating and task.worker is not None:
            peer = self.workers.find(task.worker)
            if peer is not None:
                self.outbox.send(peer.ident, p.REVOKE, {"id": task.id, "delivery": task.delivery})

    def expire(self, task_id: str) -> None:
        """End a task EXPIRED if it has not started (a running task runs on)."""
        task = self.scheduled.pop(task_id, None)
        out: list[Assignment] = []
        if task is None:
            task, out = self.dispatch.cancel(task_id)
        if task is not None:
            self.end_unrun(task, p.EXPIRED, "expired before a worker started it")
        self.dispatched(out)

    def finish(self, task: Task, state: str, head: bytes, body: Any) -> None:
        """Store a final result (journal too), publish it, answer the FETCH waits; then
        release the tasks that waited for it, or end them too if it failed (a loop, not
        recursion: a chain may be thousands of steps long)."""
        ending = [(task, state, head, body)]
        while ending:
            task, state, head, body = ending.pop()
            self._store_final(task, state, head, body)
            released, failed = self.graph.finished(task.id, state == p.SUCCESS)
            for child in failed:
                ending.append((child, state, self._caused(child, state, task.id), body))
            if released:
                out: list[Assignment] = []
                for child in released:
                    self._release_waiting(child, out)
                self.dispatched(out)

    def _store_final(self, task: Task, state: str, head: bytes, body: Any) -> None:
        self.inputs.pop(task.id, None)
        self.terminating.discard(task.id)
        task_header = task.data[0]
        ignored = task_header.get("ignore_result", False)
        if ignored:
            # A bodyless entry, so that a resent SUBMIT is still known as a duplicate.
            body = b""
        result = self.results.put(task.id, state, head, body, time.monotonic())
        self.journal.task_finished(task.id)
        if self.journal.durable:
            expires = time.time() + (result.expires - time.monotonic())
            self.journal.result_stored(task.id, state, head, _bytes(body), expires)
        if not ignored:
            self.outbox.result(task_header["client"], task.id, head, body)
        for waiter in self.waiters.pop(task.id):
            self.outbox.forward(waiter, p.RESULT, head, body)

    def _bury(self, task: Task) -> None:
        """A dead letter: its workers died under it too often. Kept for ``zq dead``."""
        self.counters["dead"] += 1
        self.dead_letters[task.id] = task
        message = (
            f"gave up after the worker process running it died {task.redeliveries} times; "
            f"inspect it with 'zq dead list', run it again with 'zq dead requeue {task.id}'"
        )
        log.error("task %s (%s) is a dead letter: %s", task.id, task.data[0]["name"], message)
        failure = p.failure("zq.DeadLetter", message)
        head = p.pack_header({"id": task.id, "state": p.DEAD})
        self.finish(task, p.DEAD, head, failure)
        if self.journal.durable:
            header, body = task.data
            self.journal.dead_stored(
                task.id, p.pack_header(header), _bytes(body), task.redeliveries
            )

    def count_redelivered(self, handed_back: list[Task]) -> None:
        """Count the handed-back tasks that were queued again (not given up on)."""
        self.counters["redelivered"] += sum(t.id in self.dispatch.tasks for t in handed_back)

    def dispatched(self, assignments: list[Assignment]) -> None:
        """Send the TASKs a scheduling decision made; bury the tasks it gave up on."""
        if self.dispatch.dead:
            # Taken first: burying finishes tasks, which may release workflow steps
            # and so come back here.
            dead, self.dispatch.dead = self.dispatch.dead, []
            for task in dead:
                self._bury(task)
        stopped: list[Assignment] = []
        for wid, task in assignments:
            if task.id in self.terminating:
                # Revoked with terminate, then handed back before its worker stopped it
                # (that worker was lost): it must not start again anywhere.
                stopped.append((wid, task))
                continue
            peer = self.workers.find(wid)
            assert peer is not None  # the dispatcher assigns to registered workers only
            task_header, body = task.data
            if task.redeliveries:
                task_header["redeliveries"] = task.redeliveries
            if task.retries:
                task_header["retries"] = task.retries
            task_header["delivery"] = task.delivery
            inputs = self.inputs.get(task.id, ())
            if inputs:
                task_header["inputs"] = len(inputs)
            self.outbox.task(peer.ident, p.pack_header(task_header), body, inputs)
            self.journal.task_assigned(task.id, wid.decode(), task.redeliveries, task.delivery)
        self.counters["dispatched"] += len(assignments) - len(stopped)
        for wid, task in stopped:
            _, more = self.dispatch.done(wid, task.id, task.delivery)
            self.end_unrun(task, p.REVOKED, "was revoked (terminate) and never ran again")
            self.dispatched(more)

    def end_terminated(self, handed_back: list[Task]) -> None:
        """Handed-back tasks that were revoked with terminate end REVOKED now, rather
        than wait in their queue for the assignment that would end them."""
        for task in handed_back:
            if task.id in self.terminating:
                cancelled, more = self.dispatch.cancel(task.id)
                if cancelled is not None:
                    self.end_unrun(cancelled, p.REVOKED, "was revoked (terminate)")
                    self.dispatched(more)

    def result_dropped(self, task_id: str) -> None:
        """A result left the store (TTL or cap): its journal row goes too, by its id,
        so the journal holds what the store does and is never scanned for expiry."""
        self.journal.result_dropped(task_id)

    def gather_inputs(self, task: Task) -> None:
        """A workflow step held or queued again (replay, dead-letter requeue) gets its
        parents' results back (for a re-run)."""
        args_from = task.data[0].get("args_from")
        if args_from is not None:
            results = [self.results.get(parent) for parent in args_from]
            self.inputs[task.id] = [r.payload if r is not None else b"" for r in results]


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes


#: The failure type a task ended without running gets, by its state.
_UNRUN_KINDS = {p.EXPIRED: "zq.Expired", p.REVOKED: "zq.Revoked", p.FAILURE: "zq.WorkflowError"}


def make_task(task_id: str, header: dict[str, Any], body: Any) -> Task:
    """The scheduler's view of an accepted task (header checked by check_task_header)."""
    return Task(
        task_id,
        header["queue"],
        header.get("key"),
        (header, body),
        header.get("priority", 0),
        header["name"],
    )
