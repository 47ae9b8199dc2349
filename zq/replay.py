"""Rebuilding the broker's core from its journal at start-up.

Results first (with the expiry they had), then the tasks workers held (they keep
their keys, under placeholders, until those workers re-attach them or their grace
runs out), then the waiting tasks in the order they were accepted, the periodic
schedules and the dead letters. No worker is connected yet, so nothing is assigned.
"""

from __future__ import annotations

import logging
import time

from zq import protocol as p
from zq.errors import ProtocolError
from zq.periodic import Periodic
from zq.schedule import Entry, Schedule
from zq.tasks import EXPIRE, RETRY, Tasks, make_task
from zq.workers import Workers

log = logging.getLogger("zq.broker")


def replay(tasks: Tasks, periodic: Periodic, workers: Workers, grace: float) -> None:
    """Rebuild ``tasks``, ``periodic`` and the workers waited for from ``tasks.journal``;
    a worker that held tasks has ``grace`` seconds to come back."""
    tasks.replaying = True
    try:
        _replay(tasks, periodic, workers, grace)
    finally:
        tasks.replaying = False


def _replay(tasks: Tasks, periodic: Periodic, workers: Workers, grace: float) -> None:
    journal = tasks.journal
    now, wall = time.monotonic(), time.time()
    ttl = tasks.results.ttl
    journal.purge_results()  # those that expired while no broker ran
    for stored in journal.results():
        # put() adds the TTL to "now"; shift it so the result keeps its expiry.
        expires = now - ttl + (stored.expires - wall)
        tasks.results.put(stored.id, stored.state, stored.header, stored.payload, expires)
    held, waiting = [], []
    for stored in journal.tasks():
        header = p.unpack_header(stored.header)
        task = make_task(stored.id, header, stored.payload)
        task.redeliveries, task.retries = stored.redeliveries, stored.retries
        task.delivery = stored.delivery
        if stored.eta is not None:
            task.retrying = True
            tasks.timers.add(now + (stored.eta - wall), (RETRY, task.id))
        (held if stored.worker or task.retrying else waiting).append((task, stored.worker))
    for task, worker in held:
        tasks.dispatch.restore(task, worker.encode() if worker else None)
        if task.data[0].get("expires") is not None:  # in case it comes back unstarted
            tasks.timers.add(now + (task.data[0]["expires"] - wall), (EXPIRE, task.id))
    for task, _ in held:
        tasks.gather_inputs(task)
    for task, _ in waiting:
        tasks.enter(task, [])  # no worker is connected yet: nothing is assigned
    held = [(t, w) for t, w in held if w]
    for stored_schedule in journal.schedules():
        try:
            schedule = Schedule.from_wire(p.unpack_header(stored_schedule.definition))
        except (ValueError, ProtocolError) as exc:
            log.warning("dropped periodic schedule %s: %s", stored_schedule.name, exc)
            continue
        periodic.arm(Entry(schedule, stored_schedule.last, stored_schedule.last_task))
    for stored in journal.dead():
        task = make_task(stored.id, p.unpack_header(stored.header), stored.payload)
        task.redeliveries = stored.redeliveries
        tasks.dead_letters[task.id] = task
    workers.expect({w.encode() for _, w in held}, now + grace)
    if journal.durable:
        log.info(
            "journal %s: %d result(s), %d task(s) waiting, %d held by %d worker(s)"
            " (%.0fs for them to re-attach)",
            journal.path,
            len(tasks.results),
            len(waiting),
            len(held),
            workers.expected(),
            grace,
        )
