"""The broker's worker registry (zq.workers), without sockets."""

from __future__ import annotations

from zq.workers import Peer, Workers


def peer(ident: bytes, wid: bytes, now: float = 0.0, sent: float | None = None) -> Peer:
    p = Peer(ident, wid, {"worker": wid.decode()}, now, slots=2)
    p.ready_sent = sent
    return p


def test_a_worker_on_a_new_connection_replaces_its_old_one():
    workers = Workers()
    workers.register(peer(b"c1", b"w", sent=1.0))
    workers.register(peer(b"c2", b"w", sent=2.0))
    assert workers.get(b"c1") is None
    assert workers.find(b"w") is workers.get(b"c2")
    assert len(workers) == 1


def test_a_ready_from_an_earlier_connection_is_late_and_one_without_a_time_is_not():
    workers = Workers()
    workers.register(peer(b"c2", b"w", sent=2.0))
    assert workers.is_late(b"c1", b"w", 1.0)
    assert not workers.is_late(b"c1", b"w", 3.0)  # newer: a real reconnect
    assert not workers.is_late(b"c2", b"w", 1.0)  # the same connection
    assert not workers.is_late(b"c1", b"w", None)
    assert not workers.is_late(b"c1", b"other", 1.0)


def test_another_id_on_a_connection_is_named_to_be_dropped():
    workers = Workers()
    first = peer(b"c1", b"w1")
    workers.register(first)
    assert workers.other_on(b"c1", b"w2") is first
    assert workers.other_on(b"c1", b"w1") is None
    workers.remove(first)
    assert workers.find(b"w1") is None and workers.get(b"c1") is None


def test_silence_and_the_grace_for_workers_after_a_restart():
    workers = Workers()
    workers.register(peer(b"c1", b"w1", now=0.0))
    workers.register(peer(b"c2", b"w2", now=5.0))
    assert [p.wid for p in workers.silent(6.0, 3.0)] == [b"w1"]
    workers.expect({b"w3", b"w4"}, deadline=10.0)
    assert workers.expected() == 2
    workers.register(peer(b"c3", b"w3"))  # came back: no longer waited for
    assert workers.not_back(9.0) == []
    assert workers.not_back(10.0) == [b"w4"]
    assert workers.not_back(11.0) == [] and workers.expected() == 0


def test_capacity_is_slots_plus_prefetch_and_none_while_draining():
    p = peer(b"c", b"w")
    assert p.capacity(3) == 5
    assert p.capacity(None) == 2  # automatic: no run time known yet
    p.slots = 0
    assert p.capacity(3) == 0
