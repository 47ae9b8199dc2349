"""The task running in this process or thread: ``zq.current_task()``.

A task reads its own id and retry count here and reports progress::

    @app.task
    def import_rows(path):
        rows = load(path)
        task = zq.current_task()
        for i, row in enumerate(rows):
            save(row)
            task.progress(i + 1, len(rows), note="importing")

Progress travels to the broker, which keeps the latest report of each running task
and publishes it to the submitting client (``AsyncResult.progress``, ``zq status ID``).
Reports are rate-limited here (``PROGRESS_EVERY``), so calling ``progress`` in a tight
loop costs little; the first and the last (``done >= total``) always go out.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from zq.errors import ZQError

#: Least seconds between two progress reports of one task that are sent on.
PROGRESS_EVERY = 0.05
#: Longest progress note kept, in characters.
MAX_NOTE = 200

_local = threading.local()


class TaskContext:
    """What a running task knows of itself."""

    def __init__(
        self, header: dict[str, Any], report: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.id: str = header["id"]
        self.name: str = header.get("name", "")
        self.key: str | None = header.get("key")
        self.retries: int = int(header.get("retries", 0))
        self.redeliveries: int = int(header.get("redeliveries", 0))
        self._report = report
        self._last = 0.0

    def __repr__(self) -> str:
        return f"<TaskContext {self.name} {self.id}>"

    def progress(self, done: float, total: float | None = None, note: str | None = None) -> None:
        """Report how far the task has got, e.g. ``progress(40, 100, "scoring")``.

        Raises :class:`ValueError` for values that are not numbers."""
        for name, value in (("done", done), ("total", total)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number and (value is not None or name == "done"):
                raise ValueError(f"progress {name} must be a number, got {value!r}")
        now = time.monotonic()
        final = total is not None and done >= total
        if self._report is None or (now - self._last < PROGRESS_EVERY and not final):
            return
        self._last = now
        self._report(
            {"done": done, "total": total, "note": None if note is None else str(note)[:MAX_NOTE]}
        )


def current_task() -> TaskContext:
    """The task running in this process or thread; :class:`zq.ZQError` outside a task."""
    context = getattr(_local, "task", None)
    if context is None:
        raise ZQError("zq.current_task() is only available inside a running task")
    return context


@contextlib.contextmanager
def running(context: TaskContext) -> Iterator[TaskContext]:
    """Make ``context`` the current task while the block runs."""
    previous = getattr(_local, "task", None)
    _local.task = context
    try:
        yield context
    finally:
        _local.task = previous
