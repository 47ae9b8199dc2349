"""The broker: one single-threaded poll loop over a ROUTER and an XPUB.

Clients and workers both connect to the ROUTER; the tag frame says which is which.
Results and events go out on the XPUB. Every scheduling decision is made by the pure
state in :mod:`zq.dispatch` and :mod:`zq.results`; this module only moves frames.

Thread ownership: both sockets belong to the thread running :meth:`Broker.run`.
:meth:`Broker.stop` may be called from any thread (it writes to a wake-up pipe).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import zmq

from zq import protocol as p
from zq import wire
from zq.dispatch import PREFETCH_MAX, Assignment, Dispatcher, RunTimes, Task
from zq.errors import ProtocolError
from zq.ids import new_id
from zq.journal import Journal, NullJournal, open_journal
from zq.results import ResultStore, Waiters
from zq.schedule import Entry, Schedule, first_fire, following
from zq.security import Authorizer, load_pair, serve_with
from zq.sequence import SubmitOrder
from zq.settings import setting
from zq.timers import TimerHeap
from zq.workflow import Graph, check_links

log = logging.getLogger("zq.broker")

#: A loop turn's messages: acknowledgements per worker, ROUTER messages, XPUB messages.
_Outgoing = tuple[dict[bytes, list[tuple[str, int | None]]], list[list[Any]], list[list[Any]]]

#: Most messages read from the ROUTER in one loop turn, so timers still run under load.
MAX_BATCH = 2000
#: Longest a FETCH may ask the broker to hold a wait for a result.
MAX_WAIT = 3600.0
#: Seconds between sweeps of expired FETCH waits.
PURGE_EVERY = 10.0
#: Payloads up to this many bytes are kept as bytes rather than zero-copy frames.
SMALL_PAYLOAD = 4096
#: Messages a peer may have queued towards the broker before its sends block.
ROUTER_RCVHWM = 1000
#: Seconds between checks of the authorized-keys directory for changes.
KEY_CHECK_EVERY = 1.0
#: Most task ids in one ACCEPTED to a worker (ids are at most 64 characters).
ACK_CHUNK = 5000
#: Seconds a worker lets prefetched tasks wait while none of its slots frees before it
#: hands them back (automatic prefetch): what a task misjudged as short can cost others.
GIVE_BACK_AFTER = 0.1
#: Most XPUB topics the broker follows (to publish a subscribed task's result alone).
MAX_SUBSCRIPTIONS = 100_000
#: How many keys ``STATUS`` lists at most.
STATUS_KEYS = 100

# What a timer in the broker's heap is for: (kind, task id).
_RETRY = "retry"  # a retry delay ran out: back to the head of the task's lane
_ETA = "eta"  # a scheduled task's time came: into its queue
_EXPIRE = "expire"  # a task not started by now ends EXPIRED
_PERIODIC = "periodic"  # (kind, schedule name): a periodic schedule may be due

#: The client id periodic tasks are sent under (results go to topics nobody reads).
PERIODIC_CLIENT = "zq-periodic"


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """How a broker binds and times out: each field's help is ``zq broker --help``'s."""

    bind: str = setting(
        "tcp://127.0.0.1:5555",  # this machine only; 0.0.0.0 must be asked for
        help="Address the broker's ROUTER binds; clients and workers connect here. The "
        "default takes connections from this machine only: tcp://0.0.0.0:5555 takes them "
        "from the network (plain and open without --curve-secret); tcp://127.0.0.1:* is a "
        "random loopback port.",
    )
    pub_bind: str | None = setting(
        None,
        help="Address the results/events XPUB binds.",
        shown="the --bind port + 1; peers learn it from the broker",
    )
    heartbeat: float = setting(
        1.0,
        help="Heartbeat period H in seconds: workers and clients send a heartbeat every H "
        "(workers every H/2) and the broker answers each one.",
    )
    liveness: int = setting(
        3,
        help="Missed heartbeats after which a worker is dead and its tasks requeued "
        "(at least 3: workers stop keyed tasks after 1.5).",
    )
    result_ttl: float = setting(24 * 3600.0, help="Seconds the broker keeps each result for FETCH.")
    prefetch: int | None = setting(
        None,  # automatic
        help="Tasks sent to a worker beyond its free slots. auto: enough to keep its slots "
        "busy for ~2 ms at the run time of its recent tasks (at most 1000; none for tasks "
        "longer than 2 ms per slot); 0: none ever wait in a worker while another could "
        "run them; N: always N (at most 1000).",
        shown="auto",
    )
    journal: str | None = setting(
        None,
        help="SQLite file that keeps accepted tasks and results across a crash; ':memory:' "
        "turns durability off.",
        shown="none, no journal",
    )
    max_redeliveries: int = setting(
        3, help="Times a task's worker may die running it before it is a dead letter."
    )
    reattach_grace: float | None = setting(
        None,
        help="Seconds to wait after a restart for a worker to re-attach the tasks it held "
        "before they are handed to others.",
        shown="twice the dead-after window",
    )
    curve_secret: str | None = setting(
        None,
        help="The broker's .key_secret file (zq keys generate): encrypt all traffic and "
        "accept only peers in --authorized-keys.",
        shown="plain and open",
    )
    authorized_keys: str | None = setting(
        None,
        help="Directory of the public .key files of the clients and workers allowed in; "
        "re-read when it changes or on SIGHUP.",
    )
    max_message_size: int = setting(
        p.DEFAULT_MAX_MESSAGE,
        help="Bytes in one message; a peer that sends more is disconnected, and clients "
        "and workers refuse to send more.",
    )
    max_queued: int = setting(
        1_000_000, help="Accepted, unfinished tasks in all; past it a submit is REJECTED."
    )
    max_queued_per_queue: int | None = setting(
        None,
        help="Tasks waiting in one queue; past it a submit to that queue is REJECTED.",
        shown="--max-queued",
    )
    max_results: int = setting(
        1_000_000, help="Results kept for FETCH; past it the oldest are dropped (and counted)."
    )

    def __post_init__(self) -> None:
        # What its workers and clients would refuse in its WELCOME.
        problem = p.settings_problem(self.heartbeat, self.liveness, self.max_message_size)
        if problem is not None:
            raise ValueError(problem)
        if self.prefetch is not None and not 0 <= self.prefetch <= PREFETCH_MAX:
            raise ValueError(f"prefetch must be 0..{PREFETCH_MAX}, got {self.prefetch}")
        if (self.curve_secret is None) != (self.authorized_keys is None):
            raise ValueError("CURVE needs both a secret key file and an authorized-keys directory")


def default_pub_bind(bind: str) -> str:
    """``tcp://host:5555`` -> ``tcp://host:5556``; a random port stays random."""
    if not bind.startswith("tcp://"):
        return bind + ".pub"
    host, _, port = bind[len("tcp://") :].rpartition(":")
    if port in ("*", "0", ""):
        return f"tcp://{host}:*"
    return f"tcp://{host}:{int(port) + 1}"


class _Peer:
    """A connected worker's identity and liveness, as the socket loop sees it."""

    __slots__ = ("ident", "info", "last_seen", "ready_sent", "runtimes", "slots", "wid")

    def __init__(
        self, ident: bytes, wid: bytes, info: dict[str, Any], now: float, slots: int
    ) -> None:
        self.ident = ident
        self.wid = wid
        self.info = info
        self.last_seen = now
        self.ready_sent: float | None = None  # its READY's "t" (the worker's clock)
        self.slots = slots  # its concurrency; 0 while it drains (it gets no more tasks)
        self.runtimes = RunTimes()  # for the automatic prefetch


class Broker:
    """A zq broker. ``bind()`` then ``run()``; or ``start()`` to run it on a thread."""

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self.settings = settings or BrokerSettings()
        self.instance = uuid.uuid4().hex[:16]
        self.dispatch = Dispatcher(max_redeliveries=self.settings.max_redeliveries)
        self.dead_letters: dict[str, Task] = {}
        self.scheduled: dict[str, Task] = {}  # accepted, waiting for their ETA
        self.graph = Graph()  # accepted, waiting for their parents (workflows)
        self.inputs: dict[str, list[Any]] = {}  # task id -> its parents' result bodies
        self.periodic: dict[str, Entry] = {}  # schedule name -> its state
        self._terminating: set[str] = set()  # running tasks revoked with terminate
        self.results = ResultStore(
            self.settings.result_ttl, self.settings.max_results, on_drop=self._result_dropped
        )
        self.waiters = Waiters()
        self.timers = TimerHeap()
        self.counters: Counter[str] = Counter()
        self.peers: dict[bytes, _Peer] = {}  # routing identity -> worker
        self.by_wid: dict[bytes, _Peer] = {}  # stable worker id -> worker
        self.endpoint = ""
        self.pub_endpoint = ""
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.XPUB)
        self._wake_r, wake = os.pipe()
        self._wake_w: int | None = wake
        self._running = False
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self.journal: Journal | NullJournal = NullJournal()
        self._out: list[list[Any]] = []  # this turn's ROUTER messages
        self._pub_out: list[list[Any]] = []  # this turn's XPUB messages
        #: (journal commits, turn's messages) waiting until that many commits are on disk
        self._held: deque[tuple[int, _Outgoing]] = deque()
        self._result_batches: dict[bytes, _Batch] = {}  # client topic -> its open RESULTS
        self._subscribed: set[bytes] = set()  # topics subscribed on the XPUB
        self._topic_lengths: Counter[int] = Counter()  # of the subscribed topics
        #: More topics than MAX_SUBSCRIPTIONS were subscribed: which are is unknown
        #: from then on, so every result goes alone under its own topic.
        self._untracked = False
        #: worker -> the (task id, delivery) of each DONE to acknowledge this turn
        self._acks: dict[bytes, list[tuple[str, int | None]]] = {}
        self._placeholders: dict[bytes, float] = {}  # worker id -> re-attach deadline
        self._unserved: set[tuple[str, str | None]] = set()  # (queue, name) logged unserved
        self._replaying = False
        self._order = SubmitOrder()  # each client's SUBMITs, taken in the order sent
        self.authorizer: Authorizer | None = None
        self._reload_keys = False
        self._next_key_check = 0.0
        self._next_purge = 0.0

    # -------------------------------------------------------------- lifecycle

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the actual (router, pub) endpoints."""
        s = self.settings
        for sock in (self._router, self._pub):
            sock.linger = 0
        # Bounded buffers: a flooding peer is slowed down by its own full pipe, and a
        # message over the size limit makes libzmq drop that peer's connection.
        self._router.rcvhwm = ROUTER_RCVHWM
        self._router.sndhwm = 100_000
        self._router.maxmsgsize = s.max_message_size
        self._pub.sndhwm = 100_000
        self._pub.maxmsgsize = 4096  # it only ever receives subscriptions
        if s.curve_secret is not None and s.authorized_keys is not None:
            self.authorizer = Authorizer(self._ctx, s.authorized_keys)
            keys = load_pair(s.curve_secret)
            for sock in (self._router, self._pub):
                serve_with(sock, keys)
        self._router.router_mandatory = False
        self._router.bind(self.settings.bind)
        self.endpoint = self._router.last_endpoint.decode()
        self._pub.bind(self.settings.pub_bind or default_pub_bind(self.settings.bind))
        self.pub_endpoint = self._pub.last_endpoint.decode()
        self.journal = open_journal(self.settings.journal)
        self._replay()
        self._bound.set()
        return self.endpoint, self.pub_endpoint

    def start(self) -> Broker:
        """Bind (unless :meth:`bind` ran already) and run the loop on a daemon thread
        (embedded mode)."""
        if not self._bound.is_set():
            self.bind()
        self._thread = threading.Thread(target=self.run, name="zq-broker", daemon=True)
        self._thread.start()
        return self

    def reload_keys(self) -> None:
        """Re-read the authorized keys at the next loop turn (safe from a signal handler)."""
        self._reload_keys = True
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end (from any thread) and wait for it when it runs on a thread."""
        self._running = False
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _wake(self) -> None:
        """Make the loop's poll return; nothing once the loop has ended (its pipe is
        closed, and the number may be another file's by now)."""
        wake = self._wake_w
        if wake is not None:
            os.write(wake, b"x")

    def run(self) -> None:
        """The loop: poll, route each message by command, then run the timers."""
        if not self._bound.is_set():
            self.bind()
        self._running = True
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pub, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        synced = self.journal.fileno()  # readable when commits have reached the disk
        if synced is not None:
            poller.register(synced, zmq.POLLIN)
        tick = self.settings.heartbeat / 4
        next_tick = time.monotonic()
        try:
            while self._running:
                wake = min(next_tick, self.timers.next_at() or next_tick)
                events = dict(poller.poll(max(0.0, wake - time.monotonic()) * 1000))
                if self._wake_r in events:  # read it, or every later poll returns at once
                    os.read(self._wake_r, 4096)
                if synced in events:  # first: the oldest replies go out first
                    self._release(self.journal.synced())
                if self._pub in events:  # first: a result of this turn sees a new follower
                    self._drain_pub()
                read = self._drain_router() if self._router in events else 0
                now = time.monotonic()
                if self.timers:
                    self._release_due(now)
                if now >= next_tick:
                    self._on_tick(now)
                    next_tick = now + tick
                self._flush(read)
        finally:
            self._close()

    def _flush(self, read: int) -> None:
        """Commit the turn's journal changes; send what the turn decided once that
        commit, and every one before it, is on disk (at once without a journal).
        ``read``: messages the turn read; after one or none the loop waits for the
        disk itself, else a thread does while the loop goes on."""
        outgoing = (self._acks, self._out, self._pub_out)
        self._acks, self._out, self._pub_out = {}, [], []
        self._result_batches.clear()  # they are in this turn's messages
        journal = self.journal
        if journal.commit() or self._held:  # in order: behind what waits for the disk
            if read <= 1 and not self._held and journal.sync_here():
                self._send_out(outgoing)
                return
            self._held.append((journal.committed, outgoing))
            journal.sync()
        else:
            self._send_out(outgoing)

    def _release(self, synced: int) -> None:
        """Send the held turns whose commits are now on disk, oldest first."""
        held = self._held
        while held and held[0][0] <= synced:
            self._send_out(held.popleft()[1])

    def _send_out(self, outgoing: _Outgoing) -> None:
        acks, out, pub_out = outgoing
        # Results first: a lone task's latency runs through them, and they go out on
        # the other socket, to other peers, so their order with the replies below is
        # nobody's to see.
        for frames in pub_out:
            batch = frames[2]
            if type(batch) is _Batch:
                if len(batch.headers) == 1:  # as a single result: on the task's topic
                    frames[0:2] = [batch.topic, p.RESULT]
                frames[2] = batch.header("results")
            wire.send(self._pub, frames)
        router = self._router
        # Acknowledgements first: a task a worker reported (e.g. LOST, or given back)
        # and is sent again in this turn must find its outbox entry gone, or the worker
        # would answer the new TASK with the old report.
        for ident, ids in acks.items():
            for at in range(0, len(ids), ACK_CHUNK):  # each header stays well under the cap
                chunk = ids[at : at + ACK_CHUNK]
                header = {"ids": [a[0] for a in chunk], "deliveries": [a[1] for a in chunk]}
                wire.send(router, [ident, p.BROKER, p.ACCEPTED, p.pack_header(header)])
        for frames in out:
            batch = frames[3]
            if type(batch) is _Batch:
                frames[3] = batch.header("tasks")
            wire.send(router, frames)

    def _close(self) -> None:
        try:  # what the last turns decided, once on disk
            self._release(self.journal.flush())
        except Exception:
            log.exception("the journal could not be put on disk: its last replies are not sent")
        try:
            self.journal.close()
        except Exception:
            log.exception("could not close the journal")
        if self.authorizer is not None:
            self.authorizer.stop()
        self._router.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()
        wake, self._wake_w = self._wake_w, None
        os.close(self._wake_r)
        if wake is not None:
            os.close(wake)

    # ---------------------------------------------------------------- routing

    def _drain_router(self) -> int:
        """Handle what the ROUTER has, up to MAX_BATCH messages; returns how many."""
        router = self._router
        for n in range(MAX_BATCH):
            try:
                frames = wire.recv(router, zmq.NOBLOCK)
            except zmq.Again:
                return n
            self._handle(frames)
        return MAX_BATCH

    def _drain_pub(self) -> None:
        """(Un)subscriptions: the XPUB passes a topic's first subscription and its last
        unsubscription, so the set follows which topics someone listens to."""
        for _ in range(MAX_BATCH):
            try:
                message = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counters["subscriptions"] += 1
            topic = message[1:]
            if message[:1] == b"\x01" and topic not in self._subscribed:
                if len(self._subscribed) >= MAX_SUBSCRIPTIONS:
                    if not self._untracked:
                        log.warning(
                            "over %d topics subscribed on the XPUB: results are no longer "
                            "batched per client",
                            MAX_SUBSCRIPTIONS,
                        )
                    self._untracked = True
                    continue
                self._subscribed.add(topic)
                self._topic_lengths[len(topic)] += 1
            elif message[:1] == b"\x00" and topic in self._subscribed:
                self._subscribed.discard(topic)
                self._topic_lengths[len(topic)] -= 1
                if not self._topic_lengths[len(topic)]:
                    del self._topic_lengths[len(topic)]

    def _followed(self, client: bytes, topic: bytes) -> bool:
        """True if a subscription longer than the client's id (one task's topic, or a
        prefix of task ids) matches ``topic``: a result a client-wide batch would miss.
        A set lookup per distinct subscription length, so usually none."""
        if self._untracked:
            return True
        for length in self._topic_lengths:  # a loop, not any(): this runs per result
            if len(client) < length <= len(topic) and topic[:length] in self._subscribed:
                return True
        return False

    def _handle(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        try:
            tag, command, header, payload = p.parse(frames[1:])
        except ProtocolError as exc:
            self._reject_malformed(ident, exc)
            return
        handler = self._HANDLERS.get((tag, command))
        if handler is None:
            self._reject_malformed(
                ident, ProtocolError(f"{p.COMMAND_NAMES[command]} not valid from {tag.decode()}")
            )
            return
        try:
            handler(self, ident, header, payload)
        except ProtocolError as exc:
            self._reject_malformed(ident, exc)
        except _Ignore:
            pass
        except Exception:  # a bug must cost one message, never the broker
            self.counters["handler_errors"] += 1
            log.exception("error handling %s from %s", p.COMMAND_NAMES[command], ident.hex())

    def _reject_malformed(self, ident: bytes, exc: ProtocolError) -> None:
        self.counters["malformed"] += 1
        log.warning("malformed message from %s: %s", ident.hex(), exc.reason)
        self._send(ident, p.ERROR, {"reason": exc.reason})

    def _send(self, ident: bytes, command: bytes, header: dict[str, Any], *payload: Any) -> None:
        self._out.append([ident, p.BROKER, command, p.pack_header(header), *payload])

    def _send_task(self, ident: bytes, header: bytes, body: Any, inputs: Any) -> None:
        """Queue a TASK; consecutive TASKs to one worker go as one message (see _flush),
        its payloads under half the message size limit and its header under the header
        limit (libzmq's limit is per frame: the header is the frame a batch grows)."""
        size = len(body) + sum(len(frame) for frame in inputs)
        last = self._out[-1] if self._out else None
        batch = last[3] if last is not None and last[0] == ident else None
        if type(batch) is _Batch and batch.fits(header, size, self.settings.max_message_size):
            batch.add(header, size, body, *inputs)
        else:
            frames = [ident, p.BROKER, p.TASK, None, body, *inputs]
            frames[3] = _Batch(frames, header, size)
            self._out.append(frames)

    def _forward(self, ident: bytes, command: bytes, header: Any, *payload: Any) -> None:
        """Send a header frame as stored (e.g. a worker's DONE header)."""
        self._out.append([ident, p.BROKER, command, header, *payload])

    def _publish(self, topic: bytes, command: bytes, header: Any, *payload: Any) -> None:
        self._result_batches.clear()  # a client sees its messages in order: results
        self._pub_out.append([topic, command, header, *payload])  # after this, batch anew

    def _publish_result(self, client: str, task_id: str, head: bytes, body: Any) -> None:
        """Queue a final result for the XPUB. A loop turn's results for one client go as
        one RESULTS message under the client's id (its header under the header limit:
        libzmq limits each frame); a result that a subscription longer than the client
        id matches (one task's topic, client id + task id, or a prefix of it) goes
        alone under its own topic, as does a batch of one."""
        key = client.encode()
        topic = key + task_id.encode()
        if self._followed(key, topic):
            self._publish(topic, p.RESULT, head, body)
            return
        batch = self._result_batches.get(key)
        if batch is not None and batch.fits(head):
            batch.add(head, 0, body)
            return
        frames: list[Any] = [key, p.RESULTS, None, body]
        frames[2] = self._result_batches[key] = _Batch(frames, head, topic=topic)
        self._pub_out.append(frames)

    # ---------------------------------------------------------------- clients

    def _on_hello(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self._send(ident, p.WELCOME, self._welcome())

    def _welcome(self) -> dict[str, Any]:
        return {
            "broker": self.instance,
            "pub": self.pub_endpoint,
            "heartbeat": self.settings.heartbeat,
            "liveness": self.settings.liveness,
            "max_message_size": self.settings.max_message_size,
            # Automatic prefetch only: a worker hands waiting tasks back after this
            # (with a fixed --prefetch it would be sent them again at once).
            "give_back": GIVE_BACK_AFTER if self.settings.prefetch is None else None,
        }

    def _on_submit(self, ident: bytes, header: dict[str, Any], payload: list[Any]) -> None:
        client = header.get("client")
        tasks = header.get("tasks")
        if (
            not isinstance(client, str)
            or not 0 < len(client) <= p.MAX_ID_LEN
            or not isinstance(tasks, list)
        ):
            # The client id goes into every task's header: a long one would multiply.
            raise ProtocolError(
                f"SUBMIT needs 'client' (string of 1..{p.MAX_ID_LEN}) and 'tasks' (list)"
            )
        if len(tasks) != len(payload):
            raise ProtocolError(f"SUBMIT has {len(tasks)} tasks but {len(payload)} payloads")
        if not self._in_order(ident, client, header):
            return
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        out: list[Assignment] = []
        for index, (task_header, body) in enumerate(zip(tasks, payload, strict=True)):
            reason = p.check_task_header(task_header) or check_links(task_header)
            if reason is None:
                unknown = [i for i in task_header.get("after") or () if not self._known(i)]
                if unknown:
                    reason = f"after: unknown task {unknown[0]!r}"
            if reason is not None:
                task_id = task_header.get("id") if isinstance(task_header, dict) else None
                if not isinstance(task_id, str) or not 0 < len(task_id) <= p.MAX_ID_LEN:
                    task_id = f"#{index}"  # no usable id: name it by its place in the batch
                rejected[task_id] = reason
                continue
            task_id = task_header["id"]
            if self._known(task_id):
                accepted.append(task_id)
                self.counters["duplicates"] += 1  # a resend: accepted once already
                continue
            full = self._full(task_header["queue"])
            if full is not None:
                rejected[task_id] = full
                continue
            accepted.append(task_id)
            task_header["client"] = client
            if len(body) <= SMALL_PAYLOAD:
                # A zero-copy frame would keep its share of libzmq's receive buffer
                # alive for as long as the task waits; a small payload is cheaper copied.
                body = body.bytes
            task = _task(task_id, task_header, body)
            if self.journal.durable:
                self.journal.task_accepted(task_id, p.pack_header(task_header), _bytes(body))
            self._enter(task, out)
        self._dispatched(out)  # before the ACCEPTED: a lone task's latency runs through it
        self.counters["accepted"] += len(accepted)
        if accepted:
            self._send(ident, p.ACCEPTED, {"ids": accepted})
        if rejected:
            self.counters["rejected"] += len(rejected)
            self._send(ident, p.REJECTED, {"rejected": rejected})

    def _in_order(self, ident: bytes, client: str, header: dict[str, Any]) -> bool:
        """True if this SUBMIT overtakes no older unacknowledged one of its client (see
        :mod:`zq.sequence`); else the client is asked to send those again, first."""
        n, since = header.get("n"), header.get("since")
        if type(n) is not int or type(since) is not int:
            return True  # a client that does not number its submits
        if self._order.take(client, n, since):
            return True
        self.counters["resend_asked"] += 1
        reason = "an older submit of this client is missing: send the unacknowledged ones again"
        self._send(ident, p.ERROR, {"reason": reason, "code": "resend", "n": n})
        return False

    def _known(self, task_id: str) -> bool:
        """True if the id was accepted already (a resent SUBMIT is a duplicate)."""
        return (
            self._unfinished_id(task_id) or task_id in self.results or task_id in self.dead_letters
        )

    def _unfinished(self) -> int:
        return len(self.dispatch.tasks) + len(self.scheduled) + len(self.graph)

    def _enter(self, task: Task, out: list[Assignment]) -> None:
        """An accepted task waits for its parents (``after``), or is admitted now."""
        after = task.data[0].get("after")
        if after is None:
            self._admit(task, out)
            return
        unfinished = []
        for parent in after:
            result = self.results.get(parent)
            if result is not None and result.state != p.SUCCESS:
                self._fail_dependent(task, parent, result.state, result.payload)
                return
            if result is None:
                if not self._unfinished_id(parent):
                    why = f"its parent task {parent} is not known (its result expired?)"
                    self._end_unrun(task, p.FAILURE, why)
                    return
                unfinished.append(parent)
        if unfinished:
            self.graph.add(task.id, task, unfinished)
        else:
            self._release_waiting(task, out)

    def _release_waiting(self, task: Task, out: list[Assignment]) -> None:
        """Every parent succeeded: take their results along, and admit the task."""
        header = task.data[0]
        args_from = header.get("args_from")
        if args_from is not None:
            bodies = []
            for parent in args_from:
                result = self.results.get(parent)
                if result is None:
                    why = f"the result of its parent task {parent} is no longer kept"
                    self._end_unrun(task, p.FAILURE, why)
                    return
                bodies.append(result.payload)
            self.inputs[task.id] = bodies
        countdown = header.get("countdown")
        if countdown is not None:  # a workflow step's countdown starts when it is released
            header["eta"] = time.time() + countdown
        self._admit(task, out)

    def _fail_dependent(self, task: Task, parent: str, state: str, body: Any) -> None:
        """A parent did not succeed: the task ends with the parent's outcome."""
        self._finish(task, state, self._caused(task, state, parent), body)

    def _caused(self, task: Task, state: str, parent: str) -> bytes:
        """The result header of a workflow step ended by its parent's outcome."""
        self.counters["workflow_cancelled"] += 1
        return p.pack_header({"id": task.id, "state": state, "cause": parent})

    def _admit(self, task: Task, out: list[Assignment]) -> None:
        """An accepted task goes to its queue, or waits for its ETA; one whose expiry
        time has passed ends EXPIRED at once."""
        header = task.data[0]
        now, wall = time.monotonic(), time.time()
        expires = header.get("expires")
        if expires is not None:
            if expires <= wall:
                self._end_unrun(task, p.EXPIRED, "expired before a worker started it")
                return
            self.timers.add(now + (expires - wall), (_EXPIRE, task.id))
        eta = header.get("eta")
        if eta is not None and eta > wall:
            self.scheduled[task.id] = task
            self.timers.add(now + (eta - wall), (_ETA, task.id))
            return
        out += self.dispatch.submit(task)
        self._check_served(task)

    def _end_unrun(self, task: Task, state: str, why: str) -> None:
        """Finish a task that no worker holds (expired, revoked, a workflow step that
        cannot get its inputs) without running it."""
        self.counters[state.lower()] += 1
        kind = _UNRUN_KINDS[state]
        body = p.failure(kind, f"task {task.id} {why}")
        self._finish(task, state, p.pack_header({"id": task.id, "state": state}), body)

    def _full(self, queue: str) -> str | None:
        """Why the broker cannot take one more task for ``queue`` now, or None."""
        s = self.settings
        unfinished = self._unfinished()
        if unfinished >= s.max_queued:
            return f"broker full: {unfinished} tasks unfinished (limit {s.max_queued})"
        limit = s.max_queued_per_queue or s.max_queued
        if self.dispatch.queued.get(queue, 0) >= limit:
            return f"queue {queue!r} full: {limit} tasks waiting"
        return None

    def _on_fetch(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        ids = header.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ProtocolError("FETCH needs 'ids' (list of strings)")
        wait = header.get("wait", 0)
        if not isinstance(wait, (int, float)) or not 0 <= wait < math.inf:  # also refuses NaN
            raise ProtocolError("FETCH 'wait' must be a number of seconds >= 0")
        deadline = time.monotonic() + min(float(wait), MAX_WAIT)
        for task_id in ids:
            result = self.results.get(task_id)
            if result is not None:
                self._forward(ident, p.RESULT, result.header, result.payload)
                continue
            if wait:
                self.waiters.add(task_id, ident, deadline)
                continue
            reply = {"id": task_id, "state": self._state_of(task_id)}
            task = self.dispatch.tasks.get(task_id)
            if task is not None and task.progress is not None:
                reply["progress"] = task.progress
            if task is not None and self._waits_unserved(task):
                # So a caller can say why it waits.
                reply["unserved"] = {"queue": task.queue, "name": task.name}
            self._send(ident, p.RESULT, reply)

    def _waits_unserved(self, task: Task) -> bool:
        """True if the task waits in a queue, for a name, that no connected worker takes."""
        return (
            task.worker is None
            and not task.retrying
            and not self.dispatch.serves(task.queue, task.name)
        )

    def _state_of(self, task_id: str) -> str:
        task = self.dispatch.tasks.get(task_id)
        if task is None and (task_id in self.scheduled or task_id in self.graph):
            return p.QUEUED
        if task is None:
            result = self.results.get(task_id)
            return result.state if result is not None else p.PENDING
        if task.retrying:
            return p.RETRY
        return p.STARTED_STATE if task.started else p.QUEUED

    def _on_revoke(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """Revoke tasks: a waiting one ends REVOKED at once; a running one is stopped
        only with ``terminate`` (its worker kills the process running it and reports
        REVOKED). The reply says what became of each id."""
        ids = header.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ProtocolError("REVOKE needs 'ids' (list of task ids)")
        terminate = header.get("terminate", False) is True
        reply: dict[str, list[str]] = {outcome: [] for outcome in p.REVOKE_OUTCOMES}
        out: list[Assignment] = []
        for task_id in ids:
            task = self.scheduled.pop(task_id, None) or self.graph.remove(task_id)
            if task is None:
                task, more = self.dispatch.cancel(task_id)
                out += more
            if task is not None:
                self._end_unrun(task, p.REVOKED, "was revoked before it ran")
                reply["revoked"].append(task_id)
                continue
            task = self.dispatch.tasks.get(task_id)
            if task is not None and task.worker is not None:
                if terminate:
                    # Remembered until it ends: a worker that re-attaches it, or one it
                    # is handed to, is told again (see _stop_if_terminating).
                    self._terminating.add(task_id)
                    self._stop_if_terminating(task)
                    reply["terminating"].append(task_id)
                else:
                    reply["running"].append(task_id)
            elif task_id in self.results:
                reply["finished"].append(task_id)
            else:
                reply["unknown"].append(task_id)
        self.counters["revoke_requests"] += 1
        self._send(ident, p.REVOKE, {**reply, "req": header.get("req")})
        self._dispatched(out)

    def _stop_if_terminating(self, task: Task) -> None:
        """Tell the worker holding ``task`` to stop it, if it was revoked with terminate
        (a placeholder worker is told when it comes back)."""
        if task.id in self._terminating and task.worker is not None:
            peer = self.by_wid.get(task.worker)
            if peer is not None:
                self._send(peer.ident, p.REVOKE, {"id": task.id, "delivery": task.delivery})

    def _on_status(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self._send(ident, p.STATUS, {**self.status(), "req": header.get("req")})

    def status(self) -> dict[str, Any]:
        """A snapshot for ``zq status``: workers, queue depths, keys in flight, counters."""
        now = time.monotonic()
        workers = []
        for peer in self.peers.values():
            state = self.dispatch.workers.get(peer.wid)
            workers.append(
                {
                    **peer.info,
                    "in_flight": len(state.running) if state else 0,
                    "seen_ago": round(now - peer.last_seen, 3),
                }
            )
        keys = list(itertools.islice(self.dispatch.keys_in_flight(), STATUS_KEYS))
        return {
            "broker": self.instance,
            "workers": workers,
            "queues": {q: n for q, n in self.dispatch.queued.items() if n},
            "keys_in_flight": sum(1 for _ in self.dispatch.keys_in_flight()),
            "keys": keys,
            "retrying": sum(1 for t in self.dispatch.tasks.values() if t.retrying),
            "scheduled": len(self.scheduled),
            "timers": len(self.timers),
            "results": len(self.results),
            "results_evicted": self.results.evicted,
            "security": "curve" if self.authorizer is not None else "plain",
            "dead": len(self.dead_letters),
            "unserved": [
                {"queue": queue, "name": name, "waiting": waiting}
                for queue, name, waiting in self.dispatch.unserved()
            ],
            "counters": dict(self.counters),
        }

    def _on_client_heartbeat(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self._send(ident, p.HEARTBEAT, {"broker": self.instance})

    def _on_client_disconnect(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        pass  # clients hold no broker state; their pending waits expire on their own

    # ---------------------------------------------------------------- workers

    def _on_ready(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        wid, concurrency = header.get("worker"), header.get("concurrency")
        queues, running = header.get("queues"), header.get("running", [])
        if (
            not isinstance(wid, str)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= p.MAX_CONCURRENCY
        ):
            raise ProtocolError(
                f"READY needs 'worker' (string) and 'concurrency' (int 1..{p.MAX_CONCURRENCY})"
            )
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            raise ProtocolError("READY needs 'queues' (list of strings)")
        if isinstance(running, list) and all(isinstance(t, str) for t in running):
            running = dict.fromkeys(running)  # ids without deliveries (any delivery)
        if not isinstance(running, dict) or not all(
            isinstance(t, str) and (d is None or isinstance(d, int)) for t, d in running.items()
        ):
            raise ProtocolError("READY 'running' must map task ids to delivery numbers")
        names = header.get("tasks", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProtocolError("READY 'tasks' must be a list of task names")
        if not isinstance(header.get("periodic", []), list):
            raise ProtocolError("READY 'periodic' must be a list of schedules")
        now = time.monotonic()
        wkey = wid.encode()
        sent = _sent_at(header)
        old = self.by_wid.get(wkey)
        if old is not None and old.ident != ident and _before(sent, old.ready_sent):
            # From the worker's previous connection, delivered late (after a partition
            # heals TCP resends a dead connection's data on its backed-off timer, while
            # a new connection gets through at once). Taken for current, it would drop
            # the live registration and hand the tasks it runs, and their keys, to
            # other workers at once.
            self.counters["stale_ready"] += 1
            log.info("ignored a late READY from an earlier connection of worker %s", wid)
            return
        same_conn = self.peers.get(ident)
        if same_conn is not None and same_conn.wid != wkey:
            self._drop_worker(same_conn, "re-registered under another id")
        if old is not None and old.ident != ident:
            del self.peers[old.ident]  # the same worker on a new connection
        info = {k: header.get(k) for k in ("worker", "host", "pid", "concurrency", "queues")}
        info["tasks"] = len(names)
        info["names"] = names
        # A draining worker (stopping gracefully) keeps its tasks but gets no more.
        slots = 0 if header.get("draining") else concurrency
        peer = self.peers[ident] = self.by_wid[wkey] = _Peer(ident, wkey, info, now, slots)
        peer.ready_sent = sent
        welcome = self._welcome()
        if sent is not None:  # the worker's lease starts at its READY
            welcome["t"] = sent
        self._send(ident, p.WELCOME, welcome)
        log.info(
            "worker %s %s (%s pid %s, %d slots, queues %s)",
            wid,
            "stopping: no new tasks" if header.get("draining") else "online",
            info["host"],
            info["pid"],
            concurrency,
            ",".join(queues),
        )
        self._event(b"worker.online", info)
        capacity = self._capacity(peer)
        self._dispatched(self.dispatch.add_worker(wkey, queues, capacity, running, names))
        self._unserved.difference_update((q, n) for q in queues for n in names)
        for task_id in self._terminating & running.keys():  # re-attached, still to stop
            task = self.dispatch.tasks.get(task_id)
            if task is not None:
                self._stop_if_terminating(task)
        self._declare(header.get("periodic", []))  # last: a bad schedule costs itself only

    def _capacity(self, peer: _Peer) -> int:
        """Tasks a worker may hold: its slots, plus --prefetch or the automatic prefetch
        its recent run times give (none for tasks of more than a few milliseconds)."""
        if not peer.slots:
            return 0
        prefetch = self.settings.prefetch
        if prefetch is None:
            prefetch = peer.runtimes.prefetch(peer.slots)
        return peer.slots + prefetch

    def _worker(self, ident: bytes) -> _Peer:
        peer = self.peers.get(ident)
        if peer is None:
            # Declared dead, or the broker restarted: the worker must say READY again.
            self.counters["unknown_worker"] += 1
            self._send(ident, p.ERROR, {"reason": "unknown worker", "code": "unknown-worker"})
            raise _Ignore
        peer.last_seen = time.monotonic()
        return peer

    def _on_started(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        peer = self._worker(ident)
        ids = header.get("ids")
        if ids is None:  # one task
            ids, deliveries = [header.get("id")], [header.get("delivery")]
        else:  # several: "ids" and "deliveries", in step
            deliveries = header.get("deliveries")
            if not isinstance(ids, list) or not isinstance(deliveries, list):
                raise ProtocolError("STARTED needs 'id' or 'ids' and 'deliveries' (lists)")
            if len(ids) != len(deliveries):
                raise ProtocolError("STARTED 'ids' and 'deliveries' differ in length")
        for task_id, delivery in zip(ids, deliveries, strict=True):
            if not isinstance(task_id, str) or not self.dispatch.started(
                peer.wid, task_id, _as_delivery(delivery)
            ):
                self.counters["stale_started"] += 1
        # Not published: a message per task that no client needs (status asks the
        # broker), and about a fifth of the broker's sends per task.

    def _on_progress(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """A running task reported progress: keep the latest, publish it to its client."""
        peer = self._worker(ident)
        task_id, info = header.get("id"), header.get("progress")
        if not isinstance(task_id, str) or not isinstance(info, dict):
            raise ProtocolError("PROGRESS needs 'id' and 'progress' (a map)")
        task = self.dispatch.held(peer.wid, task_id, _delivery(header))
        if task is None:
            self.counters["stale_progress"] += 1
            return
        task.started = True
        task.progress = {k: info.get(k) for k in ("done", "total", "note")}
        head = {"id": task_id, "state": p.STARTED_STATE, "progress": task.progress}
        self._publish((task.data[0]["client"] + task_id).encode(), p.PROGRESS, p.pack_header(head))

    def _on_done(self, ident: bytes, header: dict[str, Any], payload: list[Any]) -> None:
        peer = self._worker(ident)
        returned: list[tuple[str, int | None]] = []  # prefetched tasks given back unstarted
        batch = header.get("done")
        if batch is None:
            self._done(peer, header, payload[0] if payload else b"", returned)
        elif not isinstance(batch, list) or len(batch) != len(payload):
            raise ProtocolError("DONE 'done' must list one header per payload frame")
        else:
            for done_header, body in zip(batch, payload, strict=True):
                try:
                    if not isinstance(done_header, dict):
                        raise ProtocolError("DONE 'done' entries must be maps")
                    self._done(peer, done_header, body, returned)
                except ProtocolError as exc:  # one bad entry costs that entry only
                    self._reject_malformed(ident, exc)
        if returned:
            self._given_back(peer, returned)

    def _given_back(self, peer: _Peer, returned: list[tuple[str, int | None]]) -> None:
        """A stalled worker gave back tasks it had not started: no more prefetch for it
        until a task ends there again, and the tasks go back to the head of their lanes
        together, in the order it held them (not counted as redeliveries)."""
        self._refresh_capacity(peer)
        tasks, out = self.dispatch.give_back(peer.wid, returned)
        self.counters["given_back"] += len(tasks)
        self.counters["stale_done"] += len(returned) - len(tasks)
        self._end_terminated(tasks)
        self._dispatched(out)

    def _refresh_capacity(self, peer: _Peer) -> None:
        """Automatic prefetch: set the worker's credit from its latest run times."""
        if self.settings.prefetch is None and peer.slots:
            out = self.dispatch.set_capacity(peer.wid, self._capacity(peer))
            if out:
                self._dispatched(out)

    def _done(
        self,
        peer: _Peer,
        header: dict[str, Any],
        body: Any,
        returned: list[tuple[str, int | None]],
    ) -> None:
        """One task's outcome from the worker that ran it (a task given back unstarted
        is added to ``returned`` instead)."""
        ident = peer.ident
        task_id, state = header.get("id"), header.get("state")
        if not isinstance(task_id, str) or state not in _DONE_STATES:
            raise ProtocolError(f"DONE needs 'id' and a 'state' in {', '.join(_DONE_STATES)}")
        # Acknowledged (after the commit) whatever happens here, so the worker's outbox
        # lets go of it: a DONE is only ever sent again after a reconnect.
        delivery = _delivery(header)
        self._acks.setdefault(ident, []).append((task_id, delivery))
        runtime = header.get("runtime")
        if not isinstance(runtime, (int, float)) or runtime < 0:
            runtime = None
        if state in _RAN and runtime is not None:
            peer.runtimes.add(runtime)
            self._refresh_capacity(peer)  # lower before the slot it freed is refilled
        if state == p.LOST and header.get("unknown"):
            self._unknown_here(peer, task_id, delivery)
            return
        if state == p.LOST and header.get("returned"):
            # Its runtime says how long the worker's slots were stuck.
            peer.runtimes.stalled(runtime or 0.0)
            returned.append((task_id, delivery))
            return
        if state == p.LOST:  # the process running it died: run it again, or give up
            counts = not header.get("fenced")  # a fenced stop is not a crash
            task, out = self.dispatch.lost(peer.wid, task_id, delivery, counts=counts)
            if task is None:
                self.counters["stale_done"] += 1
            else:
                self._count_redelivered([task])
                self._end_terminated([task])
            self._dispatched(out)
            return
        bad_retry = None  # why a RETRY cannot be held, if it cannot
        if state == p.RETRY:
            countdown = header.pop("countdown", None)
            if type(countdown) in (int, float) and 0 <= countdown <= p.MAX_RETRY_COUNTDOWN:
                self._on_retry(peer, task_id, delivery, countdown)
                return
            # The worker has let go of the task (its DONE is acknowledged): a retry the
            # broker cannot hold fails it, or it would stay on that worker, key and all.
            bad_retry = (
                f"the task asked to be retried after {countdown!r} seconds; a retry waits "
                f"a number of seconds from 0 to {p.MAX_RETRY_COUNTDOWN:g}"
            )
            state = header["state"] = p.FAILURE
            body = p.failure("zq.ProtocolError", bad_retry)
        task, out = self.dispatch.done(peer.wid, task_id, delivery)
        if task is None:
            # Not this worker's task (any more): it was handed to another worker, or it
            # is a resend of a DONE the broker already has.
            self.counters["stale_done"] += 1
            log.info("ignored DONE for %s from %s, which does not hold it", task_id, peer.wid)
        else:
            self.counters["done"] += 1
            if bad_retry is not None:
                self.counters["malformed"] += 1
                log.warning("%s from %s failed: %s", task_id, peer.wid, bad_retry)
            self._finish(task, state, p.pack_header(header), body)
        self._dispatched(out)

    def _unknown_here(self, peer: _Peer, task_id: str, delivery: int | None) -> None:
        """The worker does not have the task's name after all: it gets no more tasks of
        that name, and the task goes back to the head of its lane for one that has it."""
        task, out = self.dispatch.drop_name(peer.wid, task_id, delivery)
        if task is None:
            self.counters["stale_done"] += 1
        else:
            self.counters["unknown_task"] += 1
            log.warning(
                "worker %s does not have task %s after all: it is sent no more of them",
                peer.wid.decode(),
                task.name,
            )
            self._end_terminated([task])
            self._check_served(task)
        self._dispatched(out)

    def _check_served(self, task: Task) -> None:
        """Log, once until a worker takes it, that no connected worker takes this task's
        (queue, name): its tasks wait, and a user should hear why."""
        route = (task.queue, task.name)
        if self._replaying:
            return  # no worker has connected yet: they get the grace to re-attach
        if task.worker is None and not self.dispatch.serves(*route) and route not in self._unserved:
            self._unserved.add(route)
            what = "periodic task" if task.data[0].get("periodic") else "task"
            log.warning(
                "no connected worker serves %s %s on queue %r: its tasks wait until one "
                "that registers it connects (zq status lists them)",
                what,
                task.name,
                task.queue,
            )

    def _on_retry(self, peer: _Peer, task_id: str, delivery: int | None, countdown: float) -> None:
        """The task asked to run again later: hold it (and its key) for the countdown."""
        task, out = self.dispatch.retry(peer.wid, task_id, delivery)
        if task is None:
            self.counters["stale_done"] += 1
        else:
            self.counters["retried"] += 1
            self.timers.add(time.monotonic() + countdown, (_RETRY, task_id))
            self.journal.task_retrying(task_id, task.retries, time.time() + countdown)
            head = p.pack_header({"id": task_id, "state": p.RETRY, "countdown": countdown})
            self._publish((task.data[0]["client"] + task_id).encode(), p.STARTED, head)
        self._dispatched(out)

    def _release_due(self, now: float) -> None:
        """Timers whose time came: retry delays run out (the task goes back to the head
        of its lane), ETAs come (into the queue), expiry times pass."""
        for kind, task_id in self.timers.due(now):
            if kind == _RETRY:
                task = self.dispatch.tasks.get(task_id)
                if task is not None and task.retrying:
                    self.journal.task_retrying(task_id, task.retries, None)
                    self._dispatched(self.dispatch.release(task_id))
            elif kind == _ETA:
                task = self.scheduled.pop(task_id, None)
                if task is not None:
                    self._dispatched(self.dispatch.submit(task))
            elif kind == _EXPIRE:
                self._expire(task_id)
            elif kind == _PERIODIC:
                self._fire(task_id)

    # -------------------------------------------------------------- periodic

    def _declare(self, items: Any) -> None:
        """Schedules a worker's app declares (a list: _on_ready checked it before it
        registered the worker): new or changed ones are (re)armed."""
        for item in items:
            try:
                schedule = Schedule.from_wire(item)
            except ValueError as exc:
                self.counters["bad_schedules"] += 1
                log.warning("ignored a periodic schedule a worker declared: %s", exc)
                continue
            entry = self.periodic.get(schedule.name)
            if entry is not None and entry.schedule == schedule:
                continue  # the usual case: every worker declares the same schedules
            if entry is not None:
                log.info("periodic schedule %s changed: %s", schedule.name, schedule.describe())
            last, last_task = (entry.last, entry.last_task) if entry else (None, None)
            self._arm(Entry(schedule, last, last_task))
            definition = p.pack_header(schedule.to_wire())
            self.journal.schedule_stored(schedule.name, definition, last, last_task)

    def _arm(self, entry: Entry) -> None:
        wall = time.time()
        entry.next = first_fire(entry.schedule, entry.last, wall)
        self.periodic[entry.schedule.name] = entry
        self._arm_next(entry, wall)

    def _arm_next(self, entry: Entry, wall: float) -> None:
        """Set the timer for ``entry.next``; a schedule with no next time is listed
        with next = None and never fires again (e.g. a cron year that has passed)."""
        if entry.next is None:
            log.warning("periodic %s has no next fire time; it is done", entry.schedule.name)
            return
        self.timers.add(time.monotonic() + (entry.next - wall), (_PERIODIC, entry.schedule.name))

    def _fire(self, name: str) -> None:
        """Send a schedule's task if it is due (else the timer is a stale one)."""
        entry = self.periodic.get(name)
        wall = time.time()
        if entry is None or entry.next is None or entry.next > wall + 0.001:
            return
        schedule, due = entry.schedule, entry.next
        entry.next = following(schedule, due, wall)
        self._arm_next(entry, wall)
        previous = entry.last_task
        if schedule.key is not None and previous is not None and self._unfinished_id(previous):
            # Its previous run still waits or runs: per-key exclusivity would queue this
            # one behind it; skipping keeps a slow task from piling up runs.
            entry.skipped += 1
            self.counters["periodic_skipped"] += 1
            return
        full = self._full(schedule.queue)
        if full is not None:
            self.counters["periodic_skipped"] += 1
            log.warning("periodic %s not fired: %s", name, full)
            return
        task_id = new_id()
        header: dict[str, Any] = {
            "id": task_id,
            "name": schedule.task,
            "queue": schedule.queue,
            "client": PERIODIC_CLIENT,
            "periodic": name,
        }
        if entry.next is not None:
            # Superseded by the next run: a run no worker started by then expires, so
            # a schedule whose queue has no worker never piles runs up in the broker.
            header["expires"] = entry.next
        if schedule.key is not None:
            header["key"] = schedule.key
        entry.last, entry.last_task = due, task_id
        if self.journal.durable:
            self.journal.task_accepted(task_id, p.pack_header(header), schedule.payload)
        self.journal.schedule_fired(name, due, task_id)
        self.counters["periodic_fired"] += 1
        out: list[Assignment] = []
        self._admit(_task(task_id, header, schedule.payload), out)
        self._dispatched(out)

    def _unfinished_id(self, task_id: str) -> bool:
        """True if the task was accepted and has not ended."""
        return task_id in self.dispatch.tasks or task_id in self.scheduled or task_id in self.graph

    def _on_periodic(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """List the periodic schedules; ``remove`` names ones to forget."""
        remove = header.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
            raise ProtocolError("PERIODIC 'remove' must be a list of schedule names")
        removed = []
        for name in remove:
            if self.periodic.pop(name, None) is not None:
                self.journal.schedule_dropped(name)
                removed.append(name)
        listing = [entry.listing() for entry in self.periodic.values()]
        reply = {"req": header.get("req"), "periodic": listing, "removed": removed}
        self._send(ident, p.PERIODIC, reply)

    def _expire(self, task_id: str) -> None:
        """End a task EXPIRED if it has not started (a running task runs on)."""
        task = self.scheduled.pop(task_id, None)
        out: list[Assignment] = []
        if task is None:
            task, out = self.dispatch.cancel(task_id)
        if task is not None:
            self._end_unrun(task, p.EXPIRED, "expired before a worker started it")
        self._dispatched(out)

    def _finish(self, task: Task, state: str, head: bytes, body: Any) -> None:
        """Store a final result (journal too), publish it, answer the FETCH waits; then
        release the tasks that waited for it, or end them too if it failed (a loop, not
        recursion: a chain may be thousands of steps long)."""
        ending = [(task, state, head, body)]
        while ending:
            task, state, head, body = ending.pop()
            self._store_final(task, state, head, body)
            released, failed = self.graph.finished(task.id, state == p.SUCCESS)
            for child in failed:
                ending.append((child, state, self._caused(child, state, task.id), body))
            if released:
                out: list[Assignment] = []
                for child in released:
                    self._release_waiting(child, out)
                self._dispatched(out)

    def _store_final(self, task: Task, state: str, head: bytes, body: Any) -> None:
        self.inputs.pop(task.id, None)
        self._terminating.discard(task.id)
        task_header = task.data[0]
        ignored = task_header.get("ignore_result", False)
        if ignored:
            # A bodyless entry, so that a resent SUBMIT is still known as a duplicate.
            body = b""
        result = self.results.put(task.id, state, head, body, time.monotonic())
        self.journal.task_finished(task.id)
        if self.journal.durable:
            expires = time.time() + (result.expires - time.monotonic())
            self.journal.result_stored(task.id, state, head, _bytes(body), expires)
        if not ignored:
            self._publish_result(task_header["client"], task.id, head, body)
        for waiter in self.waiters.pop(task.id):
            self._forward(waiter, p.RESULT, head, body)

    def _bury(self, task: Task) -> None:
        """A dead letter: its workers died under it too often. Kept for ``zq dead``."""
        self.counters["dead"] += 1
        self.dead_letters[task.id] = task
        message = (
            f"gave up after the worker process running it died {task.redeliveries} times; "
            f"inspect it with 'zq dead list', run it again with 'zq dead requeue {task.id}'"
        )
        log.error("task %s (%s) is a dead letter: %s", task.id, task.data[0]["name"], message)
        failure = p.failure("zq.DeadLetter", message)
        head = p.pack_header({"id": task.id, "state": p.DEAD})
        self._finish(task, p.DEAD, head, failure)
        if self.journal.durable:
            header, body = task.data
            self.journal.dead_stored(
                task.id, p.pack_header(header), _bytes(body), task.redeliveries
            )

    def _on_dead_letters(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        requeue = header.get("requeue", [])
        if not isinstance(requeue, list) or not all(isinstance(i, str) for i in requeue):
            raise ProtocolError("DEAD_LETTERS 'requeue' must be a list of task ids")
        requeued, out = [], []
        for task_id in requeue:
            task = self.dead_letters.get(task_id)
            if task is None or task_id in self.dispatch.tasks:
                continue  # not a dead letter, or its id was submitted again meanwhile
            del self.dead_letters[task_id]
            self.results.discard(task_id)
            self.journal.dead_dropped(task_id)
            self.journal.result_dropped(task_id)
            task_header, body = task.data
            for field in ("redeliveries", "expires", "eta"):  # run it now, whatever it said
                task_header.pop(field, None)
            fresh = _task(task.id, task_header, body)
            fresh.delivery = task.delivery  # late reports about old runs stay stale
            if self.journal.durable:
                self.journal.task_accepted(task_id, p.pack_header(task_header), _bytes(body))
            self._gather_inputs(fresh)
            out += self.dispatch.submit(fresh)
            requeued.append(task_id)
        listing = [
            {
                "id": t.id,
                "name": t.data[0]["name"],
                "queue": t.queue,
                "key": t.key,
                "redeliveries": t.redeliveries,
            }
            for t in self.dead_letters.values()
        ]
        self._send(
            ident, p.DEAD_LETTERS, {"req": header.get("req"), "requeued": requeued, "dead": listing}
        )
        self._dispatched(out)

    def _on_worker_heartbeat(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """Answer at once, echoing the worker's send time: its lease (keyed tasks run
        only while it is fresh) then runs from a time at or before this one, whichever
        way a network fails. At once: not behind this turn's journal commit."""
        self._worker(ident)
        sent = _sent_at(header)
        echo = {} if sent is None else {"t": sent}
        wire.send(self._router, [ident, p.BROKER, p.HEARTBEAT, p.pack_header(echo)])

    def _on_worker_disconnect(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        peer = self.peers.get(ident)
        if peer is not None:
            self._drop_worker(peer, "disconnected", counts=False)  # on purpose, not a crash

    def _drop_worker(self, peer: _Peer, why: str, *, counts: bool = True) -> None:
        del self.peers[peer.ident]
        if self.by_wid.get(peer.wid) is peer:
            del self.by_wid[peer.wid]
        lost, out = self.dispatch.remove_worker(peer.wid, counts=counts)
        self._count_redelivered(lost)
        self._end_terminated(lost)
        level = logging.WARNING if lost or why != "disconnected" else logging.INFO
        wid = peer.wid.decode()
        log.log(level, "worker %s offline (%s); %d task(s) handed back", wid, why, len(lost))
        self._event(b"worker.offline", {**peer.info, "why": why, "requeued": len(lost)})
        self._dispatched(out)

    def _count_redelivered(self, handed_back: list[Task]) -> None:
        """Count the handed-back tasks that were queued again (not given up on)."""
        self.counters["redelivered"] += sum(t.id in self.dispatch.tasks for t in handed_back)

    def _dispatched(self, assignments: list[Assignment]) -> None:
        """Send the TASKs a scheduling decision made; bury the tasks it gave up on."""
        if self.dispatch.dead:
            # Taken first: burying finishes tasks, which may release workflow steps
            # and so come back here.
            dead, self.dispatch.dead = self.dispatch.dead, []
            for task in dead:
                self._bury(task)
        stopped: list[Assignment] = []
        for wid, task in assignments:
            if task.id in self._terminating:
                # Revoked with terminate, then handed back before its worker stopped it
                # (that worker was lost): it must not start again anywhere.
                stopped.append((wid, task))
                continue
            peer = self.by_wid[wid]
            task_header, body = task.data
            if task.redeliveries:
                task_header["redeliveries"] = task.redeliveries
            if task.retries:
                task_header["retries"] = task.retries
            task_header["delivery"] = task.delivery
            inputs = self.inputs.get(task.id, ())
            if inputs:
                task_header["inputs"] = len(inputs)
            self._send_task(peer.ident, p.pack_header(task_header), body, inputs)
            self.journal.task_assigned(task.id, wid.decode(), task.redeliveries, task.delivery)
        self.counters["dispatched"] += len(assignments) - len(stopped)
        for wid, task in stopped:
            _, more = self.dispatch.done(wid, task.id, task.delivery)
            self._end_unrun(task, p.REVOKED, "was revoked (terminate) and never ran again")
            self._dispatched(more)

    def _end_terminated(self, handed_back: list[Task]) -> None:
        """Handed-back tasks that were revoked with terminate end REVOKED now, rather
        than wait in their queue for the assignment that would end them."""
        for task in handed_back:
            if task.id in self._terminating:
                cancelled, more = self.dispatch.cancel(task.id)
                if cancelled is not None:
                    self._end_unrun(cancelled, p.REVOKED, "was revoked (terminate)")
                    self._dispatched(more)

    def _event(self, name: bytes, body: dict[str, Any]) -> None:
        self._publish(p.EVENT_PREFIX + name, p.EVENT, p.pack_header(body))

    # ----------------------------------------------------------------- timers

    def _on_tick(self, now: float) -> None:
        """Bury the silent workers, expire results and waits. (Workers are not sent
        heartbeats: each of theirs is answered.)"""
        dead_after = self.settings.heartbeat * self.settings.liveness
        # Messages still unread in our own queue may be the heartbeats of the very
        # workers that look silent: judge liveness only once they are read.
        if not self._router.poll(0):
            for peer in list(self.peers.values()):
                if now - peer.last_seen > dead_after:
                    self._drop_worker(peer, f"silent for {now - peer.last_seen:.1f}s")
        for wid, deadline in list(self._placeholders.items()):
            if wid in self.by_wid:
                del self._placeholders[wid]  # it came back and re-attached its tasks
            elif now >= deadline:
                del self._placeholders[wid]
                lost, out = self.dispatch.remove_worker(wid)
                self._count_redelivered(lost)
                self._end_terminated(lost)
                log.warning(
                    "worker %s did not come back; %d task(s) handed to others",
                    wid.decode(),
                    len(lost),
                )
                self._dispatched(out)
        self.results.purge(now)
        if self.authorizer is not None and (self._reload_keys or now >= self._next_key_check):
            try:
                if self._reload_keys:
                    self.authorizer.reload()
                else:
                    self.authorizer.reload_if_changed()
            except Exception:  # a key file vanishing mid-scan must not stop the broker
                log.exception("could not reload the authorized keys; keeping the old ones")
            self._reload_keys = False
            self._next_key_check = now + KEY_CHECK_EVERY
        if now >= self._next_purge:  # scans every wait: not on every tick
            self.waiters.purge(now)
            self._next_purge = now + PURGE_EVERY

    def _result_dropped(self, task_id: str) -> None:
        """A result left the store (TTL or cap): its journal row goes too, by its id,
        so the journal holds what the store does and is never scanned for expiry."""
        self.journal.result_dropped(task_id)

    # ----------------------------------------------------------------- replay

    def _replay(self) -> None:
        """Rebuild the state from the journal: results, then held and waiting tasks."""
        self._replaying = True
        try:
            self._replay_journal()
        finally:
            self._replaying = False

    def _replay_journal(self) -> None:
        now, wall = time.monotonic(), time.time()
        ttl = self.results.ttl
        self.journal.purge_results()  # those that expired while no broker ran
        for stored in self.journal.results():
            # put() adds the TTL to "now"; shift it so the result keeps its expiry.
            self.results.put(
                stored.id,
                stored.state,
                stored.header,
                stored.payload,
                now - ttl + (stored.expires - wall),
            )
        held, waiting = [], []
        for stored in self.journal.tasks():
            header = p.unpack_header(stored.header)
            task = _task(stored.id, header, stored.payload)
            task.redeliveries, task.retries = stored.redeliveries, stored.retries
            task.delivery = stored.delivery
            if stored.eta is not None:
                task.retrying = True
                self.timers.add(now + (stored.eta - wall), (_RETRY, task.id))
            (held if stored.worker or task.retrying else waiting).append((task, stored.worker))
        for task, worker in held:
            self.dispatch.restore(task, worker.encode() if worker else None)
            if task.data[0].get("expires") is not None:  # in case it comes back unstarted
                self.timers.add(now + (task.data[0]["expires"] - wall), (_EXPIRE, task.id))
        for task, _ in held:
            self._gather_inputs(task)
        for task, _ in waiting:
            self._enter(task, [])  # no worker is connected yet: nothing is assigned
        held = [(t, w) for t, w in held if w]
        for stored_schedule in self.journal.schedules():
            try:
                schedule = Schedule.from_wire(p.unpack_header(stored_schedule.definition))
            except (ValueError, ProtocolError) as exc:
                log.warning("dropped periodic schedule %s: %s", stored_schedule.name, exc)
                continue
            self._arm(Entry(schedule, stored_schedule.last, stored_schedule.last_task))
        for stored in self.journal.dead():
            header = p.unpack_header(stored.header)
            task = _task(stored.id, header, stored.payload)
            task.redeliveries = stored.redeliveries
            self.dead_letters[task.id] = task
        grace = self.settings.reattach_grace
        if grace is None:
            grace = 2 * self.settings.heartbeat * self.settings.liveness
        self._placeholders = {w.encode(): now + grace for w in {w for _, w in held}}
        if self.journal.durable:
            log.info(
                "journal %s: %d result(s), %d task(s) waiting, %d held by %d worker(s)"
                " (%.0fs for them to re-attach)",
                self.journal.path,
                len(self.results),
                len(waiting),
                len(held),
                len(self._placeholders),
                grace,
            )

    def _gather_inputs(self, task: Task) -> None:
        """A workflow step held or queued again (replay, dead-letter requeue) gets its
        parents' results back (for a re-run)."""
        args_from = task.data[0].get("args_from")
        if args_from is not None:
            results = [self.results.get(parent) for parent in args_from]
            self.inputs[task.id] = [r.payload if r is not None else b"" for r in results]

    _HANDLERS = {
        (p.CLIENT, p.HELLO): _on_hello,
        (p.CLIENT, p.SUBMIT): _on_submit,
        (p.CLIENT, p.FETCH): _on_fetch,
        (p.CLIENT, p.STATUS): _on_status,
        (p.CLIENT, p.DEAD_LETTERS): _on_dead_letters,
        (p.CLIENT, p.REVOKE): _on_revoke,
        (p.CLIENT, p.PERIODIC): _on_periodic,
        (p.CLIENT, p.HEARTBEAT): _on_client_heartbeat,
        (p.CLIENT, p.DISCONNECT): _on_client_disconnect,
        (p.WORKER, p.READY): _on_ready,
        (p.WORKER, p.STARTED): _on_started,
        (p.WORKER, p.PROGRESS): _on_progress,
        (p.WORKER, p.DONE): _on_done,
        (p.WORKER, p.HEARTBEAT): _on_worker_heartbeat,
        (p.WORKER, p.DISCONNECT): _on_worker_disconnect,
    }


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes


class _Batch:
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


#: The failure type a task ended without running gets, by its state.
_UNRUN_KINDS = {p.EXPIRED: "zq.Expired", p.REVOKED: "zq.Revoked", p.FAILURE: "zq.WorkflowError"}

_DONE_STATES = (p.SUCCESS, p.FAILURE, p.RETRY, p.LOST, p.EXPIRED, p.REVOKED)
#: The DONE states of a task that ran to its end: their run times feed the prefetch.
_RAN = (p.SUCCESS, p.FAILURE, p.RETRY)


def _task(task_id: str, header: dict[str, Any], body: Any) -> Task:
    """The scheduler's view of an accepted task (header checked by check_task_header)."""
    return Task(
        task_id,
        header["queue"],
        header.get("key"),
        (header, body),
        header.get("priority", 0),
        header["name"],
    )


def _delivery(header: dict[str, Any]) -> int | None:
    """The delivery a worker's report is about (see Dispatcher.held)."""
    return _as_delivery(header.get("delivery"))


def _sent_at(header: dict[str, Any]) -> float | None:
    """A worker's send time ``t`` (its monotonic clock), if it says one."""
    sent = header.get("t")
    return sent if type(sent) is float else None


def _before(sent: float | None, than: float | None) -> bool:
    """A READY's send time is known to come before another's (same worker, so the
    same clock); unknown (a worker that does not say it) is never before."""
    return sent is not None and than is not None and sent < than


def _as_delivery(value: Any) -> int | None:
    return value if isinstance(value, int) else None


class _Ignore(Exception):
    """Raised inside a handler once it has answered; the message is dropped."""
