"""Malformed and hostile input sent straight to a real broker's ROUTER.

Each test talks to the broker process over a raw ``zmq.DEALER`` of its own; every
receive is bounded by a poll timeout. The broker must answer what it can with
``[BROKER, ERROR | REJECTED, header]`` carrying a readable ``reason``, count the
malformed messages, and keep serving clients and workers afterwards.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import tasks
from zq import protocol as p
from zq.testing import BrokerProcess, wait_for

#: Longest any single receive waits for the broker, in milliseconds.
REPLY_TIMEOUT_MS = 5000


class RawPeer:
    """A bare DEALER connected to the broker: send frames, receive with a deadline."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> list[bytes]:
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            raise AssertionError(f"no reply from the broker within {timeout_ms} ms")
        return self.sock.recv_multipart()

    def recv_broker(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> tuple[bytes, dict[str, Any]]:
        """One reply, checked to be ``[BROKER, command, header]``: (command, header)."""
        frames = self.recv(timeout_ms)
        assert len(frames) == 3, frames
        tag, command, header, payload = p.parse(frames)
        assert tag == p.BROKER
        assert payload == []
        return command, header

    def expect_error(self, pattern: str, timeout_ms: int = REPLY_TIMEOUT_MS) -> dict[str, Any]:
        command, header = self.recv_broker(timeout_ms)
        assert command == p.ERROR, (p.COMMAND_NAMES.get(command), header)
        assert_readable(header["reason"], pattern)
        return header

    def expect_nothing(self, timeout_ms: int = 200) -> None:
        assert not self.sock.poll(timeout_ms, zmq.POLLIN), self.sock.recv_multipart()

    def sync(self) -> list[list[bytes]]:
        """Round-trip a STATUS with a fresh ``req``; returns every message before its reply.

        The broker answers one connection in order, so once the reply comes back it
        has handled everything this socket sent before.
        """
        req = uuid.uuid4().hex
        self.send(p.message(p.CLIENT, p.STATUS, {"req": req}))
        before = []
        for _ in range(1000):
            frames = self.recv()
            if frames[1:2] == [p.STATUS] and p.unpack_header(frames[2]).get("req") == req:
                return before
            before.append(frames)
        raise AssertionError("STATUS reply never came back")

    def close(self) -> None:
        self.sock.close(linger=0)


def assert_readable(reason: Any, pattern: str) -> None:
    assert isinstance(reason, str)
    assert reason.strip()
    assert reason.isprintable(), reason
    assert re.search(pattern, reason), f"{reason!r} does not match {pattern!r}"


@pytest.fixture
def raw(broker: BrokerProcess) -> Iterator[RawPeer]:
    ctx = zmq.Context()
    peer = RawPeer(ctx, broker.endpoint)
    try:
        yield peer
    finally:
        peer.close()
        ctx.term()


@pytest.fixture
def raw_factory(broker: BrokerProcess) -> Iterator:
    """More raw peers, each with its own routing identity; all closed in teardown."""
    ctx = zmq.Context()
    peers: list[RawPeer] = []

    def make() -> RawPeer:
        peers.append(RawPeer(ctx, broker.endpoint))
        return peers[-1]

    try:
        yield make
    finally:
        for peer in peers:
            peer.close()
        ctx.term()


@pytest.fixture
def probe(raw_factory) -> RawPeer:
    """A second connection that only ever sends HELLO, so it only ever gets WELCOME."""
    return raw_factory()


def task_header(task_id: str, **changes: Any) -> dict[str, Any]:
    # Queue "nowhere" has no worker, so a raw task that is accepted never runs.
    return {"id": task_id, "name": "tests.tasks.add", "queue": "nowhere", **changes}


def submit(tasks_: list[Any], *payload: bytes, client: str = "raw-client") -> list[bytes]:
    return p.message(p.CLIENT, p.SUBMIT, {"client": client, "tasks": tasks_}, *payload)


# Messages the broker must refuse with ERROR and count as malformed:
# (id, frames, pattern the reason must match).
MALFORMED = [
    ("single-frame", [b"just one frame"], r"at least 3 frames, got 1"),
    ("two-frames", [p.CLIENT, p.HELLO], r"at least 3 frames, got 2"),
    ("unknown-tag", [b"XXXX", p.HELLO, p.pack_header({})], r"unknown tag b'XXXX'"),
    ("unknown-command", [p.CLIENT, b"\x99", p.pack_header({})], r"unknown command b'\\x99'"),
    ("undecodable-header", [p.CLIENT, p.HELLO, b"\xc1"], r"undecodable header"),
    ("header-is-a-list", [p.CLIENT, p.HELLO, msgpack.packb([1, 2])], r"header is not a map"),
    (
        "oversize-header",
        [p.CLIENT, p.HELLO, p.pack_header({"x": b"x" * p.MAX_HEADER_BYTES})],
        rf"exceeds {p.MAX_HEADER_BYTES}",
    ),
    (
        "worker-command-with-client-tag",
        p.message(p.CLIENT, p.DONE, {"id": "x", "state": p.SUCCESS}, b""),
        r"DONE not valid from ZQ1C",
    ),
    (
        "broker-command-from-a-peer",
        p.message(p.BROKER, p.WELCOME, {}),
        r"WELCOME not valid from ZQ1B",
    ),
    (
        "submit-more-tasks-than-payloads",
        submit([task_header("a"), task_header("b")], b"only one"),
        r"2 tasks but 1 payloads",
    ),
    (
        "submit-more-payloads-than-tasks",
        submit([task_header("a")], b"one", b"two"),
        r"1 tasks but 2 payloads",
    ),
    (
        "submit-tasks-not-a-list",
        p.message(p.CLIENT, p.SUBMIT, {"client": "c", "tasks": "nope"}),
        r"'tasks' \(list\)",
    ),
    ("fetch-ids-not-strings", p.message(p.CLIENT, p.FETCH, {"ids": [1, 2]}), r"FETCH needs 'ids'"),
    (
        "fetch-negative-wait",
        p.message(p.CLIENT, p.FETCH, {"ids": ["x"], "wait": -1}),
        r"'wait' must be",
    ),
    (
        "ready-without-concurrency",
        p.message(p.WORKER, p.READY, {"worker": "w", "queues": ["q"]}),
        r"READY needs 'worker'",
    ),
]


@pytest.mark.parametrize(
    ("frames", "pattern"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_message_gets_an_error(raw, frames, pattern):
    raw.send(frames)
    raw.expect_error(pattern)
    raw.expect_nothing()  # exactly one reply


def test_invalid_task_is_rejected_by_field_while_valid_one_is_accepted(raw):
    raw.send(submit([task_header("good"), task_header("bad", name=123)], b"args", b"args"))
    replies = dict(raw.recv_broker() for _ in range(2))
    assert set(replies) == {p.ACCEPTED, p.REJECTED}
    assert replies[p.ACCEPTED] == {"ids": ["good"]}
    rejected = replies[p.REJECTED]["rejected"]
    assert list(rejected) == ["bad"]
    assert_readable(rejected["bad"], r"^name: must be a string, got int$")
    raw.expect_nothing()


@pytest.mark.parametrize(
    ("field", "task"),
    [
        ("id", {"name": "n", "queue": "q"}),
        ("queue", task_header("t", queue="")),
        ("key", task_header("t", key="k" * (p.MAX_KEY_LEN + 1))),
        ("ignore_result", task_header("t", ignore_result="yes")),
        ("priority", task_header("t", priority=10)),
        ("priority", task_header("t", priority=1.5)),
        ("eta", task_header("t", eta="tomorrow")),
        ("expires", task_header("t", expires=-1)),
        ("after", task_header("t", after=None)),
        ("after", task_header("t", after="parent")),
        ("after", task_header("t", after=["no-such-parent"])),
        ("args_from", task_header("t", after=[], args_from=[[1]], **{"pass": "list"})),
        ("args_from", task_header("t", after=[], args_from=["x"], **{"pass": "one"})),
        ("pass", task_header("t", after=[], **{"pass": "one"})),
        ("pass", task_header("t", after=[], args_from=[], **{"pass": "many"})),
        ("countdown", task_header("t", countdown=5)),
        ("countdown", task_header("t", after=[], countdown=float("inf"))),
    ],
    ids=[
        "missing-id",
        "empty-queue",
        "key-too-long",
        "ignore-result-not-bool",
        "priority-10",
        "priority-float",
        "eta-text",
        "expires-negative",
        "after-none",
        "after-text",
        "after-unknown",
        "args-from-unhashable",
        "args-from-not-a-parent",
        "pass-without-args-from",
        "pass-unknown",
        "countdown-without-after",
        "countdown-infinite",
    ],
)
def test_rejected_reason_names_the_field(raw, field, task):
    raw.send(submit([task], b""))
    command, header = raw.recv_broker()
    assert command == p.REJECTED
    [reason] = header["rejected"].values()
    assert_readable(reason, rf"^{field}: ")


@pytest.mark.parametrize("command", [p.HEARTBEAT, p.STARTED, p.DONE], ids=p.COMMAND_NAMES.get)
def test_worker_message_before_ready_is_unknown_worker(raw, command):
    raw.send(p.message(p.WORKER, command, {"id": "t", "state": p.SUCCESS}, b""))
    header = raw.expect_error(r"unknown worker")
    assert header["code"] == "unknown-worker"
    raw.expect_nothing()


def test_broker_keeps_serving_and_counts_malformed(raw, raw_factory, broker, app, start_worker):
    for _name, frames, pattern in MALFORMED:
        raw.send(frames)
        raw.expect_error(pattern)
    raw.send(submit([task_header("good"), task_header("bad", name=123)], b"", b""))
    assert {raw.recv_broker()[0] for _ in range(2)} == {p.ACCEPTED, p.REJECTED}
    stranger = raw_factory()  # a fresh identity that never said READY
    stranger.send(p.message(p.WORKER, p.HEARTBEAT, {}))
    assert stranger.expect_error(r"unknown worker")["code"] == "unknown-worker"

    # The same connection is still served normally.
    raw.send(p.message(p.CLIENT, p.HELLO, {"client": "raw-client"}))
    command, welcome = raw.recv_broker()
    assert command == p.WELCOME and welcome["pub"]

    start_worker()
    assert tasks.add.delay(2, 3).get(timeout=10) == 5

    counters = app.status()["counters"]
    assert counters["malformed"] == len(MALFORMED)
    assert counters["rejected"] == 1
    assert counters["unknown_worker"] == 1
    assert "handler_errors" not in counters
    wait_for(
        lambda: any("malformed message from" in line for line in broker.output),
        5,
        "the broker's warning",
    )


# ------------------------------------------------- worker messages with bad fields

#: A raw worker's READY: it takes the tasks these tests submit (routing is by name too).
READY = {"worker": "w-raw", "concurrency": 1, "queues": ["nowhere"], "tasks": ["tests.tasks.add"]}


def test_ready_with_non_list_tasks_gets_an_error(raw):
    raw.send(p.message(p.WORKER, p.READY, {**READY, "tasks": 5}))
    raw.expect_error(r"tasks", timeout_ms=1000)


def test_the_broker_echoes_a_workers_time_in_its_welcome_and_heartbeat_answers(raw):
    """The worker's lease: the broker answers READY and each HEARTBEAT with the time
    the worker sent it, whatever else that time is."""
    raw.send(p.message(p.WORKER, p.READY, {**READY, "t": 12.5}))
    command, welcome = raw.recv_broker()
    assert command == p.WELCOME and welcome["t"] == 12.5
    raw.send(p.message(p.WORKER, p.HEARTBEAT, {"t": 13.25}))
    assert raw.recv_broker() == (p.HEARTBEAT, {"t": 13.25})
    raw.send(p.message(p.WORKER, p.HEARTBEAT, {"t": "not a time"}))
    assert raw.recv_broker() == (p.HEARTBEAT, {})


def test_a_late_ready_from_a_workers_old_connection_changes_nothing(raw_factory, app):
    """After a partition heals TCP resends a dead connection's data late, while a new
    connection gets through at once: a worker's READY from its old connection can come
    after it registered on its new one. Taken for current, it handed the worker's
    tasks (and their keys) to others at once, while the worker ran them on."""
    old, new, client = raw_factory(), raw_factory(), raw_factory()
    old.send(p.message(p.WORKER, p.READY, {**READY, "t": 1.0}))
    assert old.recv_broker()[0] == p.WELCOME
    new.send(p.message(p.WORKER, p.READY, {**READY, "t": 2.0}))
    assert new.recv_broker()[0] == p.WELCOME
    client.send(submit([task_header("held")], p.encode([[1, 2], {}])))
    assert client.recv_broker()[0] == p.ACCEPTED
    assert new.recv()[1] == p.TASK
    old.send(p.message(p.WORKER, p.READY, {**READY, "t": 1.0}))  # the late one
    old.expect_nothing()  # no WELCOME, and not the task
    status = app.status()
    assert status["counters"]["stale_ready"] == 1
    assert [w["in_flight"] for w in status["workers"]] == [1]


def test_ready_with_unhashable_running_ids_gets_an_error(raw):
    raw.send(p.message(p.WORKER, p.READY, READY))
    assert raw.recv_broker()[0] == p.WELCOME
    raw.send(p.message(p.WORKER, p.READY, {**READY, "running": [["not", "an", "id"]]}))
    raw.expect_error(r"running", timeout_ms=1000)


def test_one_started_for_several_tasks_marks_each_and_a_mismatch_gets_an_error(raw, app):
    raw.send(p.message(p.WORKER, p.READY, {**READY, "concurrency": 2}))
    assert raw.recv_broker()[0] == p.WELCOME
    results = [tasks.add.apply_async(args=(i, 1), queue="nowhere") for i in range(2)]
    held: dict[str, int] = {}
    while len(held) < 2:
        _, command, header, _ = p.parse(raw.recv())
        for one in header.get("tasks", [header]) if command == p.TASK else []:
            held[one["id"]] = one["delivery"]
    assert [r.status for r in results] == [p.QUEUED, p.QUEUED]
    started = {"ids": list(held), "deliveries": list(held.values())}
    raw.send(p.message(p.WORKER, p.STARTED, started))
    wait_for(lambda: all(r.status == "STARTED" for r in results), 5, "both STARTED")
    raw.send(p.message(p.WORKER, p.STARTED, {"ids": list(held), "deliveries": [1]}))
    raw.expect_error(r"differ in length", timeout_ms=1000)


def test_fetch_with_nan_wait_gets_an_error(raw):
    raw.send(p.message(p.CLIENT, p.FETCH, {"ids": ["x"], "wait": float("nan")}))
    raw.expect_error(r"'wait' must be", timeout_ms=1000)


def test_ready_under_a_new_worker_id_replaces_the_old_one(raw):
    raw.send(p.message(p.WORKER, p.READY, {**READY, "worker": "w-a"}))
    assert raw.recv_broker()[0] == p.WELCOME
    raw.send(p.message(p.WORKER, p.READY, {**READY, "worker": "w-b"}))
    assert raw.recv_broker()[0] == p.WELCOME
    raw.send(submit([task_header("t1"), task_header("t2")], b"", b""))
    # This connection offered one slot, so it must get one TASK, not one per worker id.
    commands = [frames[1] for frames in raw.sync()]
    assert commands.count(p.TASK) == 1, [p.COMMAND_NAMES[c] for c in commands]


# ---------------------------------------------------------------- fuzzing

_FIELDS = ["client", "tasks", "ids", "wait", "req", "worker", "concurrency", "queues", "running"]
_FIELDS += ["id", "state", "name", "queue", "key", "ignore_result", "host", "pid"]
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["default", "w1", p.SUCCESS, p.FAILURE])
)
_values = st.recursive(
    _leaves,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
_maps = st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6)
_frame = st.binary(max_size=64) | _maps.map(p.pack_header)
_random_frames = st.lists(st.binary(max_size=64), max_size=5)
_tagged_frames = st.builds(
    lambda tag, command, rest: [tag, command, *rest],
    st.sampled_from(p.TAGS),
    st.sampled_from(sorted(p.COMMAND_NAMES)),
    st.lists(_frame, max_size=3),
)


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=_random_frames | _tagged_frames)
def test_random_frames_never_stop_the_broker(raw, probe, frames):
    if frames:  # a multipart message has at least one frame
        raw.send(frames)
    raw.sync()  # the broker handled it and still answers this connection
    # A peer that only ever says HELLO still gets a WELCOME.
    probe.send(p.message(p.CLIENT, p.HELLO, {"client": "probe"}))
    command, header = probe.recv_broker()
    assert command == p.WELCOME
    assert header["heartbeat"] > 0


def test_a_bad_entry_in_a_done_batch_costs_that_entry_only(raw, raw_factory):
    raw.send(p.message(p.WORKER, p.READY, READY))
    assert raw.recv_broker()[0] == p.WELCOME
    client = raw_factory()
    client.send(submit([task_header("batched")], p.encode([[1, 2], {}])))
    assert client.recv_broker()[0] == p.ACCEPTED
    frames = raw.recv()
    assert frames[1] == p.TASK
    delivery = p.unpack_header(frames[2])["delivery"]
    good = {"id": "batched", "state": p.SUCCESS, "delivery": delivery}
    batch = {"done": [good, "not a map", {"id": "x", "state": "MAYBE"}]}
    raw.send(p.message(p.WORKER, p.DONE, batch, p.encode(3), b"", b""))
    replies = [raw.recv_broker() for _ in range(3)]
    errors = [header for command, header in replies if command == p.ERROR]
    assert len(errors) == 2
    assert [header for command, header in replies if command == p.ACCEPTED] == [
        {"ids": ["batched"], "deliveries": [1]}
    ]
    client.send(p.message(p.CLIENT, p.FETCH, {"ids": ["batched"], "wait": 0}))
    frames = client.recv()
    assert p.unpack_header(frames[2])["state"] == p.SUCCESS and p.decode(frames[3]) == 3


def test_a_retry_the_broker_cannot_hold_fails_the_task_instead_of_leaving_it_held(
    raw, raw_factory, app
):
    raw.send(p.message(p.WORKER, p.READY, READY))
    assert raw.recv_broker()[0] == p.WELCOME
    client = raw_factory()
    client.send(submit([task_header("later", key="k")], p.encode([[1, 2], {}])))
    assert client.recv_broker()[0] == p.ACCEPTED
    frames = raw.recv()
    assert frames[1] == p.TASK
    delivery = p.unpack_header(frames[2])["delivery"]
    retry = {"id": "later", "state": p.RETRY, "delivery": delivery, "countdown": 1e12}
    raw.send(p.message(p.WORKER, p.DONE, retry, p.failure("Retry", "later")))
    assert raw.recv_broker() == (p.ACCEPTED, {"ids": ["later"], "deliveries": [delivery]})
    client.send(p.message(p.CLIENT, p.FETCH, {"ids": ["later"], "wait": 0}))
    frames = client.recv()
    assert p.unpack_header(frames[2])["state"] == p.FAILURE
    error = p.decode(frames[3])
    assert error["type"] == "zq.ProtocolError"
    assert_readable(error["message"], r"retried after 1000000000000.0 seconds.*0 to 604800")
    assert app.status()["counters"]["malformed"] == 1
    # The key is free: its next task goes to the worker.
    client.send(submit([task_header("next", key="k")], p.encode([[1, 2], {}])))
    assert raw.recv()[1] == p.TASK


def test_a_done_batch_must_match_its_frames(raw):
    raw.send(p.message(p.WORKER, p.READY, READY))
    assert raw.recv_broker()[0] == p.WELCOME
    raw.send(p.message(p.WORKER, p.DONE, {"done": [{"id": "a", "state": p.SUCCESS}]}))
    raw.expect_error(r"one header per payload frame", timeout_ms=1000)


def test_ready_with_too_many_slots_gets_an_error(raw):
    raw.send(p.message(p.WORKER, p.READY, {**READY, "concurrency": p.MAX_CONCURRENCY + 1}))
    raw.expect_error(r"concurrency", timeout_ms=1000)


def test_a_merged_task_batch_stays_under_the_header_limit(raw, raw_factory):
    """Thousands of tasks with long ids and keys for one worker in one broker turn go
    as several TASK messages, each with a header the worker can take."""
    one = len(p.pack_header(task_header("0" * 64, key="0" * 256)))
    count = (p.MAX_HEADER_BYTES - 2048) // one  # the SUBMIT fits; with what the broker
    # adds to each task (client id, delivery), the TASKs for them cannot all fit in one
    raw.send(p.message(p.WORKER, p.READY, {**READY, "concurrency": p.MAX_CONCURRENCY}))
    assert raw.recv_broker()[0] == p.WELCOME
    client = raw_factory()
    headers = [task_header(f"{i:064d}", key=f"{i:0256d}") for i in range(count)]
    client.send(submit(headers, *[b"\x92\x90\x80"] * count))
    assert client.recv_broker(timeout_ms=10_000)[0] == p.ACCEPTED
    received, messages = 0, 0
    while received < count:
        frames = raw.recv(timeout_ms=10_000)
        assert frames[1] == p.TASK
        assert len(frames[2]) <= p.MAX_HEADER_BYTES
        header = p.unpack_header(frames[2])
        received += len(header.get("tasks", [header]))
        messages += 1
    assert received == count and messages >= 2


def test_submit_with_an_overlong_client_id_gets_an_error(raw):
    """The client id is copied into every task header: it must stay short."""
    raw.send(submit([task_header("t")], b"\x92\x90\x80", client="c" * (p.MAX_ID_LEN + 1)))
    raw.expect_error(r"client", timeout_ms=1000)
