"""Pure state for periodic tasks: schedules, their next fire times, the catch-up rule.

Schedules are declared in the app (``@app.periodic``), announced by its workers in
READY, and fired by the broker alone, so a schedule fires once however many workers
declare it. The broker journals each schedule with its last fire time, in the same
transaction as the task it fired, so a restart neither fires a run twice nor loses
one it had fired.

**Catch-up rule**: when the broker starts (or a schedule is declared again) after
one or more fire times have passed unfired, it fires **once** at once, then goes on
from the schedule's next fire time after now: missed runs are never fired in a flood.
Cron expressions use the broker's local time.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any

from croniter import CroniterError, croniter

from zq import protocol as p

#: Shortest interval a schedule may have, in seconds.
MIN_EVERY = 0.1
#: Longest schedule name, and most bytes of arguments a schedule may carry.
MAX_NAME_LEN = 200
MAX_PAYLOAD = 16 * 1024


@dataclass(frozen=True)
class Schedule:
    """When to send which task: ``every`` seconds, or on a ``cron`` expression."""

    name: str
    task: str
    every: float | None = None
    cron: str | None = None
    payload: bytes = p.encode([[], {}])  # the task's [args, kwargs], encoded
    key: str | None = None
    queue: str = "default"

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError("a schedule needs either every= or cron=, not both")
        if self.every is not None and (
            isinstance(self.every, bool)
            or not isinstance(self.every, (int, float))
            or not math.isfinite(self.every)
            or self.every < MIN_EVERY
        ):
            raise ValueError(f"every must be seconds >= {MIN_EVERY}, got {self.every!r}")
        if self.cron is not None:
            if not (
                isinstance(self.cron, str)
                and len(self.cron.split()) in (5, 6)
                and croniter.is_valid(self.cron)
            ):
                raise ValueError(
                    f"not a valid cron expression (five fields, or six with seconds "
                    f"last): {self.cron!r}"
                )
            if self.next_after(0.0) is None:
                raise ValueError(f"cron expression {self.cron!r} never fires")
        for field, value, limit in (
            ("name", self.name, MAX_NAME_LEN),
            ("task", self.task, p.MAX_NAME_LEN),
            ("queue", self.queue, p.MAX_QUEUE_LEN),
        ):
            if not isinstance(value, str) or not 0 < len(value) <= limit:
                raise ValueError(f"schedule {field} must be a string of 1..{limit} characters")
        if self.key is not None and not (
            isinstance(self.key, str) and 0 < len(self.key) <= p.MAX_KEY_LEN
        ):
            raise ValueError(f"schedule key must be a string of 1..{p.MAX_KEY_LEN} characters")
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"schedule arguments must encode to at most {MAX_PAYLOAD} bytes")

    @classmethod
    def from_wire(cls, data: Any) -> Schedule:
        """A schedule from a READY header entry; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("a schedule must be a map")
        fields = ("name", "task", "every", "cron", "payload", "key", "queue")
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown schedule field(s): {', '.join(sorted(map(str, unknown)))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"bad schedule: {exc}") from None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "task": self.task, "queue": self.queue}
        for field in ("every", "cron", "key"):
            if getattr(self, field) is not None:
                wire[field] = getattr(self, field)
        wire["payload"] = self.payload
        return wire

    def describe(self) -> str:
        return f"every {self.every:g}s" if self.every is not None else f"cron {self.cron}"

    def next_after(self, wall: float) -> float | None:
        """The first fire time strictly after ``wall`` (a Unix time); None if there is
        none (a cron expression whose dates have all passed)."""
        if self.every is not None:
            return wall + self.every
        start = _dt.datetime.fromtimestamp(wall).astimezone()
        try:
            return float(croniter(self.cron, start).get_next(float))
        except (CroniterError, ValueError, OverflowError):
            return None


def first_fire(schedule: Schedule, last: float | None, now: float) -> float | None:
    """When to fire next, given the last fire time (None: never fired) - the catch-up
    rule: a fire time that passed unfired makes one run now, never one per miss.
    None: the schedule will never fire again."""
    if last is None:
        return schedule.next_after(now)
    due = schedule.next_after(last)
    if due is None:
        return None
    return now if due <= now else due


def following(schedule: Schedule, fired: float, now: float) -> float | None:
    """The fire time after the one due at ``fired``, skipping those already past;
    None if there is none."""
    due = schedule.next_after(fired)
    return due if due is None or due > now else schedule.next_after(now)


class Entry:
    """The broker's record of one schedule."""

    __slots__ = ("last", "last_task", "next", "schedule", "skipped")

    def __init__(self, schedule: Schedule, last: float | None, last_task: str | None) -> None:
        self.schedule = schedule
        self.last = last  # Unix time of the last fire, None if never
        self.last_task = last_task  # id of the task it fired last
        self.next: float | None = 0.0  # Unix time of the next fire; None: no more
        self.skipped = 0  # fires skipped because the previous run (keyed) had not ended

    def listing(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "name": s.name,
            "task": s.task,
            "schedule": s.describe(),
            "queue": s.queue,
            "key": s.key,
            "last": self.last,
            "next": self.next,
            "skipped": self.skipped,
        }
