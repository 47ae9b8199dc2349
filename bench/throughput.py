"""Throughput: trivial tasks, pipelined, end to end (submit, run, result received).

One broker, one worker process, one client (this process). For each worker pool
(thread pool at 1 and 4 slots, process pool) and journal setting (``:memory:``, a
SQLite file), the client submits ``tasks`` no-op tasks at once and waits for every
result; tasks/s is the median of ``repeats`` rounds on the same broker and worker,
after a warm-up round. Reported as a fraction of the limit measured in the same run.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.common import (
    Row,
    gather,
    median,
    start_broker,
    start_client,
    start_worker,
    wait_for_workers,
)

#: (pool, concurrency) configurations; the process pool gets one child per core here.
CONFIGS: tuple[tuple[str, int], ...] = (("thread", 1), ("thread", 4), ("process", 2))
#: Targets, as fractions of the limit.
TARGET = {False: 0.60, True: 0.35}


def one_round(app: Any, tasks: int, timeout: float) -> float:
    """Submit ``tasks`` no-ops at once, wait for all results; tasks per second."""
    start = time.perf_counter()
    results = [app.send_task("bench.noop") for _ in range(tasks)]
    gather(results, timeout)
    return tasks / (time.perf_counter() - start)


def measure(journal: bool, pool: str, concurrency: int, tasks: int, repeats: int) -> list[float]:
    """Rounds of :func:`one_round` against a fresh broker and worker; their tasks/s."""
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, journal)
        start_worker(stack, broker.endpoint, pool=pool, concurrency=concurrency)
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, 1)
        one_round(app, min(tasks, 500), timeout=60)  # warm-up
        return [one_round(app, tasks, timeout=120) for _ in range(repeats)]


def run(
    *, limit: float, tasks: int, repeats: int, log: Any = print
) -> tuple[dict[str, Any], list[Row]]:
    """Every configuration, journal off then on."""
    result: dict[str, Any] = {"tasks": tasks, "repeats": repeats, "configs": []}
    rows = []
    for journal in (False, True):
        for pool, concurrency in CONFIGS:
            rates = measure(journal, pool, concurrency, tasks, repeats)
            rate = median(rates)
            ratio = rate / limit
            label = f"journal {'on' if journal else 'off'}, {pool} x{concurrency}"
            log(f"  throughput {label}: {rate:,.0f} tasks/s ({ratio:.0%} of the limit)")
            result["configs"].append(
                {
                    "journal": journal,
                    "pool": pool,
                    "concurrency": concurrency,
                    "tasks_per_s": rate,
                    "samples": rates,
                    "ratio_to_limit": ratio,
                }
            )
            rows.append(
                Row(
                    "throughput",
                    label,
                    rate,
                    "tasks/s",
                    reference=limit,
                    ratio=ratio,
                    target=f">= {TARGET[journal]:.0%} of limit",
                    met=ratio >= TARGET[journal],
                    samples=rates,
                )
            )
    return result, rows
