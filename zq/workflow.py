"""Pure state for workflows: tasks that wait for other tasks (their parents) to finish.

A task submitted with ``after`` (parent ids) waits here until every parent has
finished. When the last one succeeds the task is released (the broker queues it,
with the parents' results named by ``args_from`` as its first argument); when any
parent ends otherwise (failure, revoked, expired, dead) the task ends too, with that
outcome, and so do its own dependents in turn. No sockets here; the broker owns the
results and the journal, and calls these methods.
"""

from __future__ import annotations

from typing import Any

#: Most parents one task may wait for (a chord over a group of this many members):
#: their ids, twice (``after``, ``args_from``), about 350 KB of task header.
MAX_PARENTS = 5000
#: Longest countdown a workflow step may have (seconds; about 31 years).
MAX_COUNTDOWN = 1e9


class Graph:
    """Waiting tasks by id, and who waits for whom."""

    def __init__(self) -> None:
        self.waiting: dict[str, Any] = {}  # task id -> the broker's task object
        self._missing: dict[str, set[str]] = {}  # task id -> parents not finished yet
        self._children: dict[str, list[str]] = {}  # parent id -> ids waiting for it

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.waiting

    def add(self, task_id: str, task: Any, unfinished: list[str]) -> None:
        """``task_id`` waits for the parents in ``unfinished`` (none of them finished)."""
        self.waiting[task_id] = task
        self._missing[task_id] = set(unfinished)
        for parent in unfinished:
            self._children.setdefault(parent, []).append(task_id)

    def remove(self, task_id: str) -> Any | None:
        """Take a waiting task out (revoked); its parents forget it lazily."""
        self._missing.pop(task_id, None)
        return self.waiting.pop(task_id, None)

    def finished(self, parent_id: str, ok: bool) -> tuple[list[Any], list[Any]]:
        """``parent_id`` ended; ``ok`` if it succeeded. Returns (released, failed): the
        tasks whose last parent this was, and, if it failed, every task waiting for it."""
        released: list[Any] = []
        failed: list[Any] = []
        for child in self._children.pop(parent_id, ()):
            missing = self._missing.get(child)
            if missing is None or parent_id not in missing:
                # Removed, failed by another parent already, or the id was used again
                # (after its result expired) by a task that does not wait for this one.
                continue
            if not ok:
                failed.append(self.remove(child))
                continue
            missing.discard(parent_id)
            if not missing:
                released.append(self.remove(child))
        return released, failed


def check_links(header: dict[str, Any]) -> str | None:
    """Why a task header's workflow fields are invalid, or None."""
    after = header.get("after")
    if after is None:
        for field in ("after", "args_from", "pass", "countdown"):
            if field in header:
                return f"{field}: only valid with a list of parents in 'after'"
        return None
    if not isinstance(after, list) or not all(isinstance(i, str) for i in after):
        return "after: must be a list of task ids"
    if len(after) > MAX_PARENTS:
        return f"after: at most {MAX_PARENTS} parents, got {len(after)}"
    args_from = header.get("args_from")
    if args_from is None:
        if "pass" in header:
            return "pass: only valid with 'args_from'"
    else:
        if not isinstance(args_from, list) or not all(isinstance(i, str) for i in args_from):
            return "args_from: must be a list of task ids"
        if not set(args_from) <= set(after):
            return "args_from: must name parents from 'after'"
        if header.get("pass") not in ("one", "list"):
            return "pass: must be 'one' or 'list' with 'args_from'"
        if header["pass"] == "one" and len(args_from) != 1:
            return "pass 'one' takes exactly one id in 'args_from'"
    countdown = header.get("countdown")
    if countdown is not None and (
        type(countdown) not in (int, float) or not 0 <= countdown <= MAX_COUNTDOWN
    ):
        return f"countdown: must be a number of seconds 0..{MAX_COUNTDOWN:g}"
    return None
