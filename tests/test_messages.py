"""The message schema (zq.messages): each command's header checked once, typed."""

from __future__ import annotations

import pytest

from zq import messages
from zq.errors import ProtocolError

READY = {"worker": "w1", "concurrency": 2, "queues": ["default"], "tasks": ["a.b"]}


def test_a_ready_becomes_a_typed_value_and_ids_alone_mean_any_delivery():
    ready = messages.ready({**READY, "running": ["t1"], "t": 2.5, "draining": True})
    assert ready.worker == "w1" and ready.names == ["a.b"] and ready.sent == 2.5
    assert ready.running == {"t1": None} and ready.draining and ready.periodic == []
    assert ready.info["tasks"] == 1 and ready.info["names"] == ["a.b"]
    with pytest.raises(AttributeError):
        ready.worker = "other"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("parse", "header", "reason"),
    [
        (messages.ready, {**READY, "concurrency": 0}, "concurrency"),
        (messages.ready, {**READY, "tasks": [1]}, "'tasks'"),
        (messages.ready, {**READY, "running": {"t": "x"}}, "'running'"),
        (messages.fetch, {"ids": ["a"], "wait": float("nan")}, "'wait'"),
        (messages.revoke, {"ids": "a"}, "REVOKE needs 'ids'"),
        (messages.periodic, {"remove": [3]}, "PERIODIC 'remove'"),
        (messages.dead_letters, {"requeue": None}, "DEAD_LETTERS 'requeue'"),
        (messages.started, {"ids": ["a"], "deliveries": [1, 2]}, "differ in length"),
        (messages.progress, {"id": "a", "progress": 5}, "PROGRESS needs"),
    ],
)
def test_a_bad_field_is_a_protocol_error_naming_it(parse, header, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse(header)


def test_submit_numbers_are_read_only_when_both_are_whole_numbers():
    assert messages.submit({"client": "c", "tasks": [], "n": 2, "since": 1}, []).n == 2
    unnumbered = messages.submit({"client": "c", "tasks": [], "n": 2, "since": "1"}, [])
    assert unnumbered.n is None and unnumbered.since is None
    with pytest.raises(ProtocolError, match="1 tasks but 0 payloads"):
        messages.submit({"client": "c", "tasks": [{}]}, [])


def test_done_is_one_entry_or_a_batch_that_matches_its_frames():
    assert messages.done_batch({"id": "a"}, [b"r"]) == [({"id": "a"}, b"r")]
    assert messages.done_batch({"done": [{"id": "a"}]}, [b"r"]) == [({"id": "a"}, b"r")]
    with pytest.raises(ProtocolError, match="one header per payload"):
        messages.done_batch({"done": [{"id": "a"}]}, [])
