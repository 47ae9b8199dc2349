"""Where a lone task's latency goes: every message sent and received, timed, in order.

    python -m bench.trace              # journal off, 2,000 tasks one at a time
    python -m bench.trace --journal    # with a journal file

A broker, a worker (thread pool, one slot) and this client each record the time
(``CLOCK_MONOTONIC``, the same clock in every process) of every message they send or
receive through ``zq.wire``, with its command; the client also records each call's
start and return. Leaving out what the task does not wait for (ACCEPTED, STARTED,
heartbeats), tasks whose messages came in the most common order are lined up, and
each step between two consecutive records is printed as its median over those tasks:
the time between a send and the matching receive is the message in transit (through
two libzmq I/O threads and loopback TCP), between a receive and the next send the
process's own work. The recording itself adds a few microseconds per message.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import itertools
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import median
from zq import protocol as p

_NAMES = {command.hex(): name for command, name in p.COMMAND_NAMES.items()}
#: Messages a lone task does not wait for (left out, so that the steps are its path).
_OFF_PATH = ("HEARTBEAT", "ACCEPTED", "STARTED")


def install(role: str, out: Path | None = None) -> list[tuple[int, str, str, str]]:
    """Record every message this process sends or receives through ``zq.wire`` from
    now on, into the list returned; written to ``out``, if given, at exit."""
    from zq import wire

    records: list[tuple[int, str, str, str]] = []
    send, recv = wire.send, wire.recv

    def command(frames: Any) -> str:
        for frame in list(frames)[:3]:  # [ident] [tag] command, or [topic] command
            data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
            if len(data) == 1:
                return _NAMES.get(data.hex(), data.hex())
        return "?"

    def traced_send(sock: Any, frames: Any, flags: int = 0) -> None:
        records.append((time.monotonic_ns(), role, "sends", command(frames)))
        send(sock, frames, flags)

    def traced_recv(sock: Any, flags: int = 0) -> Any:
        frames = recv(sock, flags)
        records.append((time.monotonic_ns(), role, "gets", command(frames)))
        return frames

    wire.send, wire.recv = traced_send, traced_recv  # type: ignore[assignment]
    if out is not None:
        atexit.register(
            lambda: out.write_text("".join(f"{r[0]} {r[1]} {r[2]} {r[3]}\n" for r in records))
        )
    return records


def _hooked(role: str, out: str, argv: list[str]) -> None:
    """A ``zq`` command with the recording installed."""
    install(role, Path(out))
    from zq.cli import main

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that atexit runs
    sys.argv = ["zq", *argv]
    main()


def _steps(records: list[tuple[int, str, str, str]]) -> tuple[int, int, list[tuple[str, float]]]:
    """The tasks in the most common order of records, and each step's median (us)."""
    tasks: list[list[tuple[int, str, str, str]]] = []
    current: list[tuple[int, str, str, str]] | None = None
    for record in sorted(records):
        if record[3] in _OFF_PATH:
            continue
        if record[2] == "call":
            current = [record]
        elif current is not None:
            current.append(record)
            if record[2] == "returns":
                tasks.append(current)
                current = None
    shapes = collections.Counter(tuple(r[1:] for r in task) for task in tasks)
    shape, count = shapes.most_common(1)[0]
    gaps: list[list[float]] = [[] for _ in shape[1:]]
    for task in tasks:
        if tuple(r[1:] for r in task) == shape:
            for i, (a, b) in enumerate(itertools.pairwise(task)):
                gaps[i].append((b[0] - a[0]) / 1000)
    names = [" ".join(step) for step in shape]
    return (
        count,
        len(tasks),
        [
            (f"{a} -> {b}", median(g))
            for (a, b), g in zip(itertools.pairwise(names), gaps, strict=True)
        ],
    )


def main() -> None:
    if sys.argv[1:2] == ["hook"]:
        _hooked(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__)
    parser.add_argument("--journal", action="store_true", help="a journal file (default: off)")
    parser.add_argument("--samples", type=int, default=2000, help="tasks, one at a time")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")

    from bench.common import start_broker, start_client, start_worker, wait_for_workers

    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="zq-trace-") as tmp:
        hook = [sys.executable, "-m", "bench.trace", "hook"]
        broker = start_broker(stack, args.journal, zq=[*hook, "broker", f"{tmp}/b"])
        worker = start_worker(stack, broker.endpoint, zq=[*hook, "worker", f"{tmp}/w"])
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, 1)
        for _ in range(200):  # warm-up, not recorded
            app.send_task("bench.noop").get(timeout=10)
        records = install("client")
        latencies: list[float] = []
        for _ in range(args.samples):
            start = time.monotonic_ns()
            records.append((start, "client", "call", "send_task"))
            app.send_task("bench.noop").get(timeout=10)
            records.append((time.monotonic_ns(), "client", "returns", "get"))
            latencies.append((records[-1][0] - start) / 1000)
        for proc in (worker, broker.proc):  # gracefully, so that they write their records
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(20)
        for name in ("b", "w"):
            for line in (Path(tmp) / name).read_text().splitlines():
                stamp, role, what, command = line.split()
                records.append((int(stamp), role, what, command))
    count, total, steps = _steps(records)
    print(f"journal {'on' if args.journal else 'off'}: {count} of {total} tasks in this order")
    for step, us in steps:
        print(f"  {step:<44} {us:8.1f} us")
    print(f"  {'sum of the step medians':<44} {sum(s for _, s in steps):8.1f} us")
    print(f"  {'median call to return (the latency)':<44} {median(latencies):8.1f} us")


if __name__ == "__main__":
    main()
