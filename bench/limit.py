"""The limit: the thinnest task pipeline Python and pyzmq allow on this machine.

::

    client DEALER (bench process) -> ROUTER forwarder ROUTER (process) <- DEALER echo (process)

The same transport as zq (TCP loopback) and the same encoding (msgpack), but no
protocol, no bookkeeping, no journal: the forwarder moves frames, the echo worker
decodes each task, "runs" it and encodes a result. The client keeps a window of tasks
in flight (pipelined). zq's figures are reported as a fraction of this one.

Run as a child: ``python -m bench.limit forwarder`` or ``python -m bench.limit echo URL``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Any

import msgpack
import zmq

from bench.common import LOOPBACK, CpuMeter, Proc, Row, describe_cpu, median, percentile

_PORTS = re.compile(r"^forwarder (\S+) (\S+)$")
_ECHO_READY = re.compile(r"^echo ready$")
_READY = b"READY"
#: Most messages moved per socket per poll turn (as the zq broker does).
BATCH = 2000


def forwarder() -> None:
    """ROUTER (clients) <-> ROUTER (echo workers): route by the client's identity frame."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 100_000
    front.bind(LOOPBACK)
    back.bind(LOOPBACK)
    print(f"forwarder {front.last_endpoint.decode()} {back.last_endpoint.decode()}", flush=True)
    workers: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if back in events:
            for _ in range(BATCH):
                try:
                    frames = back.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) == 2 and frames[1].bytes == _READY:
                    workers.append(frames[0].bytes)
                    continue
                front.send_multipart(frames[1:], copy=False)  # [client, result]
        if front in events and workers:
            for _ in range(BATCH):
                try:
                    frames = front.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                turn = (turn + 1) % len(workers)
                back.send_multipart([workers[turn], *frames], copy=False)  # [w, client, task]


def echo(endpoint: str) -> None:
    """Decode each task, run it (return its first argument), send the encoded result."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 100_000
    sock.connect(endpoint)
    sock.send(_READY)
    print("echo ready", flush=True)
    unpack, pack = msgpack.unpackb, msgpack.packb
    while True:
        client, body = sock.recv_multipart()
        task = unpack(body)
        args = task["args"]
        result = {"id": task["id"], "state": "SUCCESS", "value": args[0] if args else None}
        sock.send_multipart([client, pack(result)])


class Pipeline:
    """A forwarder and an echo worker (child processes) and a client DEALER here."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        fwd = stack.enter_context(Proc([sys.executable, "-m", "bench.limit", "forwarder"], "fwd"))
        match = fwd.wait_line(_PORTS, 20)
        front, back = match.group(1), match.group(2)
        echo_proc = stack.enter_context(
            Proc([sys.executable, "-m", "bench.limit", "echo", back], "echo")
        )
        echo_proc.wait_line(_ECHO_READY, 20)
        self.cpu = CpuMeter({"forwarder": fwd.pid, "echo": echo_proc.pid}, {"client": os.getpid()})
        self.ctx = zmq.Context()
        stack.callback(self.ctx.term)
        self.sock = self.ctx.socket(zmq.DEALER)
        stack.callback(self.sock.close, 0)
        self.sock.linger = 0
        self.sock.sndhwm = self.sock.rcvhwm = 100_000
        self.sock.connect(front)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.next_id = 0
        self.round_trip(timeout=10.0)  # the echo worker's READY may trail the connect

    def _task(self) -> bytes:
        self.next_id += 1
        task: dict[str, Any] = {"id": f"{self.next_id:032x}", "name": "noop", "args": [1]}
        task["kwargs"] = {}
        return msgpack.packb(task)

    def round_trip(self, timeout: float = 5.0) -> float:
        """One task, waited for; its seconds."""
        start = time.perf_counter()
        self.sock.send(self._task())
        if not self.poller.poll(timeout * 1000):
            raise RuntimeError(f"the limit pipeline gave no answer within {timeout}s")
        msgpack.unpackb(self.sock.recv())
        return time.perf_counter() - start

    def pipelined(self, count: int, window: int, timeout: float = 60.0) -> float:
        """``count`` tasks with up to ``window`` in flight; tasks per second."""
        sent = received = 0
        deadline = time.monotonic() + timeout
        start = time.perf_counter()
        sock, unpack = self.sock, msgpack.unpackb
        while received < count:
            while sent < count and sent - received < window:
                sock.send(self._task())
                sent += 1
            if not self.poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise RuntimeError(f"limit: {received}/{count} results after {timeout}s")
            while True:
                try:
                    unpack(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                received += 1
        return count / (time.perf_counter() - start)


def run(
    stack: contextlib.ExitStack, *, tasks: int, repeats: int, window: int, samples: int
) -> tuple[dict[str, Any], list[Row], Pipeline]:
    """Measure the limit: pipelined tasks/s (median of ``repeats``), one-at-a-time latency.
    Also returns the pipeline, up until ``stack`` closes, for rounds paired with zq's."""
    pipe = Pipeline(stack)
    pipe.pipelined(min(tasks, 2000), window)  # warm-up
    rates = []
    for _ in range(repeats):
        pipe.cpu.start()
        rates.append(pipe.pipelined(tasks, window))
        pipe.cpu.stop()
    cpu = pipe.cpu.per_task_us(tasks * repeats)
    for _ in range(50):
        pipe.round_trip()
    latencies = [pipe.round_trip() * 1000 for _ in range(samples)]
    result = {
        "tasks_per_s": median(rates),
        "tasks_per_s_samples": rates,
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p99": percentile(latencies, 99),
        "cpu_us_per_task": cpu,
        "tasks": tasks,
        "window": window,
        "latency_samples": samples,
    }
    rows = [
        Row(
            "limit",
            "pipelined throughput",
            result["tasks_per_s"],
            "tasks/s",
            note=describe_cpu(cpu),
            samples=rates,
        ),
        Row("limit", "round trip p50", result["latency_ms_p50"], "ms"),
        Row("limit", "round trip p99", result["latency_ms_p99"], "ms"),
    ]
    return result, rows, pipe


def main(argv: list[str]) -> None:
    if argv[:1] == ["forwarder"]:
        forwarder()
    elif argv[:1] == ["echo"] and len(argv) == 2:
        echo(argv[1])
    else:
        raise SystemExit("usage: python -m bench.limit forwarder | echo ENDPOINT")


if __name__ == "__main__":
    main(sys.argv[1:])
