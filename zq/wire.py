"""Multipart send and receive for zq's sockets, without pyzmq's per-frame overhead.

pyzmq's ``send_multipart`` combines its flags as ``zmq.Flag`` enums for every frame,
and ``recv_multipart`` asks ``getsockopt(RCVMORE)`` after each frame. On this project's
2-core test machine those took about half of a small message's cost: four frames sent
in 1.5 us instead of 5.5, received in 2.4 us instead of 6.1 (zero-copy frames). These
two functions do the same as those, in fewer Python calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _Backend

_send = _Backend.send
_recv = _Backend.recv
_SNDMORE = int(zmq.SNDMORE)


def send(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` (bytes or ``zmq.Frame``) as one message, zero-copy for large
    frames (pyzmq copies those under its copy threshold anyway).

    With ``zmq.NOBLOCK``, ``zmq.Again`` comes from the first frame or not at all: libzmq
    queues a message's frames until its last one."""
    last = len(frames) - 1
    more = flags | _SNDMORE
    sent = 0
    try:
        while sent < last:
            _send(sock, frames[sent], more, False)
            sent += 1
        _send(sock, frames[last], flags, False)
    except BaseException:
        if sent:  # end the message begun (e.g. at a frame that is not a buffer) with an
            # empty frame, so that the next message does not join it; the peer gets it
            # short of its later frames, which the protocol's parsers reject or ignore
            _send(sock, b"", flags, False)
        raise


def recv(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """Receive one message as zero-copy frames (``.bytes`` copies one out)."""
    frame = _recv(sock, flags, False)
    frames = [frame]
    while frame.more:
        frame = _recv(sock, flags, False)
        frames.append(frame)
    return frames


def recv_bytes(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive one message as bytes, a copy of each frame."""
    return [frame.bytes for frame in recv(sock, flags)]
