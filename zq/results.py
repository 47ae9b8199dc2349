"""Pure state: finished tasks' results with a TTL, and clients waiting for them.

The broker keeps every result (unless the task ignores results) so that a client
whose PUB message was lost, or another process holding only the task id, can
FETCH it. Payloads are kept exactly as the worker sent them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class Result:
    """A final state, the worker's DONE header frame and its payload frame, both opaque."""

    __slots__ = ("expires", "header", "payload", "state")

    def __init__(self, state: str, header: Any, payload: Any, expires: float) -> None:
        self.state = state
        self.header = header
        self.payload = payload
        self.expires = expires


def _ignore(task_id: str) -> None:
    pass


class ResultStore:
    """Results by task id, dropped ``ttl`` seconds after they were stored, or when
    more than ``max_items`` are kept (the oldest first). ``on_drop`` is called with the
    id of each result so dropped (e.g. to drop it from the journal too)."""

    def __init__(
        self,
        ttl: float,
        max_items: int | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._on_drop = on_drop or _ignore
        self.evicted = 0  # dropped before their TTL because the store was full
        # With one TTL for all, insertion order is expiry order: purging pops the front.
        self._items: OrderedDict[str, Result] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._items

    def put(self, task_id: str, state: str, header: Any, payload: Any, now: float) -> Result:
        result = Result(state, header, payload, now + self.ttl)
        self._items.pop(task_id, None)
        self._items[task_id] = result
        if self.max_items is not None and len(self._items) > self.max_items:
            evicted, _ = self._items.popitem(last=False)  # the oldest: first to expire
            self.evicted += 1
            self._on_drop(evicted)
        return result

    def discard(self, task_id: str) -> None:
        self._items.pop(task_id, None)

    def get(self, task_id: str) -> Result | None:
        return self._items.get(task_id)

    def purge(self, now: float) -> int:
        """Drop expired results; returns how many."""
        n = 0
        while self._items:
            first = next(iter(self._items.values()))
            if first.expires > now:
                break
            expired, _ = self._items.popitem(last=False)
            n += 1
            self._on_drop(expired)
        return n


class Waiters:
    """Clients (by routing identity) that asked to be sent a task's result when it ends."""

    def __init__(self) -> None:
        self._by_task: dict[str, dict[bytes, float]] = {}

    def __len__(self) -> int:
        return len(self._by_task)

    def add(self, task_id: str, peer: bytes, deadline: float) -> None:
        self._by_task.setdefault(task_id, {})[peer] = deadline

    def pop(self, task_id: str) -> list[bytes]:
        """The peers waiting for ``task_id``; they are forgotten."""
        return list(self._by_task.pop(task_id, ()))

    def purge(self, now: float) -> int:
        """Forget waits whose deadline passed (their client gave up or went away)."""
        n = 0
        for task_id in list(self._by_task):
            peers = self._by_task[task_id]
            for peer in [p for p, deadline in peers.items() if deadline <= now]:
                del peers[peer]
                n += 1
            if not peers:
                del self._by_task[task_id]
        return n
