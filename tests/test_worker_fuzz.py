"""Hostile input to a worker: a fake broker throws random and mutated frames at a real
worker process; the worker must survive them and still run a legitimate task."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zq import protocol as p
from zq.testing import WorkerProcess


class FakeBroker:
    """A bare ROUTER the worker connects to, speaking just enough ZQ/1."""

    def __init__(self, give_back: float | None = None) -> None:
        self.give_back = give_back
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.last_endpoint.decode()
        self.worker = b""
        self.largest_done_header = 0

    def recv(self, timeout: float = 5.0) -> tuple[bytes, dict]:
        """The worker's next message. A HEARTBEAT is answered, echoing its time, and a
        READY with a WELCOME, as a real broker does: a worker whose lease is 1.5
        heartbeats old gives its connection up, and says READY on a new one (a random
        WELCOME with a short heartbeat may have it do so)."""
        assert self.sock.poll(timeout * 1000), "the worker went silent"
        frames = self.sock.recv_multipart()
        self.worker = frames[0]
        self.header_bytes = len(frames[3]) if len(frames) > 3 else 0
        _, command, header, self.payload = p.parse(frames[1:])
        if command == p.HEARTBEAT:
            self.send(p.BROKER, p.HEARTBEAT, p.pack_header({"t": header["t"]}))
        elif command == p.READY:
            welcome = {
                "t": header["t"],
                "broker": "fake",
                "heartbeat": 1.0,
                "liveness": 3,
                "max_message_size": p.DEFAULT_MAX_MESSAGE,
                "pub": "tcp://127.0.0.1:9",
                "give_back": self.give_back,
            }
            self.send(p.BROKER, p.WELCOME, p.pack_header(welcome))
        return command, header

    def dones(self, count: int, timeout: float = 10.0) -> dict[str, tuple[dict, bytes]]:
        """Collect ``count`` task outcomes (single or batched DONEs), acknowledging them."""
        found: dict[str, tuple[dict, bytes]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            assert time.monotonic() < deadline, f"only {len(found)} of {count} DONEs"
            command, header = self.recv(max(0.01, deadline - time.monotonic()))
            if command != p.DONE:
                continue
            self.largest_done_header = max(self.largest_done_header, self.header_bytes)
            entries = header.get("done", [header])
            for entry, body in zip(entries, self.payload, strict=True):
                found[entry["id"]] = (entry, body)
            ids = [entry["id"] for entry in entries]
            self.send(p.BROKER, p.ACCEPTED, p.pack_header({"ids": ids}))
        return found

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.worker, *frames])

    def expect(self, command: bytes, task_id: str | None = None, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got, header = self.recv(max(0.01, deadline - time.monotonic()))
            entries = header.get("done", [header]) if got == p.DONE else [header]
            if got == p.DONE:  # acknowledge, so the worker's outbox lets go of it
                ids = [entry.get("id") for entry in entries]
                self.send(p.BROKER, p.ACCEPTED, p.pack_header({"ids": ids}))
            for entry in entries:
                if got == command and (task_id is None or entry.get("id") == task_id):
                    return entry
        raise AssertionError(f"no {p.COMMAND_NAMES[command]} from the worker")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@contextlib.contextmanager
def worker_on_fake_broker(
    pool: str = "thread", give_back: float | None = None
) -> Iterator[tuple[FakeBroker, WorkerProcess]]:
    """A real worker (1 slot) on a :class:`FakeBroker` that has welcomed it."""
    broker = FakeBroker(give_back)
    worker = WorkerProcess("tests.tasks", broker.endpoint, pool=pool, concurrency=1)
    try:
        broker.expect(p.READY)  # (welcomed on the way)
        yield broker, worker
    finally:
        worker.close()
        broker.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeBroker, WorkerProcess]]:
    with worker_on_fake_broker() as pair:
        yield pair


def _run_a_task(broker: FakeBroker, task_id: str, delivery: int) -> dict:
    header = {
        "id": task_id,
        "name": "tests.tasks.add",
        "queue": "default",
        "client": "ab",
        "delivery": delivery,
    }
    broker.send(p.BROKER, p.TASK, p.pack_header(header), p.encode([[2, 3], {}]))
    return broker.expect(p.DONE, task_id)


_commands = st.sampled_from(sorted(p.COMMAND_NAMES)) | st.binary(min_size=1, max_size=2)
_fields = st.sampled_from(
    [
        "id",
        "name",
        "delivery",
        "heartbeat",
        "liveness",
        "ids",
        "code",
        "max_message_size",
        "queue",
        "key",
    ]
)
_values = (
    st.none()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)
)
_headers = st.dictionaries(_fields, _values, max_size=5).map(p.pack_header) | st.binary(max_size=30)
_messages = st.one_of(
    st.lists(st.binary(max_size=40), max_size=5),
    st.tuples(
        st.sampled_from([p.BROKER, b"ZQ1X"]), _commands, _headers, st.binary(max_size=40)
    ).map(list),
)


_examples = itertools.count(1)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(_messages, min_size=1, max_size=10))
def test_worker_survives_random_frames_and_keeps_working(fake, batch):
    broker, worker = fake
    for frames in batch:
        if frames:
            broker.send(*frames)
    assert worker.proc.poll() is None, "the worker died"
    n = next(_examples)
    if n % 25 == 0:  # a legitimate task still runs, now and then
        assert _run_a_task(broker, f"legit-{n}", 1)["state"] == "SUCCESS"


def test_worker_runs_a_batch_of_tasks_from_one_message(fake):
    """TASK with several tasks: each has its payload frame and its input frames."""
    broker, _ = fake
    base = {"name": "tests.tasks.add", "queue": "default", "client": "ab", "delivery": 1}
    headers = [
        {**base, "id": "batch-1"},
        {**base, "id": "batch-2", "after": ["x"], "args_from": ["x"], "pass": "one", "inputs": 1},
        {**base, "id": "batch-3"},
    ]
    frames = [
        p.encode([[1, 2], {}]),
        p.encode([[10], {}]),
        p.encode(32),  # batch-2's parent's result: add(32, 10)
        p.encode([[3, 4], {}]),
    ]
    packed = p.pack_list("tasks", [p.pack_header(h) for h in headers])
    broker.send(p.BROKER, p.TASK, packed, *frames)
    outcomes = broker.dones(3)
    assert {i: p.decode(body) for i, (_, body) in outcomes.items()} == {
        "batch-1": 3,
        "batch-2": 42,
        "batch-3": 7,
    }
    assert all(entry["state"] == "SUCCESS" for entry, _ in outcomes.values())


def test_a_turn_of_many_dones_is_split_under_the_header_limit(fake):
    """Thousands of tasks that expired on their way end in one worker turn: their DONEs
    go as several DONE messages, each with a header the broker takes."""
    broker, _ = fake
    count, per_message = 8000, 2000
    base = {"name": "tests.tasks.add", "queue": "default", "client": "ab", "expires": 1.0}
    for start in range(0, count, per_message):
        headers = [
            p.pack_header({**base, "id": f"expired-{i}", "delivery": 1})
            for i in range(start, start + per_message)
        ]
        payloads = [p.encode([[1, 1], {}])] * per_message
        broker.send(p.BROKER, p.TASK, p.pack_list("tasks", headers), *payloads)
    outcomes = broker.dones(count, timeout=30)
    assert {entry["state"] for entry, _ in outcomes.values()} == {p.EXPIRED}
    assert broker.largest_done_header <= p.MAX_HEADER_BYTES


def test_worker_still_runs_tasks_after_the_fuzzing(fake):
    broker, worker = fake
    done = _run_a_task(broker, "after-fuzz", 7)
    assert done["state"] == "SUCCESS" and done["delivery"] == 7
    assert worker.proc.poll() is None


@pytest.mark.parametrize("welcome", [{"heartbeat": 1e-9}, {"max_message_size": 2048}])
def test_an_implausible_welcome_changes_nothing(welcome):
    """A heartbeat of 1e-9 s used to be taken: the worker then renewed its connection
    (a READY on a new socket) every turn of its loop, without end. (Last in this
    module: while it runs, nobody answers the module's fake worker.)"""
    with worker_on_fake_broker() as (broker, worker):
        broker.send(p.BROKER, p.WELCOME, p.pack_header(welcome))
        readies, deadline = 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if broker.sock.poll(100):
                readies += broker.recv()[0] == p.READY
        assert readies == 0 and worker.proc.poll() is None
        assert _run_a_task(broker, "after", 1)["state"] == "SUCCESS"
