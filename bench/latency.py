"""Latency: one task at a time on an idle system, submit to result received.

A broker, one worker (thread pool, one slot) and this client; ``warmup`` tasks first,
then ``samples`` tasks, each sent only once the previous result is in. Reported as
p50 and p99 in milliseconds, for each round of ``repeats`` and as their medians,
next to the limit pipeline's own one-at-a-time round trip in the same run.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.common import (
    Row,
    median,
    percentile,
    start_broker,
    start_client,
    start_worker,
    wait_for_workers,
)

TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0


def one_task(app: Any) -> float:
    """Submit one no-op and wait for its result; milliseconds."""
    start = time.perf_counter()
    app.send_task("bench.noop").get(timeout=10)
    return (time.perf_counter() - start) * 1000


def measure(journal: bool, samples: int, warmup: int, repeats: int) -> list[list[float]]:
    """Per round, the latencies (ms) of ``samples`` tasks on a fresh broker and worker."""
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, journal)
        start_worker(stack, broker.endpoint, pool="thread", concurrency=1)
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, 1)
        rounds = []
        for _ in range(repeats):
            for _ in range(warmup):
                one_task(app)
            rounds.append([one_task(app) for _ in range(samples)])
        return rounds


def run(
    *, limit_p50: float, limit_p99: float, samples: int, warmup: int, repeats: int, log: Any = print
) -> tuple[dict[str, Any], list[Row]]:
    """Journal off, then on."""
    result: dict[str, Any] = {"samples": samples, "warmup": warmup, "repeats": repeats}
    rows = []
    for journal in (False, True):
        rounds = measure(journal, samples, warmup, repeats)
        p50s = [percentile(r, 50) for r in rounds]
        p99s = [percentile(r, 99) for r in rounds]
        p50, p99 = median(p50s), median(p99s)
        name = "journal on" if journal else "journal off"
        log(f"  latency {name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        result[name.replace(" ", "_")] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "p50_ms_rounds": p50s,
            "p99_ms_rounds": p99s,
            "max_ms": max(max(r) for r in rounds),
        }
        rows += [
            Row(
                "latency",
                f"{name}, p50",
                p50,
                "ms",
                reference=limit_p50,
                ratio=p50 / limit_p50,
                target=f"< {TARGET_P50_MS:g} ms",
                met=p50 < TARGET_P50_MS,
                samples=p50s,
            ),
            Row(
                "latency",
                f"{name}, p99",
                p99,
                "ms",
                reference=limit_p99,
                ratio=p99 / limit_p99,
                target=f"< {TARGET_P99_MS:g} ms",
                met=p99 < TARGET_P99_MS,
                samples=p99s,
            ),
        ]
    return result, rows
