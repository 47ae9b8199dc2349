"""Pure state: what one broker loop turn sends, and who listens on the XPUB.

The broker's handlers and core never touch a socket: they put messages here, and the
shell (:mod:`zq.broker`) takes a turn's worth with :meth:`Outbox.take` once the
journal commit that holds them is on disk, and sends them. Consecutive TASKs to one
worker, and one turn's results for one client, are batched into one message each.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from zq import protocol as p

log = logging.getLogger("zq.broker")

#: Most XPUB topics the broker follows (to publish a subscribed task's result alone).
MAX_SUBSCRIPTIONS = 100_000

#: A loop turn's messages: acknowledgements per worker, ROUTER messages, XPUB messages.
Outgoing = tuple[dict[bytes, list[tuple[str, int | None]]], list[list[Any]], list[list[Any]]]


class Batch:
    """A message in a send buffer that later items may join (a worker's TASKs, a
    client's results): it stands in the message's header frame and holds the items'
    packed headers, made one header at the flush; their payload frames are appended
    to the message. Kept under the header limit (libzmq limits each frame) and, if
    given one, under half the message size limit for its payloads."""

    __slots__ = ("frames", "header_bytes", "headers", "payload_bytes", "topic")

    def __init__(
        self, frames: list[Any], head: bytes, payload_bytes: int = 0, topic: bytes = b""
    ) -> None:
        self.frames = frames  # the message it heads: [..., command, self, payloads...]
        self.headers = [head]
        self.header_bytes = len(head)
        self.payload_bytes = payload_bytes
        self.topic = topic  # for a RESULTS of one result: that task's own topic

    def fits(self, head: bytes, payload_bytes: int = 0, max_message: int = 0) -> bool:
        if self.header_bytes + len(head) > p.MAX_HEADER_BYTES - p.HEADER_SLACK:
            return False
        return not max_message or self.payload_bytes + payload_bytes <= max_message // 2

    def add(self, head: bytes, payload_bytes: int, *payload: Any) -> None:
        self.headers.append(head)
        self.header_bytes += len(head)
        self.payload_bytes += payload_bytes
        self.frames += payload

    def header(self, key: str) -> bytes:
        """The message's header: the one item's own, or ``{key: [...]}``."""
        return self.headers[0] if len(self.headers) == 1 else p.pack_list(key, self.headers)


class Subscriptions:
    """The topics someone listens to on the XPUB (it passes a topic's first
    subscription and its last unsubscription)."""

    __slots__ = ("_lengths", "_topics", "untracked")

    def __init__(self) -> None:
        self._topics: set[bytes] = set()
        self._lengths: Counter[int] = Counter()  # of the subscribed topics
        #: More topics than MAX_SUBSCRIPTIONS were subscribed: which are is unknown
        #: from then on, so every result goes alone under its own topic.
        self.untracked = False

    def __contains__(self, topic: bytes) -> bool:
        return topic in self._topics

    def update(self, message: bytes) -> None:
        """One XPUB (un)subscription message: ``\\x01`` or ``\\x00``, then the topic."""
        topic = message[1:]
        if message[:1] == b"\x01" and topic not in self._topics:
            if len(self._topics) >= MAX_SUBSCRIPTIONS:
                if not self.untracked:
                    log.warning(
                        "over %d topics subscribed on the XPUB: results are no longer "
                        "batched per client",
                        MAX_SUBSCRIPTIONS,
                    )
                self.untracked = True
                return
            self._topics.add(topic)
            self._lengths[len(topic)] += 1
        elif message[:1] == b"\x00" and topic in self._topics:
            self._topics.discard(topic)
            self._lengths[len(topic)] -= 1
            if not self._lengths[len(topic)]:
                del self._lengths[len(topic)]

    def followed(self, client: bytes, topic: bytes) -> bool:
        """True if a subscription longer than the client's id (one task's topic, or a
        prefix of task ids) matches ``topic``: a result a client-wide batch would miss.
        A set lookup per distinct subscription length, so usually none."""
        if self.untracked:
            return True
        for length in self._lengths:  # a loop, not any(): this runs per result
            if len(client) < length <= len(topic) and topic[:length] in self._topics:
                return True
        return False


class Outbox:
    """One loop turn's messages, batched as they are added."""

    __slots__ = ("_acks", "_out", "_pub", "_result_batches", "max_message_size", "subscriptions")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self.subscriptions = Subscriptions()
        self._out: list[list[Any]] = []  # this turn's ROUTER messages
        self._pub: list[list[Any]] = []  # this turn's XPUB messages
        #: worker -> the (task id, delivery) of each DONE to acknowledge this turn
        self._acks: dict[bytes, list[tuple[str, int | None]]] = {}
        self._result_batches: dict[bytes, Batch] = {}  # client topic -> its open RESULTS

    def take(self) -> Outgoing:
        """This turn's messages; the outbox starts empty again."""
        outgoing = (self._acks, self._out, self._pub)
        self._acks, self._out, self._pub = {}, [], []
        self._result_batches.clear()  # they are in this turn's messages
        return outgoing

    def send(self, ident: bytes, command: bytes, header: dict[str, Any], *payload: Any) -> None:
        """A message to one peer on the ROUTER."""
        self._out.append([ident, p.BROKER, command, p.pack_header(header), *payload])

    def forward(self, ident: bytes, command: bytes, header: Any, *payload: Any) -> None:
        """Send a header frame as stored (e.g. a worker's DONE header)."""
        self._out.append([ident, p.BROKER, command, header, *payload])

    def ack(self, ident: bytes, task_id: str, delivery: int | None) -> None:
        """Acknowledge a worker's DONE (sent before the turn's TASKs)."""
        self._acks.setdefault(ident, []).append((task_id, delivery))

    def task(self, ident: bytes, header: bytes, body: Any, inputs: Any) -> None:
        """Queue a TASK; consecutive TASKs to one worker go as one message, its payloads
        under half the message size limit and its header under the header limit
        (libzmq's limit is per frame: the header is the frame a batch grows)."""
        size = len(body) + sum(len(frame) for frame in inputs)
        last = self._out[-1] if self._out else None
        batch = last[3] if last is not None and last[0] == ident else None
        if type(batch) is Batch and batch.fits(header, size, self.max_message_size):
            batch.add(header, size, body, *inputs)
        else:
            frames = [ident, p.BROKER, p.TASK, None, body, *inputs]
            frames[3] = Batch(frames, header, size)
            self._out.append(frames)

    def publish(self, topic: bytes, command: bytes, header: Any, *payload: Any) -> None:
        """A message on the XPUB. A client sees its messages in order: results after
        this one start a new batch."""
        self._result_batches.clear()
        self._pub.append([topic, command, header, *payload])

    def result(self, client: str, task_id: str, head: bytes, body: Any) -> None:
        """Queue a final result for the XPUB. A loop turn's results for one client go as
        one RESULTS message under the client's id (its header under the header limit:
        libzmq limits each frame); a result that a subscription longer than the client
        id matches (one task's topic, client id + task id, or a prefix of it) goes
        alone under its own topic, as does a batch of one."""
        key = client.encode()
        topic = key + task_id.encode()
        if self.subscriptions.followed(key, topic):
            self.publish(topic, p.RESULT, head, body)
            return
        batch = self._result_batches.get(key)
        if batch is not None and batch.fits(head):
            batch.add(head, 0, body)
            return
        frames: list[Any] = [key, p.RESULTS, None, body]
        frames[2] = self._result_batches[key] = Batch(frames, head, topic=topic)
        self._pub.append(frames)


def finish_pub(frames: list[Any]) -> list[Any]:
    """An XPUB message ready to send: a batch becomes its header frame, and a RESULTS
    of one result goes as that result, on the task's own topic."""
    batch = frames[2]
    if type(batch) is Batch:
        if len(batch.headers) == 1:
            frames[0:2] = [batch.topic, p.RESULT]
        frames[2] = batch.header("results")
    return frames


def finish_out(frames: list[Any]) -> list[Any]:
    """A ROUTER message ready to send: a TASK batch becomes its header frame."""
    batch = frames[3]
    if type(batch) is Batch:
        frames[3] = batch.header("tasks")
    return frames
