"""The broker's periodic schedules: declared by workers, armed on the timer heap,
fired into the core as tasks.

The broker alone fires them (so never twice): a schedule a worker's READY declares
is kept here and in the journal whether or not a worker still declares it, and each
fire time accepts one task under the client id :data:`PERIODIC_CLIENT`. The schedule
arithmetic (interval, cron, catch-up) is :mod:`zq.schedule`'s, which the client side
imports too; this module is the broker's and imports its core.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from zq import protocol as p
from zq.dispatch import Assignment
from zq.ids import new_id
from zq.schedule import Entry, Schedule, first_fire, following
from zq.tasks import Tasks, make_task

log = logging.getLogger("zq.broker")

#: The client id periodic tasks are sent under (results go to topics nobody reads).
PERIODIC_CLIENT = "zq-periodic"
#: The kind of a periodic schedule's timers: (PERIODIC, schedule name).
PERIODIC = "periodic"


class Periodic:
    """The schedules by name, and their firing."""

    def __init__(self, tasks: Tasks, counters: Counter[str]) -> None:
        self.tasks = tasks
        self.counters = counters
        self.entries: dict[str, Entry] = {}

    def declare(self, items: list[Any]) -> None:
        """Schedules a worker's app declares: new or changed ones are (re)armed."""
        for item in items:
            try:
                schedule = Schedule.from_wire(item)
            except ValueError as exc:
                self.counters["bad_schedules"] += 1
                log.warning("ignored a periodic schedule a worker declared: %s", exc)
                continue
            entry = self.entries.get(schedule.name)
            if entry is not None and entry.schedule == schedule:
                continue  # the usual case: every worker declares the same schedules
            if entry is not None:
                log.info("periodic schedule %s changed: %s", schedule.name, schedule.describe())
            last, last_task = (entry.last, entry.last_task) if entry else (None, None)
            self.arm(Entry(schedule, last, last_task))
            definition = p.pack_header(schedule.to_wire())
            self.tasks.journal.schedule_stored(schedule.name, definition, last, last_task)

    def arm(self, entry: Entry) -> None:
        """Keep ``entry`` and set its timer (its first fire time after its last)."""
        wall = time.time()
        entry.next = first_fire(entry.schedule, entry.last, wall)
        self.entries[entry.schedule.name] = entry
        self._arm_next(entry, wall)

    def _arm_next(self, entry: Entry, wall: float) -> None:
        """Set the timer for ``entry.next``; a schedule with no next time is listed
        with next = None and never fires again (e.g. a cron year that has passed)."""
        if entry.next is None:
            log.warning("periodic %s has no next fire time; it is done", entry.schedule.name)
            return
        at = time.monotonic() + (entry.next - wall)
        self.tasks.timers.add(at, (PERIODIC, entry.schedule.name))

    def fire(self, name: str) -> None:
        """Accept a schedule's task if it is due (else the timer is a stale one)."""
        entry = self.entries.get(name)
        wall = time.time()
        if entry is None or entry.next is None or entry.next > wall + 0.001:
            return
        schedule, due = entry.schedule, entry.next
        entry.next = following(schedule, due, wall)
        self._arm_next(entry, wall)
        tasks = self.tasks
        previous = entry.last_task
        if schedule.key is not None and previous is not None and tasks.unfinished_id(previous):
            # Its previous run still waits or runs: per-key exclusivity would queue this
            # one behind it; skipping keeps a slow task from piling up runs.
            entry.skipped += 1
            self.counters["periodic_skipped"] += 1
            return
        full = tasks.full(schedule.queue)
        if full is not None:
            self.counters["periodic_skipped"] += 1
            log.warning("periodic %s not fired: %s", name, full)
            return
        task_id = new_id()
        header: dict[str, Any] = {
            "id": task_id,
            "name": schedule.task,
            "queue": schedule.queue,
            "client": PERIODIC_CLIENT,
            "periodic": name,
        }
        if entry.next is not None:
            # Superseded by the next run: a run no worker started by then expires, so
            # a schedule whose queue has no worker never piles runs up in the broker.
            header["expires"] = entry.next
        if schedule.key is not None:
            header["key"] = schedule.key
        entry.last, entry.last_task = due, task_id
        if tasks.journal.durable:
            tasks.journal.task_accepted(task_id, p.pack_header(header), schedule.payload)
        tasks.journal.schedule_fired(name, due, task_id)
        self.counters["periodic_fired"] += 1
        out: list[Assignment] = []
        tasks.admit(make_task(task_id, header, schedule.payload), out)
        tasks.dispatched(out)

    def remove(self, names: list[str]) -> list[str]:
        """Forget these schedules (a worker that still declares one brings it back);
        returns those that were there."""
        removed = []
        for name in names:
            if self.entries.pop(name, None) is not None:
                self.tasks.journal.schedule_dropped(name)
                removed.append(name)
        return removed

    def listing(self) -> list[dict[str, Any]]:
        """Each schedule with its last and next fire, for ``zq periodic``."""
        return [entry.listing() for entry in self.entries.values()]
