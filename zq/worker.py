"""The worker supervisor: one thread that owns the DEALER and the pool.

The supervisor loop polls the broker socket and the pool's pipes, so it heartbeats
at all times, whatever the tasks are doing. It announces its slots in READY; the
broker never sends more tasks than that (credit), and the supervisor forwards each
task to the pool and each STARTED/DONE back to the broker.

The broker answers each HEARTBEAT at once, echoing its send time: a lease. If no
answer confirms a message sent in the last fence time (1.5 heartbeats), whichever
way the network failed, the supervisor gives that connection up: the broker may soon
declare this worker dead and give its tasks to others. It hands back the tasks it
holds unstarted, drops its socket with whatever is still unread in it (TASKs sent
before the silence, which another worker may run by now), connects again and says
READY with the ids of the tasks it still runs, so the broker can re-attach them. A
worker frozen (SIGSTOP) past the fence does the same before it starts anything when
it thaws. ``stop()`` may be called from a signal handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from zq import protocol as p
from zq import wire
from zq.address import check_broker_url
from zq.app import DEFAULT_BROKER, DEFAULT_QUEUE, App, default_broker, load_app
from zq.errors import ProtocolError, WorkerError
from zq.message import with_inputs
from zq.pool import DONE, STARTED, Done, Event, Progress, Started, ThreadPool, returned, unknown
from zq.procpool import Limits, ProcessPool
from zq.security import ClientCurve
from zq.settings import setting

log = logging.getLogger("zq.worker")

#: Seconds after a DONE message during which the next DONEs wait to go together.
DONE_GAP = 0.001


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """How a worker connects and runs tasks: each field's help is ``zq worker --help``'s."""

    broker: str = setting(
        default_factory=default_broker,  # $ZQ_BROKER, else DEFAULT_BROKER
        help="Broker address.",
        shown=DEFAULT_BROKER,
    )
    concurrency: int = setting(
        default_factory=lambda: os.cpu_count() or 1, help="Tasks run at once.", shown="CPU count"
    )
    pool: str = setting(
        "process",
        help="Run tasks in child processes (CPU-bound work) or threads (I/O-bound).",
    )
    queues: tuple[str, ...] = setting(
        (DEFAULT_QUEUE,), help="Queues to take tasks from, in order of preference."
    )
    heartbeat: float = setting(
        1.0, help="Heartbeat period in seconds, until the broker's WELCOME says otherwise."
    )
    limits: Limits = setting(  # noqa: RUF009 (it makes a dataclasses.field)
        default_factory=Limits, help="Time limits and child replacement (process pool only)."
    )
    shutdown_timeout: float = setting(
        30.0,
        help="On SIGTERM or Ctrl-C, seconds running tasks may take to finish before the rest "
        "are handed back to the broker (a second signal stops at once).",
    )
    curve: ClientCurve | None = setting(  # noqa: RUF009 (as above)
        None, help="This peer's keys, for a CURVE broker.", shown="plain"
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.concurrency > p.MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be <= {p.MAX_CONCURRENCY}, got {self.concurrency}")
        if self.pool not in ("process", "thread"):
            raise ValueError(f"pool must be 'process' or 'thread', got {self.pool!r}")
        if not self.queues or not all(self.queues):
            raise ValueError("queues must name at least one queue")
        check_broker_url(self.broker, what="--broker")  # here, not as a ZMQError later


class Worker:
    """Runs tasks of the app named by ``spec`` (``module:attr``) for one broker."""

    def __init__(self, spec: str, settings: WorkerSettings | None = None) -> None:
        self.spec = spec
        self.settings = settings or WorkerSettings()
        self.app: App = load_app(spec)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._heartbeat = self.settings.heartbeat
        self._fence = _fence_after(self._heartbeat)
        # The lease: when this worker sent the latest message the broker has answered
        # (a HEARTBEAT or READY it echoed), on this process's monotonic clock. The
        # broker heard this worker at that time or later, so it declares it dead no
        # sooner than the dead-after window from it; see _fence_after.
        self._confirmed = 0.0
        self._connected_at = 0.0
        # Since when no broker has answered (None: it answers): the log says so once
        # and says when it answers again, not at every reconnect.
        self._silent_since: float | None = None
        self._welcomed = False  # a broker has welcomed this worker once
        self._last_ping = 0.0
        self._running = False
        # DONEs the broker has not acknowledged yet (it acks after its journal commit);
        # sent again after every reconnect, so a result outlives a broker outage.
        self._outbox: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._deliveries: dict[str, int | None] = {}  # running task id -> its delivery
        self._dones: list[tuple[dict[str, Any], bytes]] = []  # to send, together
        self._started: list[str] = []  # ids to report STARTED, with the next DONEs
        self._dones_due = 0.0  # when the next DONE message may go (DONE_GAP after one)
        self._draining_until: float | None = None
        self._closed = False
        self._announced_drain = False
        self._max_message = p.DEFAULT_MAX_MESSAGE  # the broker's limit, from WELCOME
        self._dropped = 0  # malformed messages from the broker, dropped
        # Prefetched tasks wait here; if no slot frees for this many seconds (from the
        # broker's WELCOME; None: never), they go back to the broker for other workers.
        self._give_back: float | None = None
        self._stalled_since: float | None = None  # tasks waiting, and no slot freed since
        self.failure: str | None = None  # why it stopped on its own (see _give_up)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def stop(self) -> None:
        """Stop gracefully: take no new tasks, let running ones finish (up to the
        shutdown timeout), hand the rest back. A second call stops at once. Safe from a
        signal handler or another thread."""
        if self._draining_until is None:
            # Also before run() got going: it then drains (and stops) at once.
            self._draining_until = time.monotonic() + self.settings.shutdown_timeout
        else:
            self._running = False
        if self._closed:
            return  # run() has ended; its wake-up pipe is gone
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        """Serve until :meth:`stop`; raises :class:`WorkerError` if the worker
        stopped because its pool could not run tasks."""
        s = self.settings
        fence = self._fence
        self.pool: ProcessPool | ThreadPool = (
            ProcessPool(self.app, self.spec, s.concurrency, fence_after=fence, limits=s.limits)
            if s.pool == "process"
            else ThreadPool(self.app, s.concurrency, fence_after=fence)
        )
        if s.pool == "thread" and s.limits != Limits():
            log.warning("time limits and child replacement need --pool process; ignored")
        self.pool.start()
        self._ctx = zmq.Context()
        self._dealer: zmq.Socket | None = None
        self._connect()
        self._running = True
        log.info(
            "worker %s serving %s on %s (%d %s slots, queues %s)",
            self.id,
            self.spec,
            s.broker,
            s.concurrency,
            s.pool,
            ",".join(s.queues),
        )
        try:
            self._loop()
        finally:
            self.pool.close()
            if self._dealer is not None:
                # The broker hands back whatever is left (a shutdown is not a crash).
                self._send(p.DISCONNECT, {})
                self._dealer.close(linger=500)
            self._ctx.term()
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self.failure is not None:
            raise WorkerError(self.failure)

    def _loop(self) -> None:
        poller = zmq.Poller()
        registered: list[Any] = []
        while self._running:
            if self.pool.changed or registered[:1] != [self._dealer]:
                for item in registered:
                    poller.unregister(item)
                registered = [self._dealer, self._wake_r, *self.pool.fds()]
                for item in registered:
                    poller.register(item, zmq.POLLIN)
            events = dict(poller.poll(self._poll_timeout()))
            if self._renew_if_silent(time.monotonic()):
                continue  # first: a thawed worker must start nothing it held
            self._on_pool_events(self.pool.tick())
            if self.pool.failure is not None and self.failure is None:
                self._give_up(self.pool.failure)
            pool_events: list[Event] = []
            for item in events:
                if item is self._dealer:
                    self._drain_broker()
                elif item == self._wake_r:
                    os.read(self._wake_r, 4096)
                else:
                    pool_events += self.pool.on_readable(item)
            self._on_pool_events(pool_events + self.pool.started())
            now = time.monotonic()
            self._give_back_if_stalled(now)
            self._flush_dones(now)
            self._on_tick(now)

    def _poll_timeout(self) -> float:
        """Milliseconds: a quarter heartbeat, or less when waiting tasks are due back,
        DONEs due out, or the pool due to act (a hard time limit: a long heartbeat must
        not make one late)."""
        timeout = self._heartbeat * 250
        due = self.pool.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()) * 1000)
        if self._dones or self._started:  # held back: see _flush_dones
            timeout = min(timeout, max(0.0, self._dones_due - time.monotonic()) * 1000)
        if self._stalled_since is not None and self._give_back is not None:
            due = self._stalled_since + self._give_back - time.monotonic()
            timeout = min(timeout, max(0.0, due) * 1000)
        return timeout

    def _give_up(self, why: str) -> None:
        """The pool cannot run tasks: hand back those waiting, stop (as on SIGTERM),
        and have :meth:`run` raise: better a worker that exits, for its process manager
        and its operator to see, than one that takes tasks it cannot run."""
        self.failure = why
        log.error("%s; this worker stops", why)
        self._give_back_waiting(None)
        self.stop()

    def _give_back_if_stalled(self, now: float) -> None:
        """Hand the broker back the tasks waiting here (prefetched) once no slot has
        freed for ``give_back`` seconds: long tasks took every slot, so another worker
        should run them. Each goes back as DONE LOST with ``returned`` (not a crash) and,
        as its run time, how long the slots were stuck: the broker's automatic prefetch
        then sends this worker no more than its slots."""
        if self._give_back is None or not self.pool.waiting():
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since >= self._give_back:
            stuck = now - self._stalled_since
            self._stalled_since = None
            given = self._give_back_waiting(stuck)
            log.info("gave %d waiting tasks back: no slot freed for %.2fs", given, stuck)

    def _give_back_waiting(self, stuck: float | None) -> int:
        """Take back the tasks no slot has started, each reported DONE LOST with
        ``returned`` (the broker requeues them, not counted as redeliveries); returns
        how many."""
        ids = self.pool.withdraw()
        for task_id in ids:
            self._on_pool_event(returned(task_id, stuck))
        return len(ids)

    def _renew_if_silent(self, now: float) -> bool:
        """Give the connection up if the broker has answered none of this worker's
        messages sent in the last fence time (and the connection is older than that);
        returns whether it did.

        The broker may declare this worker dead 3 heartbeats after the last message it
        heard from it (see :func:`_fence_after`) and give its tasks, and their keys, to
        other workers. So nothing this worker holds unstarted may start, and nothing
        still unread on this connection may be trusted: a TASK read after the silence
        (the worker was frozen, or the network held it) may be running elsewhere by
        now. The tasks waiting here go back (to the outbox: the broker gets them after
        the WELCOME, or already gave them to others), the socket goes with what it
        holds, and READY on a new one claims only what runs. Keyed tasks given to a
        child process stop now: the children stop them on their own at the fence, but
        children frozen with this process may thaw after the new connection made the
        silence look over. (A thread pool cannot stop a running task.)"""
        silent = now - max(self._confirmed, self._connected_at)
        if silent <= self._fence:
            return False
        self._on_pool_events(self.pool.fence())
        given = self._give_back_waiting(None)
        self._log_silence(now, silent, given)
        self._connect()
        return True

    def _log_silence(self, now: float, silent: float, given: int) -> None:
        """Say once that the broker went silent (at every reconnect it stays so: debug),
        and again if the reconnect handed tasks back."""
        broker = self.settings.broker
        if self._silent_since is None:
            self._silent_since = now - silent
            if self._welcomed:
                log.warning(
                    "lost broker %s: no answer for %.1fs; reconnecting until it answers "
                    "(%d waiting tasks handed back)",
                    broker,
                    silent,
                    given,
                )
            else:
                log.warning(
                    "no answer from broker %s yet (%.1fs); waiting for it: is it running there?",
                    broker,
                    silent,
                )
        elif given:
            log.warning("still no answer from broker %s; %d tasks handed back", broker, given)
        else:
            log.debug(
                "still no answer from broker %s after %.1fs; reconnecting",
                broker,
                now - self._silent_since,
            )

    def _drained(self, now: float) -> bool:
        """While stopping: True once nothing runs and every DONE is acknowledged, or
        the shutdown timeout has passed."""
        if self._draining_until is None:
            return False
        if not self._announced_drain:
            self._announced_drain = True
            log.info(
                "stopping: no new tasks; waiting up to %.0fs for %d running",
                self.settings.shutdown_timeout,
                len(self._deliveries),
            )
            self._ready()  # READY with draining: the broker sends no more tasks
        return (not self._deliveries and not self._outbox) or now >= self._draining_until

    # ----------------------------------------------------------------- broker

    def _connect(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.linger = 0
        self._dealer.maxmsgsize = p.PEER_MAX_MESSAGE
        if self.settings.curve is not None:
            self.settings.curve.apply(self._dealer)
        self._dealer.connect(self.settings.broker)
        self._connected_at = time.monotonic()
        self._dones = []  # all in the outbox, sent again after the WELCOME
        self._started = []  # READY says what runs
        self._ready()

    def _ready(self) -> None:
        # Until the WELCOME, further "unknown worker" errors are echoes of messages sent
        # before this READY: answering them with another READY could make the broker
        # take back a TASK that is already on its way here.
        self._awaiting_welcome = True
        self._send(
            p.READY,
            {
                "worker": self.id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "concurrency": self.settings.concurrency,
                "queues": list(self.settings.queues),
                "tasks": sorted(self.app.tasks),
                "running": self._held(),
                "draining": self._draining_until is not None,
                "periodic": [schedule.to_wire() for schedule in self.app.schedules.values()],
                "t": time.monotonic(),  # the WELCOME echoes it: see _confirm
            },
        )

    def _held(self) -> dict[str, int | None]:
        """Task id -> delivery, for each task this worker runs or holds a DONE for: the
        broker re-attaches an id only under the same delivery."""
        held = {task_id: self._deliveries.get(task_id) for task_id in self.pool.running()}
        for task_id, (done_header, _) in self._outbox.items():
            held[task_id] = done_header.get("delivery")
        return held

    def _send(self, command: bytes, header: dict[str, Any], *payload: Any) -> None:
        """Send without ever blocking the supervisor (it must keep fencing and ticking).
        Dropped when there is no connection to send on: DONEs wait in the outbox and
        READY is said again after the reconnect."""
        self._send_packed(command, p.pack_header(header), *payload)

    def _send_packed(self, command: bytes, header: bytes, *payload: Any) -> bool:
        """Send now or not at all (the queue to the broker is full, or there is no
        connection); returns whether it was sent."""
        assert self._dealer is not None
        try:
            wire.send(self._dealer, [p.WORKER, command, header, *payload], zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _drain_broker(self) -> None:
        assert self._dealer is not None
        while True:
            try:
                frames = wire.recv_bytes(self._dealer, zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            if self._renew_if_silent(now):  # frozen since the last read, say
                return  # this message and the rest are dropped with the socket
            try:
                self._handle(*p.parse(frames))
            except (ProtocolError, ValueError, TypeError, AttributeError) as exc:
                self._dropped += 1
                log.warning("dropped a malformed message from the broker: %s", exc)

    def _handle(self, tag: bytes, command: bytes, header: dict[str, Any], payload: list) -> None:
        handler = self._HANDLERS.get(command)
        if handler is not None:  # (else a command no broker sends a worker: ignored)
            handler(self, header, payload)

    def _on_tasks(self, header: dict[str, Any], payload: list) -> None:
        """TASK: one task, or several in one message (``tasks``)."""
        if not payload:
            raise ProtocolError("TASK without a payload")
        batch = header.get("tasks")
        if batch is None:
            self._on_task(header, payload[0], payload[1:])
            return
        # Several tasks in one message: each has its payload frame, then as many
        # input frames (a workflow step's parents' results) as its "inputs" says.
        at = 0
        for task_header in batch:
            inputs = task_header.get("inputs", 0) if isinstance(task_header, dict) else 0
            if not isinstance(task_header, dict) or at + 1 + inputs > len(payload):
                raise ProtocolError("TASK batch does not match its frames")
            self._on_task(task_header, payload[at], payload[at + 1 : at + 1 + inputs])
            at += 1 + inputs

    def _on_heartbeat(self, header: dict[str, Any], payload: list) -> None:
        self._confirm(header.get("t"))

    def _on_welcome(self, header: dict[str, Any], payload: list) -> None:
        """WELCOME: the broker's settings, and the lease it confirms; every DONE it
        has not acknowledged goes again."""
        heartbeat, _, max_message = p.welcome_settings(
            header, self._heartbeat, 3, self._max_message
        )
        self._heartbeat, self._max_message = heartbeat, max_message
        give_back = header.get("give_back")
        self._give_back = float(give_back) if isinstance(give_back, (int, float)) else None
        self._fence = _fence_after(heartbeat)
        self.pool.set_fence(self._fence)
        # Before the TASKs that follow it in this read are handed over: a pool
        # starts no keyed task while the lease looks expired.
        self._confirm(header.get("t"))
        self._awaiting_welcome = False
        if self._silent_since is not None:
            # A warning, as the silence was: at --log-level warning both show.
            log.warning(
                "broker %s answers%s, after %.1fs",
                self.settings.broker,
                " again" if self._welcomed else "",
                time.monotonic() - self._silent_since,
            )
            self._silent_since = None
        self._welcomed = True
        # Every DONE not acknowledged yet, again, in this turn's DONE batches: one
        # message each could overflow the socket's queue (thousands with prefetch).
        self._dones = list(self._outbox.values())

    def _on_error(self, header: dict[str, Any], payload: list) -> None:
        if header.get("code") == "unknown-worker":
            if not self._awaiting_welcome:
                log.warning("broker does not know this worker (any more); saying READY")
                self._ready()
        else:
            log.error("broker reported an error: %s", header.get("reason"))

    def _confirm(self, sent: Any) -> None:
        """The broker echoed ``sent``, the time this worker sent a HEARTBEAT or READY
        it has heard: the lease runs from there (the pool's children fence on it)."""
        if type(sent) is float and self._confirmed < sent <= time.monotonic():
            self._confirmed = sent
            self.pool.set_lease(sent)

    def _on_task(self, header: dict[str, Any], payload: bytes, inputs: list[bytes]) -> None:
        task_id, delivery = header.get("id"), header.get("delivery")
        if not (
            isinstance(task_id, str)
            and isinstance(header.get("name"), str)
            and (delivery is None or isinstance(delivery, int))
        ):
            self._dropped += 1
            log.warning("dropped a TASK with a bad header (id, name or delivery)")
        elif task_id in self._outbox and self._outbox[task_id][0]["state"] != p.LOST:
            # Sent again (the broker lost our DONE's delivery): the result is here already.
            done_header, body = self._outbox[task_id]
            done_header["delivery"] = delivery
            self._send(p.DONE, done_header, body)
        elif task_id in self._deliveries:
            # Sent again while it still runs here (the broker had given up on this
            # worker): the run in progress answers the new delivery.
            self._deliveries[task_id] = delivery
        elif header["name"] not in self.app.tasks:
            # The broker thought this worker had the name (a READY from before it was
            # unregistered, say): hand it back, and the broker sends it no more of it.
            self._deliveries[task_id] = delivery
            self._on_pool_event(unknown(self.app, task_id, header["name"]))
        elif self._draining_until is not None:
            # Sent before the broker read our draining READY, which does not claim it:
            # the broker puts it back for other workers. Run here too, it could run
            # twice, beside its key's next task. Handed back (stale to the broker if
            # it has sent it on already).
            self._deliveries[task_id] = delivery
            self._on_pool_event(returned(task_id))
        else:
            # A LOST still in the outbox (its process died, or it was given back) is no
            # result: the broker sends the task again to have it run, so it runs.
            self._outbox.pop(task_id, None)
            self._deliveries[task_id] = delivery
            expires = header.get("expires")
            if isinstance(expires, (int, float)) and expires <= time.time():
                # It waited past its expiry time on the way here (prefetch, or clocks).
                why = f"task {task_id} expired before this worker started it"
                self._end_unrun(task_id, p.EXPIRED, "zq.Expired", why)
                return
            if "pass" in header:  # a workflow step: its parents' results come first
                try:
                    payload = with_inputs(header, payload, inputs)
                except Exception as exc:  # fail the task: dropping it would lose it
                    why = f"could not give it its parents' results: {exc}"
                    self._end_unrun(task_id, p.FAILURE, "zq.BadInput", why)
                    return
            self.pool.submit(header, payload)

    def _on_accepted(self, header: dict[str, Any], payload: list) -> None:
        """The broker has these DONEs in its journal: let them go. An acknowledgement
        names the delivery it is for, so a late one about an earlier report (a LOST
        sent again after a reconnect) does not take the DONE of a later run with it."""
        ids, deliveries = header.get("ids", ()), header.get("deliveries")
        if not isinstance(deliveries, list) or len(deliveries) != len(ids):
            deliveries = [None] * len(ids)  # an older broker: by id alone
        for task_id, delivery in zip(ids, deliveries, strict=True):
            entry = self._outbox.get(task_id)
            if entry is not None and (delivery is None or entry[0].get("delivery") == delivery):
                del self._outbox[task_id]

    def _end_unrun(self, task_id: str, state: str, kind: str, why: str) -> None:
        """Report a task this worker ends without running it (no run time: it must not
        count in the broker's average of this worker's run times)."""
        self._on_pool_event(Done(task_id, state, p.failure(kind, why), None, {}))

    def _on_revoke(self, header: dict[str, Any], payload: list) -> None:
        """Stop a run the broker revoked, if it is that very run (same delivery)."""
        task_id, delivery = header.get("id"), header.get("delivery")
        if not isinstance(task_id, str) or task_id not in self._deliveries:
            return  # it ended meanwhile: its DONE is on its way
        if delivery is not None and self._deliveries[task_id] != delivery:
            return  # about an earlier assignment of the same task
        events = self.pool.terminate(task_id)
        if events is None:
            log.warning("cannot stop task %s: a thread pool runs tasks to their end", task_id)
            return
        log.info("task %s revoked and stopped", task_id)
        self._on_pool_events(events)

    #: What each command from the broker does (a handler's ProtocolError, ValueError,
    #: TypeError or AttributeError drops the message: see _drain_broker).
    _HANDLERS: dict[bytes, Callable[[Any, dict[str, Any], list], None]] = {
        p.TASK: _on_tasks,
        p.HEARTBEAT: _on_heartbeat,
        p.ACCEPTED: _on_accepted,
        p.REVOKE: _on_revoke,
        p.WELCOME: _on_welcome,
        p.ERROR: _on_error,
    }

    def _on_pool_events(self, events: list[Event]) -> None:
        """Report a turn's pool events; a task that started and ended within the turn
        needs no STARTED (a short task: a message per task saved)."""
        if not events:
            return
        ended = {event.task_id for event in events if event.kind == DONE}
        if ended:
            self._stalled_since = None  # a slot freed: waiting tasks will start
        for event in events:
            if event.kind != STARTED or event.task_id not in ended:
                self._on_pool_event(event)

    def _on_pool_event(self, event: Event) -> None:
        self._ON_POOL_EVENT[type(event)](self, event)

    def _report_started(self, event: Started) -> None:
        self._started.append(event.task_id)

    def _report_progress(self, event: Progress) -> None:
        task_id = event.task_id
        if task_id in self._deliveries:
            delivery = self._deliveries[task_id]
            self._send(p.PROGRESS, {"id": task_id, "delivery": delivery, "progress": event.info})

    def _report_done(self, event: Done) -> None:
        """Put a task's DONE in the outbox (until the broker acknowledges it) and in
        the next DONE message."""
        task_id, state, body, extras = event.task_id, event.state, event.body, event.extras
        if extras.get("unknown"):
            log.warning("handed task %s back: %s", task_id, p.decode(body)["message"])
        if len(body) > self._max_message - p.ENVELOPE:
            # Sent as is, it would make the broker drop this connection (again and
            # again, from the outbox): fail the task with the reason instead.
            state, extras = p.FAILURE, {}
            body = p.failure(
                "zq.ResultTooLarge",
                f"the result is {len(body)} bytes; the broker accepts "
                f"{self._max_message} per message",
            )
        header = {
            "id": task_id,
            "state": state,
            "worker": self.id,
            "runtime": event.runtime,
            "delivery": self._deliveries.pop(task_id, None),
            **extras,
        }
        self._outbox[task_id] = (header, body)
        self._dones.append((header, body))

    #: How each pool event is reported to the broker.
    _ON_POOL_EVENT: dict[type[Event], Callable[[Any, Any], None]] = {
        Started: _report_started,
        Progress: _report_progress,
        Done: _report_done,
    }

    def _flush_dones(self, now: float) -> None:
        """Send the STARTEDs and DONEs since the last send: one STARTED message, and
        one DONE message for all the DONEs (within half the size limit): one send here
        and one receive at the broker instead of many. While tasks wait here for a
        slot, they wait for DONE_GAP after the previous send to pass: a process pool
        ends about one task per loop turn, and a message per task cost the broker 2.5
        times the CPU per task of batches (and a TASK back per DONE). With no task
        waiting they go at once: a slot is free or soon will be, and the broker's
        answer (the next task, the caller's result) should not wait. A task that ended
        meanwhile needs no STARTED."""
        if not self._dones and not self._started:
            return
        if now < self._dones_due and self.pool.waiting():
            return
        self._dones_due = now + DONE_GAP
        if self._started:
            self._send_started()
        dones, self._dones = self._dones, []
        budget, header_budget = self._max_message // 2, p.MAX_HEADER_BYTES - p.HEADER_SLACK
        headers: list[bytes] = []
        bodies: list[bytes] = []
        size = header_size = first = 0
        for at, (header, body) in enumerate(dones):
            packed = p.pack_header(header)
            if headers and (size + len(body) > budget or header_size + len(packed) > header_budget):
                if not self._send_dones(headers, bodies):
                    self._dones = dones[first:]  # the queue is full: the rest next turn
                    return
                headers, bodies, size, header_size, first = [], [], 0, 0, at
            headers.append(packed)
            bodies.append(body)
            size += len(body)
            header_size += len(packed)
        if headers and not self._send_dones(headers, bodies):
            self._dones = dones[first:]

    def _send_started(self) -> None:
        """One STARTED for the tasks reported started that still run here."""
        ids = [task_id for task_id in self._started if task_id in self._deliveries]
        self._started = []
        if len(ids) == 1:
            self._send(p.STARTED, {"id": ids[0], "delivery": self._deliveries[ids[0]]})
        elif ids:
            deliveries = [self._deliveries[task_id] for task_id in ids]
            self._send(p.STARTED, {"ids": ids, "deliveries": deliveries})

    def _send_dones(self, headers: list[bytes], bodies: list[bytes]) -> bool:
        """One DONE message: a lone DONE as itself, more as a batch (``done``)."""
        header = headers[0] if len(headers) == 1 else p.pack_list("done", headers)
        return self._send_packed(p.DONE, header, *bodies)

    def _on_tick(self, now: float) -> None:
        if self._drained(now):
            self._running = False
        elif now - self._last_ping >= self._heartbeat / 2 and self._send_packed(
            p.HEARTBEAT, p.pack_header({"t": now})
        ):
            self._last_ping = now  # however busy the connection: each renews the lease


def _fence_after(heartbeat: float) -> float:
    """Seconds after the send time of the latest message the broker confirmed (the
    lease) at which keyed tasks are stopped, no held task is started and the
    connection is given up.

    The broker heard that message at its send time or later, so it declares this
    worker dead (liveness 3) no sooner than 3 heartbeats after it: keyed tasks stop
    at least 1.35 heartbeats before their keys can go elsewhere (1.5, less the
    children's check interval), however the worker was cut off or frozen, in either
    direction. A healthy worker heartbeats every heartbeat/2 (+ heartbeat/4 of loop
    granularity) and is answered at once, so its lease is never older than
    0.75 heartbeats plus a round trip. See docs/protocol.md, "Fencing"."""
    return 1.5 * heartbeat
