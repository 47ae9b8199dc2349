"""Peer comparison: Celery with a Redis broker, only when both are installed.

Nothing is installed here: without ``import celery`` and a ``redis-server`` on the
PATH this benchmark says so and is skipped. Otherwise it starts ``redis-server`` on
a free loopback port and a Celery worker (threads pool, 4 slots) running
:mod:`bench.celery_app`, and measures the same two figures as zq's throughput
(pipelined no-ops, end to end) and latency (one at a time), against the limit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import time
from typing import Any

from bench.common import Proc, Row, child_env, median, percentile

_REDIS_READY = re.compile("Ready to accept connections")


def missing() -> str | None:
    """Why the comparison cannot run, or None when it can."""
    reasons = []
    if importlib.util.find_spec("celery") is None:
        reasons.append("celery is not installed (import celery fails)")
    if shutil.which("redis-server") is None:
        reasons.append("redis-server is not on the PATH")
    return "; ".join(reasons) or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    *, limit: float, limit_p50: float, tasks: int, samples: int, repeats: int, log: Any = print
) -> tuple[dict[str, Any], list[Row]]:
    """Celery + Redis throughput and latency, or a skip."""
    why = missing()
    if why is not None:
        log(f"  peers: SKIPPED, {why}. Not installed by the benchmark on purpose.")
        return {"skipped": why}, []

    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = child_env(BENCH_CELERY_BROKER=url)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(
            Proc(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                "redis",
                env,
            )
        )
        redis.wait_line(_REDIS_READY, 20)
        worker_args = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker"]
        worker_args += ["--pool", "threads", "--concurrency", "4", "--loglevel", "info"]
        worker = stack.enter_context(Proc(worker_args, "celery-worker", env))
        worker.wait_line(re.compile(r"ready\."), 60)
        os.environ["BENCH_CELERY_BROKER"] = url
        from bench import celery_app

        noop = celery_app.noop
        noop.delay().get(timeout=30)  # warm-up

        def pipelined() -> float:
            start = time.perf_counter()
            results = [noop.delay() for _ in range(tasks)]
            for r in results:
                r.get(timeout=120)
            return tasks / (time.perf_counter() - start)

        rates = [pipelined() for _ in range(repeats)]
        latencies = []
        for _ in range(samples):
            start = time.perf_counter()
            noop.delay().get(timeout=10)
            latencies.append((time.perf_counter() - start) * 1000)
    rate, p50 = median(rates), percentile(latencies, 50)
    p99 = percentile(latencies, 99)
    log(f"  peers: celery+redis {rate:,.0f} tasks/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    result = {"tasks_per_s": rate, "samples": rates, "p50_ms": p50, "p99_ms": p99}
    rows = [
        Row("peers", "celery+redis throughput (threads x4)", rate, "tasks/s", limit, rate / limit),
        Row("peers", "celery+redis latency p50", p50, "ms", limit_p50, p50 / limit_p50),
        Row("peers", "celery+redis latency p99", p99, "ms"),
    ]
    return result, rows


def ratios(results: dict[str, Any]) -> list[Row]:
    """zq / Celery for the figures both measured in this run (when both ran)."""
    celery = results.get("peers", {})
    if "tasks_per_s" not in celery:
        return []
    rows = []
    for config in results.get("throughput", {}).get("configs", []):
        default = config["prefetch"] == "auto"
        if config["pool"] == "thread" and config["concurrency"] == 4 and default:
            journal = "on" if config["journal"] else "off"
            rate = config["tasks_per_s"]
            rows.append(
                Row(
                    "peers",
                    f"zq / celery throughput (thread x4, journal {journal})",
                    rate / celery["tasks_per_s"],
                    "x",
                    note=f"zq {rate:,.0f} vs celery {celery['tasks_per_s']:,.0f} tasks/s",
                )
            )
    latency = results.get("latency", {})
    for journal in ("off", "on"):
        zq_p50 = latency.get(f"journal_{journal}", {}).get("p50_ms")
        if zq_p50:
            rows.append(
                Row(
                    "peers",
                    f"celery / zq latency p50 (journal {journal})",
                    celery["p50_ms"] / zq_p50,
                    "x",
                    note=f"zq {zq_p50:.2f} vs celery {celery['p50_ms']:.2f} ms",
                )
            )
    return rows
