"""What workers report to the broker, and what each report does to a task.

READY (re-attach what it runs, take what it may), STARTED, PROGRESS, and DONE in
each of its states: SUCCESS and FAILURE end the task, RETRY holds it (and its key)
for a countdown, LOST hands it back (a crash, a fence, a task given back unstarted,
or a name the worker does not have after all). Worker death hands back everything it
held. :class:`Reports` decides; the state it changes is the core's
(:class:`zq.tasks.Tasks`), and what follows goes to the outbox and the journal.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zq import messages
from zq import protocol as p
from zq.errors import ProtocolError
from zq.tasks import RETRY, Tasks
from zq.workers import Peer

log = logging.getLogger("zq.broker")

DONE_STATES = (p.SUCCESS, p.FAILURE, p.RETRY, p.LOST, p.EXPIRED, p.REVOKED)
#: The DONE states of a task that ran to its end: their run times feed the prefetch.
_RAN = (p.SUCCESS, p.FAILURE, p.RETRY)


class Reports:
    """The broker's handling of worker reports, over the core's state."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks
        self.dispatch = tasks.dispatch
        self.settings = tasks.settings
        self.counters = tasks.counters

    def worker_ready(
        self,
        peer: Peer,
        queues: list[str],
        running: dict[str, int | None],
        names: list[str],
    ) -> None:
        """A worker said READY: it re-attaches what it runs, and gets what it may take."""
        capacity = peer.capacity(self.settings.prefetch)
        self.tasks.dispatched(self.dispatch.add_worker(peer.wid, queues, capacity, running, names))
        self.tasks.now_served(queues, names)
        for task_id in self.tasks.terminating & running.keys():  # re-attached, still to stop
            task = self.dispatch.tasks.get(task_id)
            if task is not None:
                self.tasks.stop_if_terminating(task)

    def started(self, peer: Peer, ids: list[Any], deliveries: list[Any]) -> None:
        """The worker started these tasks (``ids`` and ``deliveries`` in step)."""
        for task_id, delivery in zip(ids, deliveries, strict=True):
            if not isinstance(task_id, str) or not self.dispatch.started(
                peer.wid, task_id, delivery if isinstance(delivery, int) else None
            ):
                self.counters["stale_started"] += 1
        # Not published: a message per task that no client needs (status asks the
        # broker), and about a fifth of the broker's sends per task.

    def progress(
        self, peer: Peer, task_id: str, info: dict[str, Any], delivery: int | None
    ) -> None:
        """A running task reported progress: keep the latest, publish it to its client."""
        task = self.dispatch.held(peer.wid, task_id, delivery)
        if task is None:
            self.counters["stale_progress"] += 1
            return
        task.started = True
        task.progress = {k: info.get(k) for k in ("done", "total", "note")}
        head = {"id": task_id, "state": p.STARTED_STATE, "progress": task.progress}
        topic = (task.data[0]["client"] + task_id).encode()
        self.tasks.outbox.publish(topic, p.PROGRESS, p.pack_header(head))

    def given_back(self, peer: Peer, returned: list[tuple[str, int | None]]) -> None:
        """A stalled worker gave back tasks it had not started: no more prefetch for it
        until a task ends there again, and the tasks go back to the head of their lanes
        together, in the order it held them (not counted as redeliveries)."""
        self.refresh_capacity(peer)
        tasks, out = self.dispatch.give_back(peer.wid, returned)
        self.counters["given_back"] += len(tasks)
        self.counters["stale_done"] += len(returned) - len(tasks)
        self.tasks.end_terminated(tasks)
        self.tasks.dispatched(out)

    def refresh_capacity(self, peer: Peer) -> None:
        """Automatic prefetch: set the worker's credit from its latest run times."""
        if self.settings.prefetch is None and peer.slots:
            out = self.dispatch.set_capacity(peer.wid, peer.capacity(self.settings.prefetch))
            if out:
                self.tasks.dispatched(out)

    def done(
        self,
        peer: Peer,
        header: dict[str, Any],
        body: Any,
        returned: list[tuple[str, int | None]],
    ) -> None:
        """One task's outcome from the worker that ran it (a task given back unstarted
        is added to ``returned`` instead)."""
        ident = peer.ident
        task_id, state = header.get("id"), header.get("state")
        if not isinstance(task_id, str) or state not in DONE_STATES:
            raise ProtocolError(f"DONE needs 'id' and a 'state' in {', '.join(DONE_STATES)}")
        # Acknowledged (after the commit) whatever happens here, so the worker's outbox
        # lets go of it: a DONE is only ever sent again after a reconnect.
        delivery = messages.delivery(header)
        self.tasks.outbox.ack(ident, task_id, delivery)
        runtime = header.get("runtime")
        if not isinstance(runtime, (int, float)) or runtime < 0:
            runtime = None
        if state in _RAN and runtime is not None:
            peer.runtimes.add(runtime)
            self.refresh_capacity(peer)  # lower before the slot it freed is refilled
        if state == p.LOST and header.get("unknown"):
            self._unknown_here(peer, task_id, delivery)
            return
        if state == p.LOST and header.get("returned"):
            # Its runtime says how long the worker's slots were stuck.
            peer.runtimes.stalled(runtime or 0.0)
            returned.append((task_id, delivery))
            return
        if state == p.LOST:  # the process running it died: run it again, or give up
            counts = not header.get("fenced")  # a fenced stop is not a crash
            task, out = self.dispatch.lost(peer.wid, task_id, delivery, counts=counts)
            if task is None:
                self.counters["stale_done"] += 1
            else:
                self.tasks.count_redelivered([task])
                self.tasks.end_terminated([task])
            self.tasks.dispatched(out)
            return
        bad_retry = None  # why a RETRY cannot be held, if it cannot
        if state == p.RETRY:
            countdown = header.pop("countdown", None)
            if type(countdown) in (int, float) and 0 <= countdown <= p.MAX_RETRY_COUNTDOWN:
                self._retry(peer, task_id, delivery, countdown)
                return
            # The worker has let go of the task (its DONE is acknowledged): a retry the
            # broker cannot hold fails it, or it would stay on that worker, key and all.
            bad_retry = (
                f"the task asked to be retried after {countdown!r} seconds; a retry waits "
                f"a number of seconds from 0 to {p.MAX_RETRY_COUNTDOWN:g}"
            )
            state = header["state"] = p.FAILURE
            body = p.failure("zq.ProtocolError", bad_retry)
        task, out = self.dispatch.done(peer.wid, task_id, delivery)
        if task is None:
            # Not this worker's task (any more): it was handed to another worker, or it
            # is a resend of a DONE the broker already has.
            self.counters["stale_done"] += 1
            log.info("ignored DONE for %s from %s, which does not hold it", task_id, peer.wid)
        else:
            self.counters["done"] += 1
            if bad_retry is not None:
                self.counters["malformed"] += 1
                log.warning("%s from %s failed: %s", task_id, peer.wid, bad_retry)
            self.tasks.finish(task, state, p.pack_header(header), body)
        self.tasks.dispatched(out)

    def _unknown_here(self, peer: Peer, task_id: str, delivery: int | None) -> None:
        """The worker does not have the task's name after all: it gets no more tasks of
        that name, and the task goes back to the head of its lane for one that has it."""
        task, out = self.dispatch.drop_name(peer.wid, task_id, delivery)
        if task is None:
            self.counters["stale_done"] += 1
        else:
            self.counters["unknown_task"] += 1
            log.warning(
                "worker %s does not have task %s after all: it is sent no more of them",
                peer.wid.decode(),
                task.name,
            )
            self.tasks.end_terminated([task])
            self.tasks.check_served(task)
        self.tasks.dispatched(out)

    def _retry(self, peer: Peer, task_id: str, delivery: int | None, countdown: float) -> None:
        """The task asked to run again later: hold it (and its key) for the countdown."""
        task, out = self.dispatch.retry(peer.wid, task_id, delivery)
        if task is None:
            self.counters["stale_done"] += 1
        elif task_id in self.tasks.terminating:
            # Revoked with terminate while it ran: it is stopped now, not held for a
            # retry delay (up to a week) before it ends.
            self.tasks.end_terminated([task])
        else:
            self.counters["retried"] += 1
            self.tasks.timers.add(time.monotonic() + countdown, (RETRY, task_id))
            self.tasks.journal.task_retrying(task_id, task.retries, time.time() + countdown)
            head = p.pack_header({"id": task_id, "state": p.RETRY, "countdown": countdown})
            self.tasks.outbox.publish((task.data[0]["client"] + task_id).encode(), p.STARTED, head)
        self.tasks.dispatched(out)
