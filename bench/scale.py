"""Scale: memory per queued task, dispatch with 1 vs many keys, heartbeat CPU.

* **memory**: a broker (journal off) with no worker; its VmRSS before and after the
  client queued ``queued`` tasks (measured after every third of them too), less the
  payload bytes: what the broker spends per queued task beyond the task's arguments.
* **keys**: two brokers, each with ``tasks`` keyed tasks queued and no worker: all on
  one key, or each on its own key. Then ``repeats`` windows alternate between them:
  a worker (thread pool, one slot, so both cases run one task at a time and differ
  only in the broker's key structures) starts, ``drain / repeats`` results are timed
  from its first one on, with the broker's CPU time per task, and the worker stops
  (SIGTERM). Medians; the rest of each queue stays queued meanwhile. And the same
  comparison on :class:`zq.dispatch.Dispatcher` alone, without sockets or processes.
* **heartbeats**: ``workers`` fake workers (raw DEALER sockets in this process, each
  says READY and then HEARTBEAT every half heartbeat, as a real worker does) and the
  broker's CPU time (/proc/PID/stat) over ``seconds`` of otherwise idle time, against
  the same broker with no worker over the same time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from typing import Any

import zmq

from bench.common import (
    CpuMeter,
    Row,
    cpu_seconds,
    gather,
    median,
    rss_bytes,
    start_broker,
    start_client,
    start_worker,
    wait_for_workers,
)
from zq import protocol as p
from zq.dispatch import Dispatcher
from zq.dispatch import Task as DispatchTask

TARGET_BYTES_PER_TASK = 1024
TARGET_KEYS_SLOWDOWN = 0.10
#: The arguments of every queued task in the memory test (a few dozen bytes encoded).
ARGS = ("x" * 40, 123456)


def _settle(pid: int, seconds: float = 0.5) -> int:
    """VmRSS once the broker had a moment to finish what it was doing."""
    time.sleep(seconds)
    return rss_bytes(pid)


def memory(queued: int, *, log: Any = print) -> tuple[dict[str, Any], list[Row]]:
    """Broker RSS per queued task, beyond its payload."""
    payload = len(p.encode([list(ARGS), {}]))
    steps = 3
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, False, "--max-queued", str(queued + 1000))
        app = start_client(stack, broker.endpoint)
        app.status(timeout=10)  # connected, HELLO answered
        rss = [_settle(broker.pid)]
        sent = 0
        for step in range(1, steps + 1):
            upto = queued * step // steps
            for _ in range(upto - sent):
                app.send_task("bench.noop", ARGS)
            sent = upto
            if not app.client.flush(120):
                raise RuntimeError(f"memory: the broker did not accept {sent} tasks in 120s")
            rss.append(_settle(broker.pid, 1.0))
        queued_now = sum(app.status(timeout=10)["queues"].values())
    if queued_now != queued:
        raise RuntimeError(f"memory: the broker holds {queued_now} tasks, expected {queued}")
    per_task = (rss[-1] - rss[0]) / queued
    per_step = [(b - a) / (queued / steps) - payload for a, b in itertools.pairwise(rss)]
    beyond = per_task - payload
    log(f"  memory: {per_task:,.0f} B per queued task, {beyond:,.0f} B beyond its payload")
    result = {
        "queued": queued,
        "payload_bytes": payload,
        "rss_bytes": rss,
        "bytes_per_task": per_task,
        "bytes_beyond_payload": beyond,
        "bytes_beyond_payload_per_third": per_step,
    }
    row = Row(
        "scale",
        f"broker memory per queued task beyond payload ({queued:,} queued)",
        beyond,
        "B",
        target=f"< {TARGET_BYTES_PER_TASK} B",
        met=beyond < TARGET_BYTES_PER_TASK,
        note=f"payload {payload} B; RSS +{(rss[-1] - rss[0]) / 2**20:.0f} MiB",
        samples=per_step,
    )
    return result, [row]


class _Queue:
    """A broker holding ``tasks`` queued keyed tasks (1 key, or one key each)."""

    def __init__(self, stack: contextlib.ExitStack, tasks: int, distinct: bool) -> None:
        # --prefetch 0: with automatic prefetch, distinct keys would run ahead of their
        # worker's slot while one key cannot (its next task waits for the last), and the
        # comparison would measure prefetch, not the broker's key structures.
        extra = ("--max-queued", str(tasks + 1000), "--prefetch", "0")
        self.broker = start_broker(stack, False, *extra)
        self.app = start_client(stack, self.broker.endpoint)
        self.app.status(timeout=10)
        rss = _settle(self.broker.pid)
        start = time.perf_counter()
        self.results = [
            self.app.send_task("bench.noop", (), key=f"k{i}" if distinct else "one")
            for i in range(tasks)
        ]
        if not self.app.client.flush(300):
            raise RuntimeError(f"keys: the broker did not accept {tasks} tasks in 300s")
        self.submit_s = time.perf_counter() - start
        self.bytes_per_task = (_settle(self.broker.pid, 1.0) - rss) / tasks
        self.next = 0  # results before this one are in
        self.rates: list[float] = []
        self.cpu_us: list[float] = []

    def window(self, size: int) -> None:
        """Start a worker, time ``size`` results after its first, stop it gracefully."""
        with contextlib.ExitStack() as stack:
            worker = start_worker(stack, self.broker.endpoint, pool="thread", concurrency=1)
            results = self.results
            while results[self.next].ready_here():  # finished by the previous worker
                self.next += 1
            gather(results[self.next : self.next + 1], timeout=60)
            cpu = CpuMeter({"broker": self.broker.pid}, {})
            cpu.start()
            start = time.perf_counter()
            gather(results[self.next + 1 : self.next + 1 + size], timeout=120)
            elapsed = time.perf_counter() - start
            cpu.stop()
            self.next += 1 + size
            self.rates.append(size / elapsed)
            self.cpu_us.append(cpu.per_task_us(size)["broker"])
            worker.terminate(10)  # SIGTERM: it finishes its task and hands nothing back

    def summary(self) -> dict[str, Any]:
        return {
            "tasks_per_s": median(self.rates),
            "samples": self.rates,
            "broker_cpu_us_per_task": median(self.cpu_us),
            "broker_cpu_us_samples": self.cpu_us,
            "submit_s": self.submit_s,
            "broker_rss_bytes_per_queued_task": self.bytes_per_task,
        }


def dispatcher_us(tasks: int, distinct: bool) -> float:
    """:class:`zq.dispatch.Dispatcher` alone (no sockets): ``tasks`` keyed tasks queued,
    then one worker slot takes and finishes them all; microseconds per task."""
    d = Dispatcher()
    for i in range(tasks):
        d.submit(DispatchTask(f"{i:032x}", "default", f"k{i}" if distinct else "one"))
    out = d.add_worker(b"w", ["default"], 1)
    done = 0
    start = time.perf_counter()
    while out:
        follow: list[Any] = []
        for wid, task in out:
            follow += d.done(wid, task.id, task.delivery)[1]
            done += 1
        out = follow
    if done != tasks:
        raise RuntimeError(f"dispatcher: {done} of {tasks} tasks ran")
    return 1e6 * (time.perf_counter() - start) / tasks


def keys(tasks: int, drain: int, repeats: int, *, log: Any = print) -> tuple[dict, list[Row]]:
    """Drain rate and broker CPU per task with 1 key against ``tasks`` distinct keys.

    Both brokers hold their queues at once; the windows alternate between them (a
    fresh one-slot worker each), so drift in the machine's load hits both alike."""
    size = max(1, drain // repeats)
    with contextlib.ExitStack() as stack:
        one = _Queue(stack, tasks, distinct=False)
        many = _Queue(stack, tasks, distinct=True)
        for _ in range(repeats):
            one.window(size)
            many.window(size)
        a, b = one.summary(), many.summary()
    ratio = b["tasks_per_s"] / a["tasks_per_s"]
    pure_one, pure_many = [], []
    for _ in range(repeats):
        pure_one.append(dispatcher_us(tasks, False))
        pure_many.append(dispatcher_us(tasks, True))
    a["dispatcher_us_per_task"], a["dispatcher_us_samples"] = median(pure_one), pure_one
    b["dispatcher_us_per_task"], b["dispatcher_us_samples"] = median(pure_many), pure_many
    log(
        f"  keys: 1 key {a['tasks_per_s']:,.0f} tasks/s ({a['broker_cpu_us_per_task']:.0f} us "
        f"broker CPU/task), {tasks:,} keys {b['tasks_per_s']:,.0f} tasks/s "
        f"({b['broker_cpu_us_per_task']:.0f} us): {ratio:.0%}"
    )
    result = {"queued": tasks, "window": size, "one_key": a, "distinct_keys": b}
    rows = [
        Row(
            "scale",
            f"dispatch, {tasks:,} queued on 1 key (1 slot)",
            a["tasks_per_s"],
            "tasks/s",
            note=f"broker CPU {a['broker_cpu_us_per_task']:.0f} us/task; "
            f"RSS {a['broker_rss_bytes_per_queued_task']:,.0f} B per queued task",
            samples=a["samples"],
        ),
        Row(
            "scale",
            f"dispatch, {tasks:,} queued on {tasks:,} keys (1 slot)",
            b["tasks_per_s"],
            "tasks/s",
            reference=a["tasks_per_s"],
            ratio=ratio,
            target=f">= {1 - TARGET_KEYS_SLOWDOWN:.0%} of 1 key",
            met=ratio >= 1 - TARGET_KEYS_SLOWDOWN,
            note=f"broker CPU {b['broker_cpu_us_per_task']:.0f} us/task; "
            f"RSS {b['broker_rss_bytes_per_queued_task']:,.0f} B per queued task",
            samples=b["samples"],
        ),
        Row(
            "scale",
            f"Dispatcher alone, {tasks:,} tasks on 1 key",
            a["dispatcher_us_per_task"],
            "us/task",
            note="pure state, no sockets",
            samples=pure_one,
        ),
        Row(
            "scale",
            f"Dispatcher alone, {tasks:,} tasks on {tasks:,} keys",
            b["dispatcher_us_per_task"],
            "us/task",
            reference=a["dispatcher_us_per_task"],
            ratio=b["dispatcher_us_per_task"] / a["dispatcher_us_per_task"],
            note="pure state, no sockets",
            samples=pure_many,
        ),
    ]
    return result, rows


class FakeWorkers:
    """``count`` DEALERs that say READY and then HEARTBEAT every ``interval`` s, on a thread."""

    def __init__(self, endpoint: str, count: int, interval: float) -> None:
        self.endpoint = endpoint
        self.count = count
        self.interval = interval
        self.received = 0
        self.welcomed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-workers", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> FakeWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _ready(self, i: int) -> list[bytes]:
        return p.message(
            p.WORKER,
            p.READY,
            {
                "worker": f"fake-{os.getpid()}-{i}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "concurrency": 1,
                "queues": ["bench-idle"],  # nothing is ever sent there
                "tasks": [],
                "running": {},
            },
        )

    def _run(self) -> None:
        ctx = zmq.Context()
        socks = []
        try:
            poller = zmq.Poller()
            for i in range(self.count):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(self.endpoint)
                sock.send_multipart(self._ready(i))
                poller.register(sock, zmq.POLLIN)
                socks.append(sock)

            def heartbeat(now: float) -> list[bytes]:  # with its time: the broker echoes it
                return p.message(p.WORKER, p.HEARTBEAT, {"t": now})

            index = {sock: i for i, sock in enumerate(socks)}
            # Spread the heartbeats over the interval, as independent workers would.
            due = [time.monotonic() + self.interval * i / self.count for i in range(self.count)]
            while not self._stop.is_set():
                for sock, _ in poller.poll(self.interval * 100):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.received += 1
                        if len(frames) > 1 and frames[1] == p.WELCOME:
                            self.welcomed.add(index[sock])
                now = time.monotonic()
                for i, sock in enumerate(socks):
                    if now >= due[i]:
                        sock.send_multipart(heartbeat(now))
                        due[i] = now + self.interval
        except BaseException as exc:  # reported by the caller
            self._error = exc
        finally:
            for sock in socks:
                sock.close(0)
            ctx.term()

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"fake workers failed: {self._error!r}")


def _broker_cpu(broker_pid: int, seconds: float, repeats: int) -> list[float]:
    """The broker's CPU use (fraction of one core) over ``repeats`` equal windows."""
    window = seconds / repeats
    marks = [(time.monotonic(), cpu_seconds(broker_pid))]
    for _ in range(repeats):
        time.sleep(window)
        marks.append((time.monotonic(), cpu_seconds(broker_pid)))
    return [(c2 - c1) / (t2 - t1) for (t1, c1), (t2, c2) in itertools.pairwise(marks)]


def heartbeats(
    workers: int, seconds: float, repeats: int, *, log: Any = print
) -> tuple[dict[str, Any], list[Row]]:
    """Broker CPU with ``workers`` idle workers, and with none."""
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, False)
        app = start_client(stack, broker.endpoint)
        app.status(timeout=10)
        time.sleep(0.5)
        idle = _broker_cpu(broker.pid, seconds / 2, repeats)
        fakes = stack.enter_context(FakeWorkers(broker.endpoint, workers, 0.5))
        wait_for_workers(app, workers, timeout=30)
        time.sleep(1.0)  # past the READY burst
        busy = _broker_cpu(broker.pid, seconds, repeats)
        fakes.check()
        listed = len(app.status(timeout=10)["workers"])
        dropped = app.status(timeout=10)["counters"].get("unknown_worker", 0)
    if listed != workers:
        raise RuntimeError(f"heartbeats: the broker lists {listed} of {workers} fake workers")
    cpu, base = median(busy), median(idle)
    log(
        f"  heartbeats: broker CPU {cpu:.1%} of a core with {workers} idle workers "
        f"({base:.1%} with none)"
    )
    result = {
        "workers": workers,
        "seconds": seconds,
        "cpu_fraction": cpu,
        "cpu_fraction_samples": busy,
        "cpu_fraction_no_workers": base,
        "cpu_fraction_no_workers_samples": idle,
        "per_worker_us_per_s": (cpu - base) / workers * 1e6,
        "workers_still_listed": listed,
        "unknown_worker_errors": dropped,
    }
    rows = [
        Row(
            "scale",
            f"broker CPU, {workers} idle workers heartbeating",
            cpu * 100,
            "% core",
            note=f"{base * 100:.2f}% with no worker",
            samples=[b * 100 for b in busy],
        )
    ]
    return result, rows
