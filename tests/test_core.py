"""The broker's core (zq.tasks, zq.reports, zq.workers) driven without sockets.

A hypothesis state machine plays clients and workers against the core: submits of
keyed tasks, workers that connect, finish, retry, crash, re-attach after a
reconnect, and revokes with and without terminate, in any order. What the core
sends is read from its outbox, as a worker would read it. After every step:
nothing accepted is lost, a final state never changes, no key is held twice, and a
task revoked with terminate is never sent to a worker again.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zq import protocol as p
from zq.broker import BrokerSettings
from zq.outbox import Outbox, finish_out
from zq.reports import Reports
from zq.tasks import RETRY, Tasks
from zq.workers import Peer, Workers

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def quiet_broker_log():
    """The core logs what an operator should see (unserved names, dead letters)."""
    logger = logging.getLogger("zq.broker")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


KEYS = (None, "k1", "k2")
WORKERS = (b"w1", b"w2")
NAME = "t.score"


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counters: Counter[str] = Counter()
        self.outbox = Outbox(p.DEFAULT_MAX_MESSAGE)
        self.workers = Workers()
        core_settings = BrokerSettings(prefetch=0, max_redeliveries=2)
        self.tasks = Tasks(core_settings, self.counters, self.outbox, self.workers)
        self.reports = Reports(self.tasks)
        self.n = 0
        self.accepted: set[str] = set()
        self.final: dict[str, str] = {}  # task id -> the final state first seen
        self.held: dict[bytes, dict[str, int]] = {}  # worker -> task id -> delivery
        self.connections: dict[bytes, int] = {}  # worker -> its connection number
        self.terminated: set[str] = set()  # revoked with terminate while running

    # ------------------------------------------------------------ helpers

    def ident(self, wid: bytes) -> bytes:
        return wid + b"#" + str(self.connections[wid]).encode()

    def deliver(self) -> None:
        """Read what the core sent: TASKs to workers, acknowledgements."""
        _, out, _ = self.outbox.take()
        for frames in out:
            frames = finish_out(frames)
            if frames[2] != p.TASK:
                continue
            header = p.unpack_header(frames[3])
            wid = frames[0].split(b"#")[0]
            for one in header.get("tasks", [header]):
                assert one["id"] not in self.terminated, "a terminated task was sent again"
                assert one["id"] not in self.final, "a finished task was sent again"
                self.held.setdefault(wid, {})[one["id"]] = one["delivery"]
        for task_id in self.accepted:
            state = self.tasks.state_of(task_id)
            if state in p.FINAL_STATES:
                assert self.final.setdefault(task_id, state) == state, "a final state changed"
        for tid in list(self.final):
            for held in self.held.values():
                held.pop(tid, None)

    def report(self, wid: bytes, tid: str, state: str, **extra: object) -> None:
        delivery = self.held[wid].pop(tid)
        header = {"id": tid, "state": state, "delivery": delivery, "runtime": 0.01, **extra}
        peer = self.workers.find(wid)
        assert peer is not None
        self.reports.done(peer, header, b"\x90", [])
        self.deliver()

    def a_held(self, data: st.DataObject) -> tuple[bytes, str]:
        pairs = sorted(
            (w, t) for w, held in self.held.items() for t in held if self.workers.find(w)
        )
        return data.draw(st.sampled_from(pairs))

    def has_held(self) -> bool:
        return any(held and self.workers.find(w) for w, held in self.held.items())

    # -------------------------------------------------------------- rules

    @rule(key=st.sampled_from(KEYS))
    def submit(self, key: str | None) -> None:
        self.n += 1
        header = {"id": f"t{self.n}", "name": NAME, "queue": "default"}
        if key is not None:
            header["key"] = key
        accepted, rejected = self.tasks.submit("c", [header], [p.encode([[], {}])])
        assert accepted == [f"t{self.n}"] and not rejected
        self.accepted.add(f"t{self.n}")
        self.deliver()

    @rule(wid=st.sampled_from(WORKERS), keep=st.booleans())
    def ready(self, wid: bytes, keep: bool) -> None:
        """A worker (re)connects: on a new connection, claiming what it holds, or not
        (it lost it: those go back)."""
        self.connections[wid] = self.connections.get(wid, 0) + 1
        running = dict(self.held.get(wid, {})) if keep else {}
        self.held[wid] = running
        peer = Peer(self.ident(wid), wid, {"worker": wid.decode()}, 0.0, slots=2)
        peer.ready_sent = float(self.connections[wid])
        self.workers.register(peer)
        self.reports.worker_ready(peer, ["default"], running, [NAME])
        self.deliver()

    @precondition(lambda self: self.has_held())
    @rule(data=st.data(), state=st.sampled_from([p.SUCCESS, p.FAILURE]))
    def finish(self, data: st.DataObject, state: str) -> None:
        wid, tid = self.a_held(data)
        self.report(wid, tid, state)
        assert self.tasks.state_of(tid) == state or tid in self.terminated

    @precondition(lambda self: self.has_held())
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        wid, tid = self.a_held(data)
        self.report(wid, tid, p.RETRY, countdown=0)

    @precondition(lambda self: self.has_held())
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """The process running it died: LOST, run again or given up on (DEAD)."""
        wid, tid = self.a_held(data)
        self.report(wid, tid, p.LOST)

    @precondition(lambda self: self.has_held())
    @rule(data=st.data())
    def stopped_by_revoke(self, data: st.DataObject) -> None:
        wid, tid = self.a_held(data)
        self.report(wid, tid, p.REVOKED)

    @rule()
    def retry_delays_run_out(self) -> None:
        for kind, tid in self.tasks.timers.due(float("inf")):
            if kind == RETRY:
                self.tasks.due(kind, tid)
        self.deliver()

    @precondition(lambda self: any(self.workers.find(w) for w in WORKERS))
    @rule(data=st.data(), counts=st.booleans())
    def worker_dies(self, data: st.DataObject, counts: bool) -> None:
        wid = data.draw(st.sampled_from([w for w in WORKERS if self.workers.find(w)]))
        peer = self.workers.find(wid)
        assert peer is not None
        self.workers.remove(peer)
        self.tasks.worker_gone(wid, counts=counts)
        self.held[wid] = {}
        self.deliver()

    @precondition(lambda self: self.accepted)
    @rule(data=st.data(), terminate=st.booleans())
    def revoke(self, data: st.DataObject, terminate: bool) -> None:
        tid = data.draw(st.sampled_from(sorted(self.accepted)))
        task = self.tasks.dispatch.tasks.get(tid)
        waiting = task is not None and task.worker is None  # queued or waiting to retry
        reply = self.tasks.revoke([tid], terminate)
        outcome = next(o for o, ids in reply.items() if tid in ids)
        if waiting:
            assert outcome == "revoked"
            assert self.tasks.state_of(tid) == p.REVOKED
        if outcome == "terminating":
            self.terminated.add(tid)
        self.deliver()

    # --------------------------------------------------------- invariants

    @invariant()
    def nothing_accepted_is_lost(self) -> None:
        for tid in self.accepted:
            assert self.tasks.state_of(tid) != p.PENDING, f"{tid} was lost"

    @invariant()
    def a_key_is_held_once(self) -> None:
        self.tasks.dispatch.check()
        busy = [
            t.key
            for t in self.tasks.dispatch.tasks.values()
            if t.key and (t.worker is not None or t.retrying)
        ]
        assert len(busy) == len(set(busy))

    @invariant()
    def a_terminated_task_ends_revoked_unless_it_had_finished(self) -> None:
        for tid in self.terminated:
            state = self.tasks.state_of(tid)
            assert state in (p.STARTED_STATE, p.QUEUED, p.REVOKED, p.SUCCESS, p.FAILURE, p.DEAD)


TestCore = CoreMachine.TestCase
TestCore.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
