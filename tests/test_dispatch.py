"""Property-based tests for the pure scheduling state in ``zq.dispatch``.

The rules (numbered as in the design) are checked against a small model kept
beside the real ``Dispatcher``: every mutator's returned assignments are replayed
into the model, which rejects any that break a rule, and the invariants are
checked after every step.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zq.dispatch import (
    PREFETCH_COVER,
    PREFETCH_MAX,
    Assignment,
    Dispatcher,
    Lane,
    ReadyQueue,
    RunTimes,
    Task,
)

QUEUES = ("a", "b")
WORKER_IDS = (b"w0", b"w1", b"w2")
KEYS = (None, "k1", "k2", "k3", "k4")
NAMES = ("x", "y")  # task names: a worker takes only those it registered
name_sets = st.frozensets(st.sampled_from(NAMES), min_size=0, max_size=2)
queue_lists = st.lists(st.sampled_from(QUEUES), unique=True, min_size=1, max_size=2).map(tuple)
priorities = st.integers(0, 9)


def snapshot(d: Dispatcher) -> tuple:
    """Everything observable in the dispatcher, to show that a call changed nothing."""
    return (
        {
            tid: (t.worker, t.started, t.redeliveries, t.retrying, t.retries, t.delivery)
            for tid, t in d.tasks.items()
        },
        {w.id: (w.queues, w.capacity, sorted(w.running)) for w in d.workers.values()},
        {q: [e.key if isinstance(e, Lane) else e.id for e in r] for q, r in d.ready.items()},
        {
            k: ([t.id for t in ln.waiting], ln.running and ln.running.id, ln.in_ready)
            for k, ln in d.lanes.items()
        },
        dict(d.queued),
    )


def ids(out: list[Assignment]) -> list[tuple[bytes, str]]:
    """Assignments as (worker, task id) pairs, for comparisons."""
    return [(w, t.id) for w, t in out]


class Meta(NamedTuple):
    """What the model knows of a submitted task."""

    queue: str
    key: str | None
    priority: int
    seq: int  # submission order
    name: str = "x"


class Spec(NamedTuple):
    """What the model knows of a connected worker."""

    queues: tuple[str, ...]
    capacity: int
    names: frozenset[str]


class DispatchMachine(RuleBasedStateMachine):
    """Random operation sequences, checked against a model (rules 1-7, priority, cancel)."""

    def __init__(self) -> None:
        super().__init__()
        # Dead letters are tested by example below; here hand-backs always requeue.
        self.d = Dispatcher(max_redeliveries=1_000_000)
        self.n = 0
        self.info: dict[str, Meta] = {}
        self.workers: dict[bytes, Spec] = {}
        self.held: dict[bytes, set[str]] = {}
        self.holder: dict[str, bytes] = {}
        self.done_ids: set[str] = set()
        self.cancelled: set[str] = set()
        self.retrying: set[str] = set()  # waiting out a retry delay; a keyed one holds its key
        self.requeued: set[str] = set()  # ever handed back or released: may jump the FIFO
        self.unkeyed_waiting: set[str] = set()
        self.pending: dict[str, deque[str]] = {k: deque() for k in KEYS if k}  # expected order
        self.running: dict[str, str | None] = dict.fromkeys(self.pending)  # held or retrying

    # ---------------------------------------------------------- model updates

    def waiting(self) -> set[str]:
        """Tasks waiting for a worker (in a ready deque or a lane)."""
        return self.unkeyed_waiting.union(*self.pending.values())

    def eligible(self, queue: str, names: frozenset[str] | None = None) -> set[str]:
        """Tasks of ``queue`` (and of ``names``, if given) that may be assigned now:
        unkeyed ones, and lane heads whose key is free. These are exactly the
        dispatcher's ready entries."""
        out = {t for t in self.unkeyed_waiting if self.info[t].queue == queue}
        out.update(
            p[0]
            for k, p in self.pending.items()
            if p and self.running[k] is None and self.info[p[0]].queue == queue
        )
        return out if names is None else {t for t in out if self.info[t].name in names}

    def hand_back(self, lost: set[str]) -> None:
        """Rule 2: a handed-back task returns to the head of its lane."""
        for tid in lost:
            w = self.holder.pop(tid)
            self.held[w].discard(tid)
            self.requeued.add(tid)
            key = self.info[tid].key
            if key is None:
                self.unkeyed_waiting.add(tid)
            else:
                assert self.running[key] == tid
                self.running[key] = None
                self.pending[key].appendleft(tid)

    def check_priority(self, tid: str, wid: bytes, exempt: set[str]) -> None:
        """Priority: nothing the worker could take from the task's queue has a strictly
        higher priority, and no older fresh unkeyed task of equal priority is passed
        over."""
        meta = self.info[tid]
        rivals = self.eligible(meta.queue, self.workers[wid].names) - {tid} - exempt
        higher = sorted(r for r in rivals if self.info[r].priority > meta.priority)
        assert not higher, f"{tid} (priority {meta.priority}) assigned before {higher}"
        if meta.key is None and tid not in self.requeued:
            older = sorted(
                r
                for r in rivals & self.unkeyed_waiting
                if r not in self.requeued
                and self.info[r].priority == meta.priority
                and self.info[r].seq < meta.seq
            )
            assert not older, f"{tid} assigned before the older {older} of its priority"

    def apply(self, out: list[Assignment], exempt: set[str] | frozenset[str] = frozenset()) -> None:
        """Replay assignments; rules 1 (exclusive), 2 (ordered), 3 (credit) and priority.
        ``exempt``: tasks not counted as rivals in the priority check."""
        for wid, task in out:
            assert wid in self.workers and task.worker == wid
            tid, key = task.id, task.key
            assert tid not in self.cancelled, f"cancelled {tid} assigned"
            assert tid not in self.holder, f"{tid} assigned twice"
            assert task.priority == self.info[tid].priority
            assert task.name in self.workers[wid].names, f"{tid} sent to a worker without it"
            assert task.queue in self.workers[wid].queues
            self.check_priority(tid, wid, set(exempt))
            if key is None:
                self.unkeyed_waiting.remove(tid)
            else:
                assert self.running[key] is None, f"key {key} assigned twice at once"
                assert self.pending[key] and self.pending[key][0] == tid, f"{tid} out of order"
                self.pending[key].popleft()
                self.running[key] = tid
            self.holder[tid] = wid
            self.held[wid].add(tid)
            assert len(self.held[wid]) <= self.workers[wid].capacity, f"{wid!r} over capacity"

    # ------------------------------------------------------------------ rules

    @rule(
        queue=st.sampled_from(QUEUES),
        key=st.sampled_from(KEYS),
        priority=priorities,
        name=st.sampled_from(NAMES),
    )
    def submit(self, queue: str, key: str | None, priority: int, name: str) -> None:
        self.n += 1
        tid = f"t{self.n}"
        self.info[tid] = Meta(queue, key, priority, self.n, name)
        if key is None:
            self.unkeyed_waiting.add(tid)
        else:
            self.pending[key].append(tid)
        self.apply(self.d.submit(Task(tid, queue, key, priority=priority, name=name)))

    @rule(
        wid=st.sampled_from(WORKER_IDS),
        queues=queue_lists,
        cap=st.integers(1, 3),
        names=name_sets,
        data=st.data(),
    )
    def add_worker(
        self, wid: bytes, queues: tuple, cap: int, names: frozenset[str], data: st.DataObject
    ) -> None:
        """A new worker, or a re-READY listing a random subset of its tasks (plus strays)."""
        mine = sorted(self.held.get(wid, ()))
        others = sorted(set(self.info) - set(mine))
        keep = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        stray = data.draw(st.lists(st.sampled_from(others), max_size=2)) if others else []
        lost = set(mine) - set(keep)
        before = {tid: self.d.tasks[tid].redeliveries for tid in lost}
        out = self.d.add_worker(wid, queues, cap, running=keep + stray, names=names)
        self.workers[wid] = Spec(queues, cap, names)
        self.held.setdefault(wid, set())
        self.hand_back(lost)
        for tid in lost:  # it never reached the worker: not a redelivery
            assert self.d.tasks[tid].redeliveries == before[tid]
        self.apply(out)

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def remove_worker(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.workers)))
        lost, out = self.d.remove_worker(wid)
        lost_ids = {t.id for t in lost}
        assert lost_ids == self.held[wid]
        del self.workers[wid]
        self.hand_back(lost_ids)
        del self.held[wid]
        self.apply(out)

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def set_capacity(self, data: st.DataObject) -> None:
        """The broker changes a worker's credit (automatic prefetch): more credit is
        filled at once; less takes nothing back."""
        wid = data.draw(st.sampled_from(sorted(self.workers)))
        capacity = data.draw(st.integers(0, 4))
        held = set(self.held[wid])
        self.workers[wid] = self.workers[wid]._replace(capacity=capacity)
        out = self.d.set_capacity(wid, capacity)
        assert all(w == wid for w, _ in out), "credit of one worker went to another"
        self.apply(out)
        assert self.held[wid] >= held, "less credit took a task back"

    @precondition(lambda self: self.holder)
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        """Also rule 4 (sticky), when its conditions hold."""
        tid = data.draw(st.sampled_from(sorted(self.holder)))
        wid = self.holder[tid]
        queue, key = self.info[tid].queue, self.info[tid].key
        nxt = self.pending[key][0] if key and self.pending[key] else None
        ready = self.d.ready.get(queue)
        sticky = (
            nxt is not None
            and self.info[nxt].queue == queue
            and not (ready and ready.any_of(self.workers[wid].names))  # nothing it takes
            and queue in self.workers[wid].queues
            and self.info[nxt].name in self.workers[wid].names
            and len(self.held[wid]) <= self.workers[wid].capacity  # a slot is free after done
        )
        task, out = self.d.done(wid, tid)
        assert task is not None and task.id == tid
        del self.holder[tid]
        self.held[wid].discard(tid)
        self.done_ids.add(tid)
        if key:
            self.running[key] = None
        self.apply(out)
        if sticky:
            assert (wid, nxt) in ids(out), "sticky rule broken"

    @precondition(lambda self: self.holder)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """The task leaves its worker for a retry delay but keeps holding its key."""
        tid = data.draw(st.sampled_from(sorted(self.holder)))
        wid = self.holder.pop(tid)
        retries = self.d.tasks[tid].retries
        task, out = self.d.retry(wid, tid)
        assert task is not None and task.id == tid
        assert task.retrying and task.worker is None and task.retries == retries + 1
        self.held[wid].discard(tid)
        self.retrying.add(tid)
        self.apply(out)

    @precondition(lambda self: self.retrying)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A retry delay ran out: the task goes back to the head of its lane."""
        tid = data.draw(st.sampled_from(sorted(self.retrying)))
        self.retrying.remove(tid)
        self.requeued.add(tid)
        key = self.info[tid].key
        if key is None:
            self.unkeyed_waiting.add(tid)
        else:
            assert self.running[key] == tid
            self.running[key] = None
            self.pending[key].appendleft(tid)
        self.apply(self.d.release(tid))
        assert not self.d.tasks[tid].retrying

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """Cancel any id: a waiting or retrying task goes (its key's next task may run);
        a held, finished, cancelled or unknown one is refused and nothing changes."""
        tid = data.draw(st.sampled_from([*sorted(self.info), "nope"]))
        if tid not in self.waiting() and tid not in self.retrying:
            before = snapshot(self.d)
            assert self.d.cancel(tid) == (None, [])
            assert snapshot(self.d) == before
            return
        key = self.info[tid].key
        frees_key = tid in self.retrying or (
            key is not None and self.running[key] is None and self.pending[key][0] == tid
        )
        task, out = self.d.cancel(tid)
        assert task is not None and task.id == tid
        assert task.worker is None and not task.retrying and tid not in self.d.tasks
        self.cancelled.add(tid)
        if tid in self.retrying:
            self.retrying.remove(tid)
            if key is not None:
                assert self.running[key] == tid
                self.running[key] = None
        elif key is None:
            self.unkeyed_waiting.remove(tid)
        else:
            self.pending[key].remove(tid)
        if not frees_key:
            assert out == [], "cancelling a task that held nothing assigned something"
        self.apply(out)

    @rule(data=st.data())
    def done_wrong_worker(self, data: st.DataObject) -> None:
        """Rule 7: done()/started()/retry() from a worker not holding the task, and
        release() of a task not waiting out a retry delay, change nothing."""
        if not self.info:
            return
        tid = data.draw(st.sampled_from(sorted(self.info)))
        wid = data.draw(
            st.sampled_from([w for w in (*WORKER_IDS, b"x") if w != self.holder.get(tid)])
        )
        before = snapshot(self.d)
        assert self.d.done(wid, tid) == (None, [])
        assert self.d.started(wid, tid) is False
        assert self.d.retry(wid, tid) == (None, [])
        if tid not in self.retrying:
            assert self.d.release(tid) == []
        assert snapshot(self.d) == before

    @precondition(lambda self: self.holder)
    @rule(data=st.data())
    def unknown_name(self, data: st.DataObject) -> None:
        """The worker answers UnknownTask: it loses that name, and the task goes back to
        the head of its lane, not counted as a redelivery."""
        tid = data.draw(st.sampled_from(sorted(self.holder)))
        wid = self.holder[tid]
        redeliveries = self.d.tasks[tid].redeliveries
        task, out = self.d.drop_name(wid, tid, None)
        assert task is not None and task.id == tid and task.redeliveries == redeliveries
        spec = self.workers[wid]
        self.workers[wid] = spec._replace(names=spec.names - {self.info[tid].name})
        self.hand_back({tid})
        self.apply(out)

    @invariant()
    def unserved_is_exact(self) -> None:
        """unserved() names exactly the (queue, name) with eligible work no worker takes."""
        served = {(q, n) for s in self.workers.values() for q in s.queues for n in s.names}
        expected = {
            (q, n) for q in QUEUES for n in NAMES if self.eligible(q, frozenset({n}))
        } - served
        assert {(q, n) for q, n, _ in self.d.unserved()} == expected

    @precondition(lambda self: self.holder)
    @rule(data=st.data())
    def started(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from(sorted(self.holder)))
        assert self.d.started(self.holder[tid], tid) is True
        assert self.d.tasks[tid].started

    # ------------------------------------------------------------- invariants

    @invariant()
    def internal_check(self) -> None:
        self.d.check()

    @invariant()
    def exclusive(self) -> None:
        """Rule 1, read from the dispatcher's own tasks (a retrying task holds its key)."""
        busy = [t.key for t in self.d.tasks.values() if t.key and (t.worker or t.retrying)]
        assert len(busy) == len(set(busy))

    @invariant()
    def nothing_lost(self) -> None:
        """Rule 6: every task is exactly one of waiting, assigned, retrying, done or
        cancelled; the dispatcher knows exactly the first three."""
        waiting = self.waiting()
        states = [waiting, set(self.holder), self.retrying, self.done_ids, self.cancelled]
        assert len(self.info) == sum(map(len, states)), "a task is in two states"
        assert set(self.d.tasks) == waiting | set(self.holder) | self.retrying
        for tid, t in self.d.tasks.items():
            assert t.worker == self.holder.get(tid)
            assert t.retrying == (tid in self.retrying)
        # Each waiting task is findable exactly once, in a ready deque or a lane.
        found = [e.id for r in self.d.ready.values() for e in r if isinstance(e, Task)]
        found += [t.id for ln in self.d.lanes.values() for t in ln.waiting]
        assert sorted(found) == sorted(waiting)
        for q in QUEUES:
            n = sum(1 for tid in waiting if self.info[tid].queue == q)
            assert self.d.queued.get(q, 0) == n
        for wid, tids in self.held.items():
            assert set(self.d.workers[wid].running) == tids

    @invariant()
    def ready_is_ordered(self) -> None:
        """Priority: a queue's ready entries are exactly its assignable tasks (a lane by
        its head), iterated highest priority first."""
        in_ready = [ln for ln in self.d.lanes.values() if ln.in_ready]
        lanes_seen = 0
        for q in QUEUES:
            entries = list(self.d.ready.get(q, ()))
            assert len(self.d.ready.get(q, ())) == len(entries)
            heads = [e.waiting[0] if isinstance(e, Lane) else e for e in entries]
            assert all(t.queue == q for t in heads)
            assert sorted(t.id for t in heads) == sorted(self.eligible(q))
            prios = [t.priority for t in heads]
            assert prios == sorted(prios, reverse=True), f"ready {q!r} out of order: {prios}"
            lanes_seen += sum(1 for e in entries if isinstance(e, Lane) and e.in_ready)
        assert lanes_seen == len(in_ready)

    @invariant()
    def work_conserving(self) -> None:
        """Rule 5: no worker with a free slot while one of its queues has an eligible
        task of a name it takes."""
        for wid, spec in self.workers.items():
            if len(self.held[wid]) < spec.capacity:
                for q in spec.queues:
                    assert not self.eligible(q, spec.names), f"{wid!r} idle with work waiting"


TestDispatchMachine = DispatchMachine.TestCase
TestDispatchMachine.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------- examples


def test_sticky_prefers_last_worker_over_freer_one() -> None:
    """Rule 4: the key's next task follows the worker that just finished the key."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 1)
    assert [(w, t.id) for w, t in d.submit(Task("t1", "a", "k"))] == [(b"w1", "t1")]
    d.add_worker(b"w2", ["a"], 3)  # more free slots than w1 will have
    assert d.submit(Task("t2", "a", "k")) == []  # k busy: waits in its lane
    task, out = d.done(b"w1", "t1")
    assert task is not None and task.id == "t1"
    assert [(w, t.id) for w, t in out] == [(b"w1", "t2")]
    d.check()


def test_remove_worker_puts_tasks_back_at_head_of_lanes() -> None:
    """Rule 2 and 6: handed-back tasks precede later tasks of their keys, none lost."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 2)
    d.submit(Task("t1", "a", "k1"))
    d.submit(Task("t2", "a", "k2"))
    for tid, key in (("t3", "k1"), ("t4", "k2"), ("u", None)):
        assert d.submit(Task(tid, "a", key)) == []
    lost, out = d.remove_worker(b"w1")
    assert [t.id for t in lost] == ["t1", "t2"] and out == []
    assert [t.id for t in d.lanes["k1"].waiting] == ["t1", "t3"]
    assert [t.id for t in d.lanes["k2"].waiting] == ["t2", "t4"]
    assert d.queued["a"] == 5 and all(d.tasks[t].redeliveries == 1 for t in ("t1", "t2"))
    d.check()
    order: list[str] = [t.id for _, t in d.add_worker(b"w2", ["a"], 1)]
    while len(order) < 5:
        _, out = d.done(b"w2", order[-1])
        order += [t.id for _, t in out]
        d.check()
    assert order.index("t1") < order.index("t3") and order.index("t2") < order.index("t4")
    assert sorted(order) == ["t1", "t2", "t3", "t4", "u"]


def test_ready_again_keeps_listed_tasks_and_hands_back_the_rest() -> None:
    """Rules 2 and 3: a re-READY keeps what it lists, the rest goes back first (not
    counted as redelivered: the same worker lists all it started, so it never got it)."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 2)
    d.submit(Task("t1", "a", "k"))
    d.submit(Task("t2", "a", "j"))
    d.submit(Task("t3", "a", "k"))
    out = d.add_worker(b"w1", ["a"], 2, running=["t2", "nonexistent"])
    assert [(w, t.id) for w, t in out] == [(b"w1", "t1")]  # t1 again, before t3
    assert d.tasks["t1"].redeliveries == 0 and d.tasks["t2"].redeliveries == 0
    assert d.tasks["t3"].worker is None
    d.check()


def test_done_from_wrong_worker_is_ignored() -> None:
    """Rule 7: a stale done() returns (None, []) and leaves the task assigned."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 1)
    d.add_worker(b"w2", ["a"], 1)
    ((wid, _),) = d.submit(Task("t1", "a", "k"))
    other = b"w2" if wid == b"w1" else b"w1"
    assert d.done(other, "t1") == (None, [])
    assert d.tasks["t1"].worker == wid
    d.check()


def test_a_task_whose_worker_dies_too_often_becomes_dead_and_frees_its_key() -> None:
    """Dead letters: after max_redeliveries hand-backs the task is given up on, and its
    key's next task runs instead of waiting behind it forever."""
    d = Dispatcher(max_redeliveries=2)
    d.add_worker(b"w1", ["a"], 1)
    d.submit(Task("poison", "a", "k"))
    d.submit(Task("next", "a", "k"))
    for attempt in range(1, 3):
        task, out = d.lost(b"w1", "poison")
        assert task is not None and task.redeliveries == attempt
        assert [t.id for _, t in out] == ["poison"], "handed back to the head of its lane"
        assert not d.dead
    task, out = d.lost(b"w1", "poison")
    assert [t.id for t in d.dead] == ["poison"]
    assert "poison" not in d.tasks
    assert [t.id for _, t in out] == ["next"]
    d.check()


def test_lost_from_a_worker_that_does_not_hold_the_task_changes_nothing() -> None:
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 1)
    d.add_worker(b"w2", ["a"], 1)
    d.submit(Task("t1", "a", "k"))
    holder = d.tasks["t1"].worker
    other = b"w2" if holder == b"w1" else b"w1"
    before = snapshot(d)
    assert d.lost(other, "t1") == (None, [])
    assert snapshot(d) == before


# ------------------------------------------------------------ priority


def finish_all(d: Dispatcher, worker_id: bytes, first: list[Assignment]) -> list[str]:
    """Complete tasks on a one-slot worker until it idles; the ids in the order run."""
    order = [t.id for _, t in first]
    while order and worker_id in d.workers and d.workers[worker_id].running:
        _, out = d.done(worker_id, order[-1])
        d.check()
        order += [t.id for _, t in out]
    return order


def test_ready_queue_iterates_highest_priority_first() -> None:
    """ReadyQueue: highest level first, FIFO within a level (front pushes first)."""
    r = ReadyQueue()
    assert not r and len(r) == 0
    tasks = {n: Task(n, "a", priority=p) for n, p in (("a0", 0), ("b9", 9), ("c0", 0), ("d5", 5))}
    for t in tasks.values():
        r.push(t)
    r.push(Task("e0", "a"), front=True)
    assert [t.id for t in r] == ["b9", "d5", "e0", "a0", "c0"] and len(r) == 5 and r
    r.remove(tasks["d5"], 5)
    assert [r.pop().id for _ in range(len(r))] == ["b9", "e0", "a0", "c0"]
    assert not r


def test_priority_9_runs_before_0_on_a_busy_worker() -> None:
    """Priority: with the only worker busy, the later priority-9 task goes first."""
    d = Dispatcher()
    first = d.add_worker(b"w1", ["a"], 1) + d.submit(Task("busy", "a"))
    assert d.submit(Task("low", "a", priority=0)) == []
    assert d.submit(Task("high", "a", priority=9)) == []
    assert [t.id for t in d.ready["a"]] == ["high", "low"] and len(d.ready["a"]) == 2
    assert finish_all(d, b"w1", first) == ["busy", "high", "low"]
    assert not d.ready and not d.queued


def test_equal_priorities_run_first_in_first_out() -> None:
    """Priority: within one level, submission order; levels interleave correctly."""
    d = Dispatcher()
    first = d.add_worker(b"w1", ["a"], 1) + d.submit(Task("busy", "a"))
    for tid, prio in (("p1", 3), ("q1", 7), ("p2", 3), ("q2", 7), ("p3", 3), ("z", 0)):
        assert d.submit(Task(tid, "a", priority=prio)) == []
    assert d.queued["a"] == 6
    assert finish_all(d, b"w1", first) == ["busy", "q1", "q2", "p1", "p2", "p3", "z"]


def test_a_keyed_lane_waits_at_its_head_priority() -> None:
    """Priority never reorders a key: its priority-9 task waits behind its priority-0
    head, and only once that head is done does the lane compete at priority 9."""
    d = Dispatcher()
    first = d.add_worker(b"w1", ["a"], 1) + d.submit(Task("busy", "a"))
    d.submit(Task("k-low", "a", "k", priority=0))
    d.submit(Task("k-high", "a", "k", priority=9))
    d.submit(Task("mid", "a", priority=5))
    d.submit(Task("other", "a", priority=0))  # same level as the lane, but later
    assert [e.key if isinstance(e, Lane) else e.id for e in d.ready["a"]] == ["mid", "k", "other"]
    order = finish_all(d, b"w1", first)
    assert order == ["busy", "mid", "k-low", "k-high", "other"]


# -------------------------------------------------------------- cancel


def test_cancel_a_queued_task_forgets_it() -> None:
    """A waiting unkeyed task leaves its ready deque and the queued count."""
    d = Dispatcher()
    d.submit(Task("t1", "a", priority=4))
    d.submit(Task("t2", "a", priority=4))
    task, out = d.cancel("t1")
    assert task is not None and task.id == "t1" and out == []
    assert "t1" not in d.tasks and d.queued == {"a": 1}
    assert [t.id for t in d.ready["a"]] == ["t2"]
    task, out = d.cancel("t2")
    assert task is not None and out == [] and not d.ready and not d.queued
    assert d.cancel("t2") == (None, [])  # already gone
    d.check()


def test_cancel_of_a_lane_head_lets_the_next_task_of_its_key_run() -> None:
    """The key's next task takes the head's place; in a queue with a free worker it
    is assigned at once, and a key's later tasks still keep their order."""
    d = Dispatcher()
    d.add_worker(b"wb", ["b"], 2)  # nobody serves queue "a"
    assert d.submit(Task("k1", "a", "k")) == []
    assert d.submit(Task("k2", "b", "k")) == []  # behind k1, though "b" has room
    assert d.submit(Task("k3", "b", "k")) == []
    task, out = d.cancel("k1")
    assert task is not None and task.id == "k1"
    assert ids(out) == [(b"wb", "k2")]
    assert "a" not in d.ready and "a" not in d.queued and d.queued == {"b": 1}
    d.check()
    task, out = d.done(b"wb", "k2")
    assert ids(out) == [(b"wb", "k3")]
    d.check()


def test_cancel_of_a_lane_head_on_a_busy_queue_requeues_the_lane() -> None:
    """With no free worker, the lane stays ready at its new head's priority, and
    cancelling a task behind the head changes nothing else."""
    d = Dispatcher()
    first = d.add_worker(b"w1", ["a"], 1) + d.submit(Task("busy", "a"))
    d.submit(Task("k1", "a", "k", priority=0))
    d.submit(Task("k2", "a", "k", priority=9))
    d.submit(Task("k3", "a", "k", priority=0))
    d.submit(Task("u", "a", priority=5))
    before = [e.key if isinstance(e, Lane) else e.id for e in d.ready["a"]]
    assert before == ["u", "k"]
    task, out = d.cancel("k3")  # not the head: the lane stays where it is
    assert task is not None and out == []
    assert [t.id for t in d.lanes["k"].waiting] == ["k1", "k2"]
    task, out = d.cancel("k1")  # the head: the lane now waits at k2's priority 9
    assert task is not None and out == []
    assert [e.key if isinstance(e, Lane) else e.id for e in d.ready["a"]] == ["k", "u"]
    assert d.queued == {"a": 2}
    d.check()
    assert finish_all(d, b"w1", first) == ["busy", "k2", "u"]
    assert not d.lanes


def test_cancel_of_a_retrying_task_releases_its_key() -> None:
    """A task waiting out a retry delay holds its key; cancelling it frees the key,
    and the later release() of its timer is a no-op."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 2)
    assert ids(d.submit(Task("k1", "a", "k"))) == [(b"w1", "k1")]
    assert d.submit(Task("k2", "a", "k")) == []
    task, out = d.retry(b"w1", "k1")
    assert task is not None and task.retrying and out == []  # k2 still waits behind it
    assert d.tasks["k2"].worker is None and d.queued == {"a": 1}
    d.check()
    task, out = d.cancel("k1")
    assert task is not None and task.id == "k1" and not task.retrying
    assert ids(out) == [(b"w1", "k2")]
    assert "k1" not in d.tasks and not d.queued
    assert d.release("k1") == []
    d.check()


def test_cancel_of_a_restored_retrying_task_releases_its_key() -> None:
    """Same for a retrying task restored from the journal before any worker connects."""
    d = Dispatcher()
    held = Task("k1", "a", "k")
    held.retrying = True
    d.restore(held, None)
    d.restore(Task("k2", "a", "k"), None)
    assert ids(d.add_worker(b"w1", ["a"], 1)) == []
    task, out = d.cancel("k1")
    assert task is held and ids(out) == [(b"w1", "k2")]
    d.check()


def test_cancel_of_a_running_task_returns_none_and_changes_nothing() -> None:
    """A task a worker holds (or a placeholder for a worker holds) cannot be cancelled."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 1)
    d.submit(Task("t1", "a", "k"))
    d.submit(Task("t2", "a", "k"))
    d.restore(Task("r1", "a", "j"), b"gone")
    for started in (False, True):
        if started:
            assert d.started(b"w1", "t1")
        before = snapshot(d)
        for tid in ("t1", "r1", "unknown"):
            assert d.cancel(tid) == (None, [])
        assert snapshot(d) == before
    assert d.tasks["t1"].worker == b"w1" and d.lanes["k"].running is d.tasks["t1"]
    d.check()


# ------------------------------------------------------------- hand-backs


@pytest.mark.parametrize(("p1", "p2"), [(9, 0), (0, 0)])
def test_hand_backs_keep_their_order_and_priority(p1: int, p2: int) -> None:
    """Tasks handed back together: with one free slot, the first (here also the
    highest-priority) one runs; the other waits."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 2)
    d.submit(Task("t1", "a", priority=p1))
    d.submit(Task("t2", "a", priority=p2))
    d.add_worker(b"w2", ["a"], 1)
    lost, out = d.remove_worker(b"w1")
    assert [t.id for t in lost] == ["t1", "t2"]
    assert ids(out) == [(b"w2", "t1")]


def test_automatic_prefetch_waits_for_a_run_time_and_follows_it() -> None:
    times = RunTimes()
    assert times.prefetch(4) == 0, "a worker with no run time known yet gets no prefetch"
    times.add(0.0001)
    assert times.prefetch(4) == 80  # 4 x 2 ms / 0.1 ms
    times.add(0.000001)
    assert times.prefetch(4) < PREFETCH_MAX  # the mean comes down by a fifth at a time
    for _ in range(30):
        times.add(0.000001)
    assert times.prefetch(4) == PREFETCH_MAX  # 4 x 2 ms / 1 us = 8000, capped
    times.add(0.0001)
    times.add(0.5)  # a long task: the mean jumps to it at once
    assert times.mean == 0.5 and times.prefetch(4) == 0
    for _ in range(30):  # and comes down only as short tasks go on ending
        times.add(0.0001)
    assert times.prefetch(4) > 0
    times.add(PREFETCH_COVER)  # one slot busy for the whole cover: nothing to prefetch
    assert times.prefetch(1) == 1 and times.prefetch(4) == 4


def test_more_credit_is_filled_at_once_and_less_takes_nothing_back() -> None:
    d = Dispatcher()
    assert d.add_worker(b"w", ["q"], 1) == []
    for i in range(5):
        d.submit(Task(f"t{i}", "q"))
    assert sorted(t.id for t in d.workers[b"w"].running.values()) == ["t0"]
    out = d.set_capacity(b"w", 3)
    assert [(w, t.id) for w, t in out] == [(b"w", "t1"), (b"w", "t2")]
    assert d.set_capacity(b"w", 1) == []
    assert len(d.workers[b"w"].running) == 3  # kept; no more until it is under 1
    assert d.done(b"w", "t0")[1] == [] and d.done(b"w", "t1")[1] == []
    assert [t.id for _, t in d.done(b"w", "t2")[1]] == ["t3"]
    assert d.set_capacity(b"nobody", 5) == []
    d.check()


def test_after_a_stall_no_prefetch_until_a_task_ends_there_again() -> None:
    times = RunTimes()
    times.add(0.0001)
    assert times.prefetch(4096) == PREFETCH_MAX
    times.stalled(0.1)  # a big worker: 4096 x 2 ms / 0.1 s alone would still give 81
    assert times.prefetch(4096) == 0 and times.prefetch(1) == 0
    times.add(3.0)  # the long task that took the slots ends: 4096 x 2 ms / 3 s
    assert times.prefetch(4096) == 2 and times.prefetch(1) == 0


def test_tasks_given_back_return_to_the_head_of_the_queue_in_their_order() -> None:
    d = Dispatcher()
    d.add_worker(b"a", ["q"], 4)  # 1 slot + 3 prefetched
    for i in range(6):
        d.submit(Task(f"t{i}", "q"))  # t0 runs on a, t1..t3 wait in it, t4 and t5 here
    assert d.set_capacity(b"a", 1) == []  # a stalled: its credit goes down first
    items = [("t1", None), ("t2", None), ("t3", None), ("unknown", None)]
    tasks, out = d.give_back(b"a", items)
    assert [t.id for t in tasks] == ["t1", "t2", "t3"] and out == []
    assert all(t.redeliveries == 0 and t.worker is None for t in tasks)
    assert [t.id for _, t in d.add_worker(b"b", ["q"], 5)] == ["t1", "t2", "t3", "t4", "t5"]
    d.check()
