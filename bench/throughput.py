"""Throughput: trivial tasks, pipelined, end to end (submit, run, result received).

One broker, one worker process, one client (this process). For each worker pool
(thread pool at 1 and 4 slots, process pool) and journal setting (``:memory:``, a
SQLite file), the client submits ``tasks`` no-op tasks at once and waits for every
result; tasks/s is the median of ``repeats`` rounds on the same broker and worker,
after a warm-up round. Each round is paired with a round of the limit pipeline run
just before it (the machine is shared, and the limit alone moved between 23,577 and
46,054 tasks/s across one afternoon's runs): the share of the limit is the median of the
rounds' own ratios, and the limit shown is the median of those paired rounds (the
start-of-run limit is in the note). With it, the CPU time each process spent per task
(from /proc), which shows where the gap to the limit goes. The broker runs with its
default prefetch (``auto``); one more configuration, with ``--prefetch 0`` (no task
ever waits in a worker), is shown for comparison only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    CpuMeter,
    Row,
    describe_cpu,
    gather,
    median,
    start_broker,
    start_client,
    start_worker,
    wait_for_workers,
)

#: (pool, concurrency, broker --prefetch) configurations; the process pool gets one
#: child per core here. zq's default is prefetch auto.
CONFIGS: tuple[tuple[str, int, str], ...] = (
    ("thread", 1, "auto"),
    ("thread", 4, "auto"),
    ("process", 2, "auto"),
)
#: Shown for comparison (no target): the same with no task waiting in the worker.
PREFETCH_CONFIG = ("thread", 4, "0")
#: Targets, as fractions of the limit.
TARGET = {False: 0.60, True: 0.35}


def one_round(app: Any, tasks: int, timeout: float) -> float:
    """Submit ``tasks`` no-ops at once, wait for all results; tasks per second."""
    start = time.perf_counter()
    results = [app.send_task("bench.noop") for _ in range(tasks)]
    gather(results, timeout)
    return tasks / (time.perf_counter() - start)


def measure(
    journal: bool,
    pool: str,
    concurrency: int,
    prefetch: str,
    tasks: int,
    repeats: int,
    limit_round: Callable[[], float],
) -> tuple[list[float], list[float], dict[str, float]]:
    """Rounds of :func:`one_round` against a fresh broker and worker, each after a
    ``limit_round``: their tasks/s, the paired limit rounds' tasks/s, and the CPU time
    per task of broker, worker (with its pool) and client (zq's rounds only)."""
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, journal, "--prefetch", prefetch)
        worker = start_worker(stack, broker.endpoint, pool=pool, concurrency=concurrency)
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, 1)
        one_round(app, min(tasks, 500), timeout=60)  # warm-up
        cpu = CpuMeter({"broker": broker.pid, "worker": worker.pid}, {"client": os.getpid()})
        rates, limits = [], []
        for _ in range(repeats):
            limits.append(limit_round())
            cpu.start()
            rates.append(one_round(app, tasks, timeout=120))
            cpu.stop()
        return rates, limits, cpu.per_task_us(tasks * repeats)


def run(
    *,
    limit: float,
    limit_round: Callable[[], float],
    tasks: int,
    repeats: int,
    log: Any = print,
) -> tuple[dict[str, Any], list[Row]]:
    """Every configuration, journal off then on; ``limit`` is the start-of-run limit,
    ``limit_round`` runs one round of the limit pipeline (its tasks/s)."""
    result: dict[str, Any] = {"tasks": tasks, "repeats": repeats, "configs": []}
    rows = []
    runs = [(journal, *config) for journal in (False, True) for config in CONFIGS]
    runs.append((False, *PREFETCH_CONFIG))
    for journal, pool, concurrency, prefetch in runs:
        rates, limits, cpu = measure(
            journal, pool, concurrency, prefetch, tasks, repeats, limit_round
        )
        rate, paired = median(rates), median(limits)
        ratio = median([r / lim for r, lim in zip(rates, limits, strict=True)])
        label = f"journal {'on' if journal else 'off'}, {pool} x{concurrency}"
        default = prefetch == "auto"
        label += "" if default else f", prefetch {prefetch}"
        log(
            f"  throughput {label}: {rate:,.0f} tasks/s ({ratio:.0%} of the limit, "
            f"{paired:,.0f} tasks/s in the paired rounds)"
        )
        log(f"    {describe_cpu(cpu)}")
        result["configs"].append(
            {
                "journal": journal,
                "pool": pool,
                "concurrency": concurrency,
                "prefetch": prefetch,
                "tasks_per_s": rate,
                "samples": rates,
                "limit_samples": limits,
                "limit_paired": paired,
                "ratio_to_limit": ratio,
                "cpu_us_per_task": cpu,
            }
        )
        rows.append(
            Row(
                "throughput",
                label,
                rate,
                "tasks/s",
                reference=paired,
                ratio=ratio,
                target=f">= {TARGET[journal]:.0%} of limit" if default else "(for comparison)",
                met=ratio >= TARGET[journal] if default else None,
                note=f"{describe_cpu(cpu)}; limit at start {limit:,.0f}",
                samples=rates,
            )
        )
    return result, rows
