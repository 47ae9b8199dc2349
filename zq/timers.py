"""Pure state for time: the broker's timer heap and the retry backoff rule.

Delays (retry countdowns, ETAs, expiry times, periodic fire times) are held by the
broker, never in a worker's memory, so a delayed task survives the worker that asked
for the delay.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any


class TimerHeap:
    """Items (e.g. ``(kind, task id)``) due at given times; O(log n) to add and to pop
    what is due. An item is never removed early: its owner ignores it if it is stale."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()  # ties fire in the order they were added

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, item: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._order), item))

    def next_at(self) -> float | None:
        """When the earliest timer fires, or None if there is none."""
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[Any]:
        """Pop and return the items whose time has come, earliest first."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out


def backoff(
    attempt: int, *, base: float, cap: float, jitter: bool = True, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt + 1``: ``base * 2**attempt`` capped
    at ``cap``, with "full jitter" (uniform in [0, that]) so retries of many tasks that
    failed together do not come back together."""
    delay = min(cap, base * (2 ** min(attempt, 62)))
    if jitter:
        delay = (rng or random).uniform(0, delay)
    return delay
