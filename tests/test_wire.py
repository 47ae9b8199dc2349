"""zq.wire: multipart messages sent and received frame by frame, as pyzmq would."""

from __future__ import annotations

import pytest
import zmq

from zq import wire

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock in (a, b):
        sock.linger = 0
        sock.rcvtimeo = 2000
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close()
    b.close()
    ctx.term()


def test_frames_arrive_as_sent(pair):
    a, b = pair
    big = bytes(range(256)) * 1000  # above pyzmq's copy threshold: sent zero-copy
    wire.send(a, [b"ZQ1C", b"\x02", b"", big, zmq.Frame(b"frame")])
    wire.send(a, [b"one"])
    got = wire.recv(b)
    assert [f.bytes for f in got] == [b"ZQ1C", b"\x02", b"", big, b"frame"]
    assert wire.recv_bytes(b) == [b"one"]


def test_a_bad_frame_ends_its_message_and_the_next_is_intact(pair):
    a, b = pair
    with pytest.raises(TypeError):
        wire.send(a, [b"first", b"second", "not bytes", b"fourth"])
    wire.send(a, [b"next", b"message"])
    # The broken message arrives cut short by an empty frame (a receiver rejects it
    # as malformed); the one after it is whole and does not absorb its frames.
    assert wire.recv_bytes(b) == [b"first", b"second", b""]
    assert wire.recv_bytes(b) == [b"next", b"message"]


def test_noblock_on_a_full_queue_raises_again_and_sends_nothing():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # never connected: no pipe, so nothing can be queued
    sock.linger = 0
    try:
        with pytest.raises(zmq.Again):
            wire.send(sock, [b"a", b"b"], zmq.NOBLOCK)
        with pytest.raises(zmq.Again):
            wire.recv(sock, zmq.NOBLOCK)
    finally:
        sock.close()
        ctx.term()
