"""The process pool's messages between the supervisor and a child: typed values,
their encoding, and their framing on the socket pair between the two.

Supervisor to child: :class:`Run` (tasks to run in order: several short ones go in
one write) and :class:`Cancel` (do not start these). Child to supervisor:
:class:`Ready` once it has loaded the app, the pool events
:class:`~zq.pool.Progress` and, in :class:`Ended`, :class:`~zq.pool.Done`, and
:class:`Skipped` for a cancelled task it did not start. Each goes as a msgpack array
(never pickle) whose first item names its kind; the framing is
multiprocessing.Connection's: a length, then the message. No sockets are made here.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import Any, NamedTuple

from zq import protocol as p
from zq.pool import DONE, PROGRESS, Done, Progress

#: Bytes read from a supervisor-child socket at a time.
READ_SIZE = 1 << 16
#: The framing: a length, then the message (2 GiB and more: -1, then a 64-bit length).
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
#: Messages up to this many bytes go in one write with their length.
ONE_WRITE = 16384

# The kinds of message, each one's first item (besides the pool events' own).
RUN = "run"
CANCEL = "cancel"
READY = "ready"
SKIPPED = "skipped"


class Given(NamedTuple):
    """A task given to a child: its number there (counted per child), header, payload."""

    seq: int
    header: dict[str, Any]
    payload: bytes


class Run(NamedTuple):
    """Run these, in order, after what the child holds already."""

    tasks: list[Given]


class Cancel(NamedTuple):
    """Do not start the tasks of these numbers (a number the child has passed stays)."""

    seqs: list[int]


class Ready(NamedTuple):
    """The child has loaded the app: it reads its socket from now on."""


class Skipped(NamedTuple):
    """The child did not start task number ``seq``: it was cancelled."""

    seq: int


class Ended(NamedTuple):
    """A task ended in the child; ``retiring``: the child exits after it (recycled),
    so what the supervisor queued there must come back."""

    done: Done
    retiring: bool


ToChild = Run | Cancel
FromChild = Ready | Progress | Ended | Skipped


def encode(message: ToChild | FromChild) -> bytes:
    """A message as it goes on the socket (before its frame)."""
    kind = type(message)
    if kind is Ended:
        return p.encode([*message.done, message.retiring])  # type: ignore[union-attr]
    if kind is Progress:
        return p.encode(message)  # (its kind is its first field)
    return p.encode([_KINDS[kind], *message])


def to_child(data: bytes | memoryview) -> ToChild:
    """The message a child read (ValueError for one of another kind)."""
    message = p.decode(data)
    kind = message[0]
    if kind == RUN:
        return Run([Given._make(item) for item in message[1]])
    if kind == CANCEL:
        return Cancel(message[1])
    raise ValueError(f"not a message to a pool child: {kind!r}")


def from_child(data: bytes | memoryview) -> FromChild:
    """The message the supervisor read from a child (ValueError for another kind)."""
    message = p.decode(data)
    kind = message[0]
    if kind == DONE:
        return Ended(Done._make(message[:6]), message[6])
    if kind == PROGRESS:
        return Progress._make(message)
    if kind == SKIPPED:
        return Skipped(message[1])
    if kind == READY:
        return Ready()
    raise ValueError(f"not a message from a pool child: {kind!r}")


_KINDS: dict[type, str] = {Run: RUN, Cancel: CANCEL, Ready: READY, Skipped: SKIPPED}


class Framer:
    """Whole messages out of the bytes read from a supervisor-child socket, in
    :attr:`messages`; a large one comes in many reads and is joined once."""

    __slots__ = ("_chunks", "_held", "_need", "messages")

    def __init__(self) -> None:
        self.messages: deque[memoryview] = deque()
        self._chunks: list[bytes] = []  # read, not yet a whole message
        self._held = 0  # their bytes
        self._need = 1  # bytes the next message needs, once its length is in

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held < self._need:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        at, end, self._need = 0, len(data), 1
        while end - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(data, at)
            start = at + _LENGTH.size
            if size == -1:
                if end - start < _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(data, start)
                start += _LONG_LENGTH.size
            if end - start < size:
                self._need = start + size - at
                break
            self.messages.append(memoryview(data)[start : start + size])
            at = start + size
        self._chunks = [data[at:]] if at < end else []
        self._held = end - at


def frame(message: bytes) -> list[bytes]:
    """The writes that send one message, framed for a :class:`Framer`: one for a
    small message (a copy costs less than a system call), else its head, then it."""
    size = len(message)
    head = _LENGTH.pack(size) if size < 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    return [head + message] if size <= ONE_WRITE else [head, message]


def send(sock: socket.socket, message: ToChild | FromChild) -> None:
    """Send one message over a supervisor-child socket (blocking while the other
    side's socket buffer is full)."""
    data = encode(message)
    if len(data) <= ONE_WRITE:  # (most messages: one write, without frame()'s list)
        sock.sendall(_LENGTH.pack(len(data)) + data)
        return
    for part in frame(data):
        sock.sendall(part)


def read_now(sock: socket.socket, framer: Framer) -> bool:
    """Read all a supervisor-child socket holds into ``framer``, without waiting;
    whether the other side has closed it."""
    while True:
        try:
            data = sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:  # reset
            return True
        if not data:
            return True
        framer.add(data)
        if len(data) < READ_SIZE:
            return False
