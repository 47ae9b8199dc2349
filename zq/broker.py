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
import os
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import zmq

from zq import messages, wire
from zq import protocol as p
from zq.dispatch import PREFETCH_MAX
from zq.errors import ProtocolError
from zq.journal import Journal, NullJournal, open_journal
from zq.outbox import Outbox, Outgoing, finish_out, finish_pub
from zq.periodic import PERIODIC, Periodic
from zq.replay import replay
from zq.reports import Reports
from zq.security import Authorizer, load_pair, serve_with
from zq.sequence import SubmitOrder
from zq.settings import setting
from zq.tasks import Tasks
from zq.workers import Peer, Workers

log = logging.getLogger("zq.broker")

#: Most messages read from the ROUTER in one loop turn, so timers still run under load.
MAX_BATCH = 2000
#: Seconds between sweeps of expired FETCH waits.
PURGE_EVERY = 10.0
#: Messages a peer may have queued towards the broker before its sends block.
ROUTER_RCVHWM = 1000
#: Seconds between checks of the authorized-keys directory for changes.
KEY_CHECK_EVERY = 1.0
#: Most task ids in one ACCEPTED to a worker (ids are at most 64 characters).
ACK_CHUNK = 5000
#: Seconds a worker lets prefetched tasks wait while none of its slots frees before it
#: hands them back (automatic prefetch): what a task misjudged as short can cost others.
GIVE_BACK_AFTER = 0.1
#: How many keys ``STATUS`` lists at most.
STATUS_KEYS = 100


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


class Broker:
    """A zq broker. ``bind()`` then ``run()``; or ``start()`` to run it on a thread."""

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self.settings = settings or BrokerSettings()
        self.instance = uuid.uuid4().hex[:16]
        self.counters: Counter[str] = Counter()
        self.workers = Workers()
        self.outbox = Outbox(self.settings.max_message_size)
        self.tasks = Tasks(self.settings, self.counters, self.outbox, self.workers)
        self.reports = Reports(self.tasks)
        self.periodic = Periodic(self.tasks, self.counters)
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
        #: (journal commits, turn's messages) waiting until that many commits are on disk
        self._held: deque[tuple[int, Outgoing]] = deque()
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
        self.journal = self.tasks.journal = open_journal(self.settings.journal)
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
                wake = min(next_tick, self.tasks.timers.next_at() or next_tick)
                events = dict(poller.poll(max(0.0, wake - time.monotonic()) * 1000))
                if self._wake_r in events:  # read it, or every later poll returns at once
                    os.read(self._wake_r, 4096)
                if synced in events:  # first: the oldest replies go out first
                    self._release(self.journal.synced())
                if self._pub in events:  # first: a result of this turn sees a new follower
                    self._drain_pub()
                read = self._drain_router() if self._router in events else 0
                now = time.monotonic()
                if self.tasks.timers:
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
        outgoing = self.outbox.take()
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

    def _send_out(self, outgoing: Outgoing) -> None:
        acks, out, pub_out = outgoing
        # Results first: a lone task's latency runs through them, and they go out on
        # the other socket, to other peers, so their order with the replies below is
        # nobody's to see.
        for frames in pub_out:
            wire.send(self._pub, finish_pub(frames))
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
            wire.send(router, finish_out(frames))

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
            self.outbox.subscriptions.update(message)

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
        self.outbox.send(ident, p.ERROR, {"reason": exc.reason})

    # ---------------------------------------------------------------- clients

    def _on_hello(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self.outbox.send(ident, p.WELCOME, self._welcome())

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
        submit = messages.submit(header, payload)
        if not self._in_order(ident, submit):
            return
        accepted, rejected = self.tasks.submit(submit.client, submit.tasks, payload)
        if accepted:
            self.outbox.send(ident, p.ACCEPTED, {"ids": accepted})
        if rejected:
            self.outbox.send(ident, p.REJECTED, {"rejected": rejected})

    def _in_order(self, ident: bytes, submit: messages.Submit) -> bool:
        """True if this SUBMIT overtakes no older unacknowledged one of its client (see
        :mod:`zq.sequence`); else the client is asked to send those again, first."""
        if submit.n is None or submit.since is None:
            return True  # a client that does not number its submits
        if self._order.take(submit.client, submit.n, submit.since):
            return True
        self.counters["resend_asked"] += 1
        reason = "an older submit of this client is missing: send the unacknowledged ones again"
        self.outbox.send(ident, p.ERROR, {"reason": reason, "code": "resend", "n": submit.n})
        return False

    def _on_fetch(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        fetch = messages.fetch(header)
        self.tasks.fetch(ident, fetch.ids, fetch.wait)

    def _on_revoke(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """Revoke tasks (see :meth:`zq.tasks.Tasks.revoke`); the reply says what became
        of each id."""
        revoke = messages.revoke(header)
        reply = self.tasks.revoke(revoke.ids, revoke.terminate)
        self.outbox.send(ident, p.REVOKE, {**reply, "req": revoke.req})

    def _on_status(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self.outbox.send(ident, p.STATUS, {**self.status(), "req": header.get("req")})

    def status(self) -> dict[str, Any]:
        """A snapshot for ``zq status``: workers, queue depths, keys in flight, counters."""
        now = time.monotonic()
        workers = []
        for peer in self.workers:
            state = self.tasks.dispatch.workers.get(peer.wid)
            workers.append(
                {
                    **peer.info,
                    "in_flight": len(state.running) if state else 0,
                    "seen_ago": round(now - peer.last_seen, 3),
                }
            )
        keys = list(itertools.islice(self.tasks.dispatch.keys_in_flight(), STATUS_KEYS))
        return {
            "broker": self.instance,
            "workers": workers,
            "queues": {q: n for q, n in self.tasks.dispatch.queued.items() if n},
            "keys_in_flight": sum(1 for _ in self.tasks.dispatch.keys_in_flight()),
            "keys": keys,
            "retrying": sum(1 for t in self.tasks.dispatch.tasks.values() if t.retrying),
            "scheduled": len(self.tasks.scheduled),
            "timers": len(self.tasks.timers),
            "results": len(self.tasks.results),
            "results_evicted": self.tasks.results.evicted,
            "security": "curve" if self.authorizer is not None else "plain",
            "dead": len(self.tasks.dead_letters),
            "unserved": [
                {"queue": queue, "name": name, "waiting": waiting}
                for queue, name, waiting in self.tasks.dispatch.unserved()
            ],
            "counters": dict(self.counters),
        }

    def _on_client_heartbeat(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        self.outbox.send(ident, p.HEARTBEAT, {"broker": self.instance})

    def _on_client_disconnect(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        pass  # clients hold no broker state; their pending waits expire on their own

    # ---------------------------------------------------------------- workers

    def _on_ready(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        ready = messages.ready(header)
        wkey = ready.worker.encode()
        if self.workers.is_late(ident, wkey, ready.sent):
            self.counters["stale_ready"] += 1
            log.info("ignored a late READY from an earlier connection of worker %s", ready.worker)
            return
        other = self.workers.other_on(ident, wkey)
        if other is not None:
            self._drop_worker(other, "re-registered under another id")
        # A draining worker (stopping gracefully) keeps its tasks but gets no more.
        slots = 0 if ready.draining else ready.concurrency
        peer = Peer(ident, wkey, ready.info, time.monotonic(), slots)
        peer.ready_sent = ready.sent
        self.workers.register(peer)
        welcome = self._welcome()
        if ready.sent is not None:  # the worker's lease starts at its READY
            welcome["t"] = ready.sent
        self.outbox.send(ident, p.WELCOME, welcome)
        log.info(
            "worker %s %s (%s pid %s, %d slots, queues %s)",
            ready.worker,
            "stopping: no new tasks" if ready.draining else "online",
            ready.info["host"],
            ready.info["pid"],
            ready.concurrency,
            ",".join(ready.queues),
        )
        self._event(b"worker.online", ready.info)
        self.reports.worker_ready(peer, ready.queues, ready.running, ready.names)
        self.periodic.declare(ready.periodic)  # last: a bad schedule costs itself only

    def _worker(self, ident: bytes) -> Peer:
        peer = self.workers.get(ident)
        if peer is None:
            # Declared dead, or the broker restarted: the worker must say READY again.
            self.counters["unknown_worker"] += 1
            self.outbox.send(ident, p.ERROR, {"reason": "unknown worker", "code": "unknown-worker"})
            raise _Ignore
        peer.last_seen = time.monotonic()
        return peer

    def _on_started(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        peer = self._worker(ident)
        started = messages.started(header)
        self.reports.started(peer, started.ids, started.deliveries)

    def _on_progress(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """A running task reported progress: keep the latest, publish it to its client."""
        peer = self._worker(ident)
        report = messages.progress(header)
        self.reports.progress(peer, report.id, report.progress, report.delivery)

    def _on_done(self, ident: bytes, header: dict[str, Any], payload: list[Any]) -> None:
        peer = self._worker(ident)
        returned: list[tuple[str, int | None]] = []  # prefetched tasks given back unstarted
        for done_header, body in messages.done_batch(header, payload):
            try:
                if not isinstance(done_header, dict):
                    raise ProtocolError("DONE 'done' entries must be maps")
                self.reports.done(peer, done_header, body, returned)
            except ProtocolError as exc:  # one bad entry costs that entry only
                self._reject_malformed(ident, exc)
        if returned:
            self.reports.given_back(peer, returned)

    def _release_due(self, now: float) -> None:
        """Timers whose time came: retry delays run out (the task goes back to the head
        of its lane), ETAs come (into the queue), expiry times pass."""
        for kind, name in self.tasks.timers.due(now):
            if kind == PERIODIC:
                self.periodic.fire(name)
            else:
                self.tasks.due(kind, name)

    def _on_periodic(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """List the periodic schedules; ``remove`` names ones to forget."""
        request = messages.periodic(header)
        removed = self.periodic.remove(request.remove)
        reply = {"req": request.req, "periodic": self.periodic.listing(), "removed": removed}
        self.outbox.send(ident, p.PERIODIC, reply)

    def _on_dead_letters(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        request = messages.dead_letters(header)
        requeued = self.tasks.requeue_dead(request.requeue)
        reply = {"req": request.req, "requeued": requeued, "dead": self.tasks.dead_listing()}
        self.outbox.send(ident, p.DEAD_LETTERS, reply)

    def _on_worker_heartbeat(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        """Answer at once, echoing the worker's send time: its lease (keyed tasks run
        only while it is fresh) then runs from a time at or before this one, whichever
        way a network fails. At once: not behind this turn's journal commit."""
        self._worker(ident)
        sent = messages.sent_at(header)
        echo = {} if sent is None else {"t": sent}
        wire.send(self._router, [ident, p.BROKER, p.HEARTBEAT, p.pack_header(echo)])

    def _on_worker_disconnect(self, ident: bytes, header: dict[str, Any], _: list[Any]) -> None:
        peer = self.workers.get(ident)
        if peer is not None:
            self._drop_worker(peer, "disconnected", counts=False)  # on purpose, not a crash

    def _drop_worker(self, peer: Peer, why: str, *, counts: bool = True) -> None:
        self.workers.remove(peer)
        lost = self.tasks.worker_gone(peer.wid, counts=counts)
        level = logging.WARNING if lost or why != "disconnected" else logging.INFO
        wid = peer.wid.decode()
        log.log(level, "worker %s offline (%s); %d task(s) handed back", wid, why, len(lost))
        self._event(b"worker.offline", {**peer.info, "why": why, "requeued": len(lost)})

    def _event(self, name: bytes, body: dict[str, Any]) -> None:
        self.outbox.publish(p.EVENT_PREFIX + name, p.EVENT, p.pack_header(body))

    # ----------------------------------------------------------------- timers

    def _on_tick(self, now: float) -> None:
        """Bury the silent workers, expire results and waits. (Workers are not sent
        heartbeats: each of theirs is answered.)"""
        dead_after = self.settings.heartbeat * self.settings.liveness
        # Messages still unread in our own queue may be the heartbeats of the very
        # workers that look silent: judge liveness only once they are read.
        if not self._router.poll(0):
            for peer in self.workers.silent(now, dead_after):
                self._drop_worker(peer, f"silent for {now - peer.last_seen:.1f}s")
        for wid in self.workers.not_back(now):
            lost = self.tasks.worker_gone(wid)
            log.warning(
                "worker %s did not come back; %d task(s) handed to others",
                wid.decode(),
                len(lost),
            )
        self.tasks.results.purge(now)
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
            self.tasks.waiters.purge(now)
            self._next_purge = now + PURGE_EVERY

    # ----------------------------------------------------------------- replay

    def _replay(self) -> None:
        """Rebuild the core from the journal (see :mod:`zq.replay`)."""
        grace = self.settings.reattach_grace
        if grace is None:
            grace = 2 * self.settings.heartbeat * self.settings.liveness
        replay(self.tasks, self.periodic, self.workers, grace)

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


class _Ignore(Exception):
    """Raised inside a handler once it has answered; the message is dropped."""
