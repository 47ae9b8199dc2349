"""The client side: one background I/O thread per :class:`Client`, and :class:`AsyncResult`.

Thread ownership: the DEALER (commands) and the SUB (results) belong to the I/O
thread alone. Application threads hand it work through a queue and a wake-up pipe,
and wait on per-task events, so ``delay()`` and ``get()`` are safe from any thread.

Reliability: submits stay in ``_unacked`` until the broker ACCEPTs them and are sent
again whenever the client (re)connects, the broker deduplicating by task id. SUBMITs
are numbered, and each says which is the oldest one still unacknowledged, so that a
broker that lost one (it restarted under it) asks for them all again rather than let
a newer one overtake it (:mod:`zq.sequence`). A
``get()`` that has not seen its result on the SUB after ``fetch_after`` seconds asks
the broker with FETCH, so a lost PUB message costs latency, never a result.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import zmq

from zq import protocol as p
from zq import wire
from zq.address import check_broker_url
from zq.errors import (
    BrokerUnavailable,
    ProtocolError,
    ResultUnavailable,
    TaskFailed,
    TaskRejected,
)
from zq.errors import TimeoutError as ZQTimeoutError
from zq.security import ClientCurve

log = logging.getLogger("zq.client")

#: Seconds a get() waits for the result on the SUB before asking the broker directly.
FETCH_AFTER = 0.5
#: How long the broker is asked to hold one FETCH wait before the client asks again.
FETCH_WAIT = 3600.0
#: Most task ids in one FETCH (ids are at most 64 characters; a header at most 1 MiB).
FETCH_CHUNK = 10_000
#: Seconds a get() that ran out waits for the broker to say what became of the task.
STATE_PROBE = 1.0
#: Most tasks per SUBMIT message.
SUBMIT_BATCH = 1000


class _Done:
    """A ``threading.Event`` made only once somebody has to wait: most results are in
    before anyone asks, and an Event (a Condition and its locks) per task cost more
    than the rest of a submit."""

    __slots__ = ("_event", "_set")

    _lock = threading.Lock()  # orders set() against a waiter making the Event

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        with self._lock:
            if self._set:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


class _Slot:
    """What this process knows of one task; written by the I/O thread only."""

    __slots__ = (
        "__weakref__",
        "done",
        "done_at",
        "header",
        "id",
        "mine",
        "payload",
        "progress",
        "seq",
        "state",
    )

    def __init__(self, task_id: str, mine: bool) -> None:
        self.id = task_id
        self.mine = mine  # submitted by this client, so its result comes on our SUB
        self.state = p.PENDING
        self.header: dict[str, Any] = {}
        self.payload: Any = None
        self.progress: dict[str, Any] | None = None  # the latest report of a running task
        self.seq = 0  # bumped on every update, for waiters of a state query
        self.done = _Done()
        self.done_at = 0.0  # wall-clock time this process learnt the final state


class Client:
    """A connection to one broker, shared by all threads of the process."""

    def __init__(
        self,
        broker: str,
        *,
        heartbeat: float = 1.0,
        liveness: int = 3,
        fetch_after: float = FETCH_AFTER,
        curve: ClientCurve | None = None,
    ) -> None:
        self.broker = check_broker_url(broker)
        self.curve = curve
        #: The broker's limit on one message (from WELCOME; the default until then).
        self.max_message_size = p.DEFAULT_MAX_MESSAGE
        self.id = uuid.uuid4().hex[:16]
        self.fetch_after = fetch_after
        self._heartbeat = heartbeat
        self._liveness = liveness
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._slots: weakref.WeakValueDictionary[str, _Slot] = weakref.WeakValueDictionary()
        self._unacked: dict[str, tuple[dict[str, Any], bytes]] = {}  # I/O thread only
        # SUBMIT numbering (I/O thread only): the last number sent, the SUBMIT that
        # carried each unacknowledged task, how many of those each still holds (oldest
        # first), and the first SUBMIT of the latest full resend.
        self._submit_no = 0
        self._carried_by: dict[str, int] = {}
        self._open: dict[int, int] = {}
        self._resent_from = 0
        self._watched: dict[str, float] = {}  # task id -> when its FETCH wait lapses
        # The earliest of those times: the I/O loop scans _watched only once it comes
        # (a scan per loop turn cost O(waits) each turn, all unfinished results after
        # a reconnect).
        self._fetch_at = float("inf")
        self._requests: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._next_req = 0
        self._closing = False
        self._wake_pending = False
        self._state_queries = 0  # callers waiting in query_state (notified on updates)
        self._thread = threading.Thread(target=self._run, name="zq-client", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------- caller threads

    def submit(self, header: dict[str, Any], payload: bytes) -> _Slot:
        """Queue one task for the broker; returns the slot its result lands in.

        Raises ValueError if the task is larger than the broker accepts in a message."""
        if len(payload) > self.max_message_size - p.ENVELOPE:
            raise ValueError(
                f"task arguments of {len(payload)} bytes exceed the broker's message size "
                f"limit ({self.max_message_size} bytes)"
            )
        slot = self.slot(header["id"], mine=True)
        self._call("submit", header, payload)
        return slot

    def slot(self, task_id: str, *, mine: bool = False) -> _Slot:
        """The slot for ``task_id``, shared by every AsyncResult of it in this process."""
        with self._lock:
            slot = self._slots.get(task_id)
            if slot is None:
                slot = self._slots[task_id] = _Slot(task_id, mine)
            return slot

    def watch(self, task_id: str) -> None:
        """Ask the broker to send this task's result when it ends (FETCH with a wait)."""
        self._call("watch", task_id)

    def query_state(self, slot: _Slot, timeout: float) -> str:
        """Ask the broker for a task's state now; returns it (PENDING if not known)."""
        with self._lock:
            seq = slot.seq
            self._state_queries += 1
        try:
            self._call("query", slot.id)
            with self._changed:
                if not self._changed.wait_for(lambda: slot.seq != seq, timeout):
                    raise BrokerUnavailable(f"no answer from {self.broker} within {timeout}s")
                return slot.state
        finally:
            with self._lock:
                self._state_queries -= 1

    def wait_failed(self, slot: _Slot, timeout: float | None, since: float) -> Exception:
        """The error for a wait on ``slot`` that ran out after ``timeout`` seconds
        (begun at ``since``): BrokerUnavailable if the broker said nothing meanwhile,
        else TimeoutError, saying so when the task waits for a worker that no connected
        one is (it asks the broker)."""
        message = f"task {slot.id} not finished after {timeout}s"
        try:
            state = self.query_state(slot, timeout=STATE_PROBE)
        except BrokerUnavailable:
            if self._last_recv < since:
                return BrokerUnavailable(
                    f"no answer from broker {self.broker} while waiting {timeout}s for task "
                    f"{slot.id}: is a broker running there? (zq broker starts one)"
                )
            return ZQTimeoutError(message)
        unserved = slot.header.get("unserved")
        if state == p.QUEUED and isinstance(unserved, dict):
            queue, name = unserved.get("queue"), unserved.get("name")
            message += (
                f": it waits in queue {queue!r}, and no connected worker serves task "
                f"{name!r} there (start one with: zq worker MODULE --queues {queue})"
            )
        elif state != p.PENDING:
            message += f" (it is {state})"
        return ZQTimeoutError(message)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's STATUS snapshot (workers, queues, keys in flight, counters)."""
        return self.request(p.STATUS, {}, timeout)

    def revoke(
        self, task_ids: list[str], *, terminate: bool = False, timeout: float = 5.0
    ) -> dict[str, str]:
        """Revoke tasks by id (see :meth:`AsyncResult.revoke`); returns id -> outcome."""
        reply = self.request(p.REVOKE, {"ids": list(task_ids), "terminate": terminate}, timeout)
        return {
            task_id: outcome for outcome in p.REVOKE_OUTCOMES for task_id in reply.get(outcome, ())
        }

    def request(self, command: bytes, header: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a command the broker answers with the same command and our ``req``."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._call("request", command, header, future)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise BrokerUnavailable(f"no answer from {self.broker} within {timeout}s") from None

    def flush(self, timeout: float) -> bool:
        """Wait until the broker has accepted everything submitted; False on timeout."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._call("flush", future)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            return False

    def close(self, flush_timeout: float = 5.0) -> None:
        """Give unaccepted submits up to ``flush_timeout`` seconds, then stop the thread."""
        if self._closing or not self._thread.is_alive():
            return
        flushed = self.flush(flush_timeout) if flush_timeout > 0 else not self._unacked
        if not flushed:
            log.warning("closing with tasks the broker has not accepted")
        self._closing = True
        self._wake()
        self._thread.join(2.0)
        atexit.unregister(self.close)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _call(self, *command: Any) -> None:
        if self._closing:
            raise BrokerUnavailable("this client is closed; make a new App or client")
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        # One write per batch of commands, not per command: the I/O thread clears the
        # flag after reading the pipe and before it drains the queue, so whatever was
        # queued is seen either by that drain or by the wake-up the next caller sends.
        if self._wake_pending:
            return
        self._wake_pending = True
        # A full pipe means the I/O thread is already awake; a closed one, that it ended.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ----------------------------------------------------------- I/O thread

    def _run(self) -> None:
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.maxmsgsize = p.PEER_MAX_MESSAGE
        if self.curve is not None:
            self.curve.apply(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.id.encode())
        self._pub_endpoint = ""
        self._refused = ""  # why the broker's last WELCOME was refused, if it was
        self._unreachable = False  # silent past the limit; logged once until it answers
        self._broker_instance = ""
        self._flushes: list[concurrent.futures.Future[bool]] = []
        self._connect()
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        dealer = self._dealer
        poller.register(dealer, zmq.POLLIN)
        try:
            while not self._closing:
                if dealer is not self._dealer:  # reconnected: poll the new socket
                    poller.unregister(dealer)
                    dealer = self._dealer
                    poller.register(dealer, zmq.POLLIN)
                events = dict(poller.poll(self._heartbeat * 250))
                if self._wake_r in events:
                    # Read first, then clear: a caller that saw the flag set queued its
                    # command before the clear, so the drain below takes it; one that
                    # sees it clear writes a new byte. (The other order lost wake-ups.)
                    os.read(self._wake_r, 4096)
                    self._wake_pending = False
                    self._drain_commands()
                if self._dealer in events:
                    self._drain(self._dealer, self._on_reply)
                if self._sub in events:
                    self._drain(self._sub, self._on_published)
                self._on_tick(time.monotonic())
        finally:
            self._send(p.DISCONNECT, {})
            self._dealer.close(linger=0)
            self._sub.close(linger=0)
            self._ctx.term()

    def _connect(self) -> None:
        """(Re)create the DEALER and say HELLO; submits wait for the WELCOME."""
        old = getattr(self, "_dealer", None)
        if old is not None:
            old.close(linger=0)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.linger = 0
        self._dealer.maxmsgsize = p.PEER_MAX_MESSAGE
        if self.curve is not None:
            self.curve.apply(self._dealer)
        self._dealer.connect(self.broker)
        self._welcomed = False
        for future in self._requests.values():  # their answers went with the old socket
            future.set_exception(BrokerUnavailable(f"lost the connection to {self.broker}"))
        self._requests.clear()
        now = time.monotonic()
        self._last_recv = self._last_beat = now
        self._send(p.HELLO, {"client": self.id})

    def _send(self, command: bytes, header: dict[str, Any], *payload: Any) -> bool:
        """Send without ever blocking the I/O thread. With no connection to send on (the
        broker refused our handshake) or a full queue, the message is dropped (returns
        False): submits and FETCH waits are sent again, heartbeats need not be."""
        return self._send_packed(command, p.pack_header(header), *payload)

    def _send_packed(self, command: bytes, header: bytes, *payload: Any) -> bool:
        try:
            wire.send(self._dealer, [p.CLIENT, command, header, *payload], zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _drain(self, sock: zmq.Socket, handle: Any) -> None:
        while True:
            try:
                frames = wire.recv_bytes(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bad message must not kill the I/O thread
                log.exception("client could not handle a message from the broker")

    def _drain_commands(self) -> None:
        batch: list[tuple[dict[str, Any], bytes]] = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = command[0]
            if kind == "submit":
                header, payload = command[1], command[2]
                self._unacked[header["id"]] = (header, payload)
                batch.append((header, payload))
                continue
            if batch and self._welcomed:
                # Keep the caller's order: a status query right after delay() must
                # reach the broker after the SUBMIT, not before it.
                self._send_submits(batch)
                batch = []
            if kind == "watch":
                if self._watched.setdefault(command[1], 0.0) == 0.0:  # due now, unless asked
                    self._fetch_at = 0.0
            elif kind == "query":
                self._send(p.FETCH, {"ids": [command[1]], "wait": 0})
            elif kind == "request":
                self._next_req += 1
                self._requests[self._next_req] = command[3]
                self._send(command[1], {**command[2], "req": self._next_req})
            elif kind == "flush":
                self._flushes.append(command[1])
        if batch and self._welcomed:
            self._send_submits(batch)
        self._settle_flushes()

    def _send_submits(self, items: list[tuple[dict[str, Any], bytes]]) -> None:
        """SUBMIT in batches of at most SUBMIT_BATCH tasks, half the size limit, and
        task headers that fit in one SUBMIT header (MAX_HEADER_BYTES, less room for
        the rest of it): a batch past either limit would be refused whole."""
        budget = self.max_message_size // 2
        header_budget = p.MAX_HEADER_BYTES - p.HEADER_SLACK
        headers: list[bytes] = []  # the chunk's task headers, packed once
        bodies: list[bytes] = []
        ids: list[str] = []
        size = header_size = 0
        for item in items:
            packed = p.pack_header(item[0])
            this_header = len(packed)
            reason = None
            if len(item[1]) > self.max_message_size - p.ENVELOPE:
                # Queued before the broker told us its limit: sending it would only get
                # this connection cut, again and again. Refuse it here.
                reason = (
                    f"arguments of {len(item[1])} bytes exceed the broker's message "
                    f"size limit ({self.max_message_size} bytes)"
                )
            elif this_header > header_budget:
                reason = f"task header of {this_header} bytes exceeds {header_budget}"
            if reason is not None:
                self._settled(item[0]["id"])
                self._update(item[0]["id"], p.REJECTED_STATE, {"reason": reason}, None)
                continue
            if headers and (
                len(headers) == SUBMIT_BATCH
                or size + len(item[1]) > budget
                or header_size + this_header > header_budget
            ):
                self._send_submit(headers, bodies, ids)
                headers, bodies, ids, size, header_size = [], [], [], 0, 0
            headers.append(packed)
            bodies.append(item[1])
            ids.append(item[0]["id"])
            size += len(item[1]) + 64  # a frame's own overhead; headers are counted apart
            header_size += this_header
        if headers:
            self._send_submit(headers, bodies, ids)
        self._settle_flushes()

    def _send_submit(self, headers: list[bytes], bodies: list[bytes], ids: list[str]) -> None:
        """One SUBMIT, numbered (also when it cannot be sent now: the broker then sees
        the gap and asks for the unacknowledged submits again)."""
        self._submit_no = n = self._submit_no + 1
        for task_id in ids:
            self._carried_by[task_id] = n
        self._open[n] = len(ids)
        since = next(iter(self._open))
        header = p.pack_list("tasks", headers, client=self.id, n=n, since=since)
        self._send_packed(p.SUBMIT, header, *bodies)

    def _settled(self, task_id: str) -> None:
        """The broker accepted or refused the task: it is sent no more."""
        self._unacked.pop(task_id, None)
        n = self._carried_by.pop(task_id, None)
        if n is not None:
            left = self._open[n] - 1
            if left:
                self._open[n] = left
            else:
                del self._open[n]

    def _resend_unacked(self) -> None:
        """Send every unacknowledged submit again, oldest first, in new SUBMITs."""
        self._carried_by.clear()
        self._open.clear()
        self._resent_from = self._submit_no + 1
        if self._unacked:
            self._send_submits(list(self._unacked.values()))

    def _settle_flushes(self) -> None:
        if not self._unacked:
            for future in self._flushes:
                future.set_result(True)
            self._flushes.clear()

    def _on_reply(self, frames: list[bytes]) -> None:
        self._last_recv = time.monotonic()
        if self._unreachable:
            self._unreachable = False
            log.warning("broker %s answers again", self.broker)
        _tag, command, header, payload = p.parse(frames)
        handler = self._REPLIES.get(command)
        if handler is not None:  # (else a command no broker sends a client: ignored)
            handler(self, header, payload)

    def _on_accepted(self, header: dict[str, Any], payload: list[bytes]) -> None:
        for task_id in header.get("ids", ()):
            self._settled(task_id)
            self._update(task_id, p.QUEUED, header, None, only_if=p.PENDING)
        self._settle_flushes()

    def _on_rejected(self, header: dict[str, Any], payload: list[bytes]) -> None:
        for task_id, reason in header.get("rejected", {}).items():
            self._settled(task_id)
            self._update(task_id, p.REJECTED_STATE, {"reason": reason}, None)
        self._settle_flushes()

    def _on_answer(self, header: dict[str, Any], payload: list[bytes]) -> None:
        """The reply to a :meth:`request` (it has the request's ``req``)."""
        future = self._requests.pop(header.get("req"), None)
        if future is not None:
            future.set_result(header)

    def _on_heartbeat(self, header: dict[str, Any], payload: list[bytes]) -> None:
        if header.get("broker") != self._broker_instance:
            self._send(p.HELLO, {"client": self.id})  # it restarted: start over

    def _on_error(self, header: dict[str, Any], payload: list[bytes]) -> None:
        if header.get("code") == "resend":
            self._on_resend(header.get("n"))
        else:
            log.error("broker reported an error: %s", header.get("reason"))

    def _on_resend(self, n: Any) -> None:
        """The broker did not take SUBMIT ``n``: an older one never reached it (it
        restarted, say). Send all that are unacknowledged again, in order, unless a
        resend since ``n`` has done so already."""
        if isinstance(n, int) and n >= self._resent_from and self._welcomed:
            log.info("broker %s asked for unacknowledged submits again; resending", self.broker)
            self._resend_unacked()

    def _on_welcome(self, header: dict[str, Any], payload: list[bytes]) -> None:
        try:
            settings = p.welcome_settings(
                header, self._heartbeat, self._liveness, self.max_message_size
            )
        except ProtocolError as exc:  # not welcomed: submits wait; said once, not per HELLO
            if exc.reason != self._refused:
                self._refused = exc.reason
                log.error("refused the broker's welcome (%s): nothing is sent", exc.reason)
            return
        pub = _reachable(header.get("pub", ""), self.broker)
        if pub != self._pub_endpoint:
            if self._pub_endpoint:
                self._sub.disconnect(self._pub_endpoint)
            self._sub.connect(pub)
            self._pub_endpoint = pub
        self._heartbeat, self._liveness, self.max_message_size = settings
        if self._broker_instance and header.get("broker") != self._broker_instance:
            log.warning("broker %s restarted; sending unacknowledged work again", self.broker)
        reconnected = bool(self._broker_instance)
        self._broker_instance = header.get("broker", "")
        self._welcomed = True
        self._resend_unacked()
        for task_id in self._watched:
            self._watched[task_id] = 0.0
        self._fetch_at = 0.0
        if reconnected:
            # Results published while we were away are lost to our SUB (it reconnects
            # on its own, maybe after they went out): FETCH every unfinished one now,
            # rather than one get() at a time, each after fetch_after.
            with self._lock:
                waiting = [slot.id for slot in self._slots.values() if not slot.done.is_set()]
            for task_id in waiting:
                self._watched.setdefault(task_id, 0.0)

    def _on_published(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        header, payload = p.unpack_header(frames[2]), frames[3:]
        handler = self._PUBLISHED.get(frames[1])
        if handler is not None:
            handler(self, header, payload)

    def _on_results(self, header: dict[str, Any], payload: list[bytes]) -> None:
        """A loop turn's results for this client, in one message."""
        results = header.get("results")
        if not isinstance(results, list) or len(results) != len(payload):
            log.warning("dropped a RESULTS message whose header does not match its frames")
            return
        for one, body in zip(results, payload, strict=True):
            if isinstance(one, dict):
                self._on_result(one, [body])

    def _on_running(self, header: dict[str, Any], payload: list[bytes]) -> None:
        """STARTED, RETRY or progress: not final."""
        state = header.get("state", p.STARTED_STATE)
        if state in (p.STARTED_STATE, p.RETRY):
            self._update(header.get("id", ""), state, header, None)

    def _on_result(self, header: dict[str, Any], payload: list[bytes]) -> None:
        task_id = header.get("id", "")
        state = header.get("state", p.PENDING)
        if state in p.FINAL_STATES:
            self._watched.pop(task_id, None)
        self._update(task_id, state, header, payload[0] if payload else None)

    #: What each command on the DEALER does (see _drain for what a handler raises).
    _REPLIES: dict[bytes, Callable[[Any, dict[str, Any], list[bytes]], None]] = {
        p.WELCOME: _on_welcome,
        p.ACCEPTED: _on_accepted,
        p.REJECTED: _on_rejected,
        p.RESULT: _on_result,
        p.STATUS: _on_answer,
        p.DEAD_LETTERS: _on_answer,
        p.REVOKE: _on_answer,
        p.PERIODIC: _on_answer,
        p.HEARTBEAT: _on_heartbeat,
        p.ERROR: _on_error,
    }
    #: What each command on the SUB does.
    _PUBLISHED: dict[bytes, Callable[[Any, dict[str, Any], list[bytes]], None]] = {
        p.RESULT: _on_result,
        p.RESULTS: _on_results,
        p.STARTED: _on_running,
        p.PROGRESS: _on_running,
    }

    def _update(
        self,
        task_id: str,
        state: str,
        header: dict[str, Any],
        payload: Any,
        only_if: str | None = None,
    ) -> None:
        with self._changed:
            slot = self._slots.get(task_id)
            if slot is None:
                return
            slot.seq += 1
            if isinstance(header.get("progress"), dict):
                slot.progress = header["progress"]
            if self._state_queries:
                self._changed.notify_all()
            if slot.done.is_set() or (only_if is not None and slot.state != only_if):
                return
            if state == p.PENDING and slot.state != p.PENDING:
                return  # the broker forgot it (restart); what we saw stays
            slot.state, slot.header, slot.payload = state, header, payload
            if state in p.FINAL_STATES:
                slot.done_at = time.time()
                slot.done.set()

    def _on_tick(self, now: float) -> None:
        if now - self._last_recv > self._heartbeat * self._liveness:
            if not self._unreachable:  # said once, not at every reconnect
                self._unreachable = True
                log.warning(
                    "no word from broker %s for %.1fs; reconnecting until it answers",
                    self.broker,
                    now - self._last_recv,
                )
            self._connect()
            return
        # Every heartbeat, however busy: the broker's answer names its instance, and it
        # is how a client that never falls silent learns the broker restarted (then it
        # says HELLO, resends unacknowledged submits and asks for its results again).
        if now - self._last_beat >= self._heartbeat:
            self._send(p.HEARTBEAT, {})
            self._last_beat = now
        if self._welcomed and now >= self._fetch_at:
            self._fetch_due(now)
            self._fetch_at = min(self._watched.values(), default=float("inf"))

    def _fetch_due(self, now: float) -> None:
        """FETCH the watched results whose wait lapsed (or that were never asked)."""
        due = [task_id for task_id, at in self._watched.items() if at <= now]
        if due:
            with self._lock:  # a result no AsyncResult holds any more: nobody waits
                held = [task_id for task_id in due if task_id in self._slots]
            if len(held) < len(due):
                for task_id in set(due).difference(held):
                    del self._watched[task_id]
                due = held
            for at in range(0, len(due), FETCH_CHUNK):  # each header well under the cap
                chunk = due[at : at + FETCH_CHUNK]
                if self._send(p.FETCH, {"ids": chunk, "wait": FETCH_WAIT}):
                    for task_id in chunk:  # else still due: asked again next tick
                        self._watched[task_id] = now + FETCH_WAIT


def _reachable(endpoint: str, broker: str) -> str:
    """The broker reports its XPUB as bound (maybe ``tcp://0.0.0.0:5556``); reach it
    through the host we already use for the broker."""
    if not endpoint.startswith("tcp://") or not broker.startswith("tcp://"):
        return endpoint
    port = endpoint.rpartition(":")[2]
    host = urlsplit(broker).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class AsyncResult:
    """A handle on one task's outcome, usable from any thread of any process.

    ``status`` asks the broker unless the outcome is already known here; ``get()``
    waits for the result, raising :class:`zq.TaskFailed` if the task raised.
    """

    def __init__(
        self,
        task_id: str,
        client: Client,
        *,
        _slot: _Slot | None = None,
        ignore_result: bool = False,
    ) -> None:
        self.id = task_id
        self._client = client
        self._slot = _slot or client.slot(task_id)
        self._ignore_result = ignore_result

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self._slot.state}>"

    @property
    def status(self) -> str:
        """PENDING, QUEUED, STARTED, RETRY, SUCCESS, FAILURE, DEAD or REJECTED."""
        if self._slot.done.is_set():
            return self._slot.state
        return self._client.query_state(self._slot, timeout=5.0)

    state = status

    def ready_here(self) -> bool:
        """True if this process already knows the final state (no broker round trip)."""
        return self._slot.done.is_set()

    def ready(self) -> bool:
        """True once the task reached a final state."""
        return self.status in p.FINAL_STATES

    def successful(self) -> bool:
        return self.status == p.SUCCESS

    def failed(self) -> bool:
        return self.status in (p.FAILURE, p.DEAD)

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> Any:
        """Wait for the task and return its value.

        Raises :class:`zq.TimeoutError` if it has not finished within ``timeout`` seconds,
        :class:`zq.TaskFailed` if it raised (unless ``propagate`` is False, which
        returns the failure instead), :class:`zq.TaskRejected` if the broker refused it.
        """
        if self._ignore_result:
            raise ResultUnavailable(self.id, f"task {self.id} was sent with ignore_result")
        slot = self._slot
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        if not slot.done.is_set():
            first = self._client.fetch_after if slot.mine else 0.0
            if timeout is not None:
                first = min(first, timeout)
            if not slot.done.wait(first):
                self._client.watch(self.id)
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not slot.done.wait(remaining):
                    raise self._client.wait_failed(slot, timeout, started)
        return self._outcome(propagate)

    def _outcome(self, propagate: bool) -> Any:
        slot = self._slot
        if slot.state == p.SUCCESS:
            return p.decode(slot.payload) if slot.payload else None
        if slot.state == p.REJECTED_STATE:
            raise TaskRejected(self.id, slot.header.get("reason", "rejected"))
        info = p.decode(slot.payload) if slot.payload else {}
        error = TaskFailed(
            self.id,
            info.get("type", "Exception"),
            info.get("message", ""),
            info.get("traceback", ""),
        )
        if propagate:
            raise error
        return error

    @property
    def progress(self) -> dict[str, Any] | None:
        """The latest progress report of the running task (``{"done", "total", "note"}``,
        see :func:`zq.current_task`), asked of the broker; None if none came yet."""
        if not self._slot.done.is_set():
            self._client.query_state(self._slot, timeout=5.0)
        return self._slot.progress

    def revoke(self, *, terminate: bool = False, timeout: float = 5.0) -> str:
        """Revoke the task: if it waits (queued, scheduled, waiting to retry) it ends
        REVOKED and never runs. If it runs, ``terminate=True`` has its worker kill the
        process running it (that run only; process pool) and it ends REVOKED;
        without ``terminate`` it runs on. Returns what the broker did: ``revoked``,
        ``terminating``, ``running``, ``finished`` or ``unknown``."""
        return self._client.revoke([self.id], terminate=terminate, timeout=timeout)[self.id]

    @property
    def date_done(self) -> float | None:
        """Wall-clock time (``time.time()``) this process learnt the outcome, else None."""
        return self._slot.done_at or None

    @property
    def result(self) -> Any:
        """The value (or failure) if the task finished, else None; does not wait."""
        if not self._slot.done.is_set():
            return None
        return self._outcome(propagate=False)

    @property
    def traceback(self) -> str | None:
        """The remote traceback of a failed task, else None."""
        outcome = self.result
        return outcome.remote_traceback if isinstance(outcome, TaskFailed) else None
