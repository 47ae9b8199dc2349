"""The pools' pure parts, without sockets or processes: the events a pool reports,
running one task, and the messages between the process pool and its children
(their encoding and framing), exhaustively where it pays."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import zq
from zq import poolwire as w
from zq import protocol as p
from zq.errors import Retry
from zq.pool import Done, Progress, Started, execute, fenced, returned, revoked, unknown

app = zq.App("pure-pool-tests")


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="boom")
def boom() -> None:
    raise KeyError("nope")


@app.task(name="again", retries=2, retry_delay=5.0)
def again() -> None:
    raise Retry()


def _header(name: str, **fields: object) -> dict:
    return {"id": "t1", "name": name, "queue": "default", **fields}


# ------------------------------------------------------------------ pool events


def test_events_are_the_tuples_they_were_with_names():
    done = Done("t1", p.SUCCESS, b"\x03", 0.5, {"x": 1})
    assert done == ("done", "t1", p.SUCCESS, b"\x03", 0.5, {"x": 1})
    assert (done.task_id, done.state, done.body, done.runtime, done.extras) == done[1:]
    assert Started("t1") == ("started", "t1") and Started("t1").kind == "started"
    assert Progress("t1", {"done": 1}) == ("progress", "t1", {"done": 1})
    assert done._replace(state=p.FAILURE).kind == "done"


def test_the_events_of_tasks_a_pool_ends_unrun():
    stopped = fenced("t1", 2.0)
    assert (stopped.state, stopped.runtime, stopped.extras) == (p.LOST, 2.0, {"fenced": True})
    assert p.decode(stopped.body)["type"] == "zq.Fenced"
    assert returned("t1") == Done("t1", p.LOST, b"", None, {"returned": True})
    gone = revoked("t1", "revoked before it started")
    assert gone.state == p.REVOKED and p.decode(gone.body)["type"] == "zq.Revoked"
    lost = unknown(app, "t1", "nope")
    assert lost.state == p.LOST and lost.runtime is None and lost.extras == {"unknown": True}
    assert "3 task(s): add, again, boom" in p.decode(lost.body)["message"]


# --------------------------------------------------------------- running a task


def test_execute_runs_a_task_and_encodes_what_it_returns():
    assert execute(app, _header("add"), p.encode([[2, 3], {}])) == (p.SUCCESS, p.encode(5), {})


def test_execute_reports_a_failure_with_its_type_and_traceback():
    state, body, extras = execute(app, _header("boom"), p.encode([[], {}]))
    info = p.decode(body)
    assert (state, extras, info["type"]) == (p.FAILURE, {}, "KeyError")
    assert "raise KeyError" in info["traceback"]


def test_execute_asks_for_a_retry_while_retries_are_left():
    assert execute(app, _header("again"), p.encode([[], {}]))[::2] == (
        p.RETRY,
        {"countdown": 5.0},
    )
    state, body, _ = execute(app, _header("again", retries=2), p.encode([[], {}]))
    assert state == p.FAILURE and "gave up after 2 retries" in p.decode(body)["message"]


def test_execute_hands_back_a_task_the_app_does_not_have():
    state, _, extras = execute(app, _header("other"), p.encode([[], {}]))
    assert (state, extras) == (p.LOST, {"unknown": True})


# ------------------------------------------------------ supervisor <-> child


def _through_the_socket(message: w.ToChild | w.FromChild) -> bytes:
    """A message as the other side's framer takes it out of the socket."""
    framer = w.Framer()
    framer.add(b"".join(w.frame(w.encode(message))))
    [data] = framer.messages
    return bytes(data)


def test_each_message_to_a_child_comes_out_as_it_went_in():
    run = w.Run([w.Given(1, _header("add"), b"\x92\x92\x01\x02\x80"), w.Given(2, {}, b"")])
    assert w.to_child(_through_the_socket(run)) == run
    assert isinstance(w.to_child(_through_the_socket(run)).tasks[0], w.Given)
    cancel = w.Cancel([3, 4])
    assert w.to_child(_through_the_socket(cancel)) == cancel


def test_each_message_from_a_child_comes_out_as_it_went_in():
    done = Done("t1", p.SUCCESS, b"\x05", 0.25, {})
    for message in (
        w.Ready(),
        w.Skipped(7),
        Progress("t1", {"done": 1, "total": 2, "note": None}),
        w.Ended(done, False),
        w.Ended(fenced("t1", None), True),
    ):
        decoded = w.from_child(_through_the_socket(message))
        assert decoded == message and type(decoded) is type(message)
    assert type(w.from_child(_through_the_socket(w.Ended(done, True))).done) is Done


@pytest.mark.parametrize(
    "wrong, decode", [(w.Ready(), w.to_child), (w.Cancel([1]), w.from_child)], ids=["in", "out"]
)
def test_a_message_of_another_kind_is_refused(wrong, decode):
    with pytest.raises(ValueError, match="not a message"):
        decode(_through_the_socket(wrong))


def test_a_small_message_is_one_write_and_a_large_one_two():
    assert len(w.frame(b"x" * 16384)) == 1
    head, body = w.frame(b"x" * 16385)
    assert head == struct.pack("!i", 16385) and len(body) == 16385


def test_the_framer_reads_the_long_length_of_a_message_of_2_gib_and_more():
    framer = w.Framer()
    for part in (struct.pack("!i", -1), struct.pack("!Q", 5)[:3], struct.pack("!Q", 5)[3:]):
        framer.add(part)
        assert not framer.messages
    framer.add(b"hello" + struct.pack("!i", 0))
    assert [bytes(m) for m in framer.messages] == [b"hello", b""]


@given(
    messages=st.lists(st.binary(max_size=40_000), max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_the_framer_gives_back_every_message_however_the_bytes_are_split(messages, cuts):
    stream = b"".join(b"".join(w.frame(message)) for message in messages)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    framer = w.Framer()
    for start, end in itertools.pairwise(points):
        framer.add(stream[start:end])
    assert [bytes(m) for m in framer.messages] == messages
