"""Property-based tests for the pure scheduling state in ``zq.dispatch``.

The rules (numbered as in the design) are checked against a small model kept
beside the real ``Dispatcher``: every mutator's returned assignments are replayed
into the model, which rejects any that break a rule, and the invariants are
checked after every step.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zq.dispatch import Dispatcher, Lane, Task

QUEUES = ("a", "b")
WORKER_IDS = (b"w0", b"w1", b"w2")
KEYS = (None, "k1", "k2", "k3", "k4")
queue_lists = st.lists(st.sampled_from(QUEUES), unique=True, min_size=1, max_size=2).map(tuple)


def snapshot(d: Dispatcher) -> tuple:
    """Everything observable in the dispatcher, to show that a call changed nothing."""
    return (
        {tid: (t.worker, t.started, t.redeliveries) for tid, t in d.tasks.items()},
        {w.id: (w.queues, w.capacity, sorted(w.running)) for w in d.workers.values()},
        {q: [e.key if isinstance(e, Lane) else e.id for e in r] for q, r in d.ready.items()},
        {
            k: ([t.id for t in ln.waiting], ln.running and ln.running.id)
            for k, ln in d.lanes.items()
        },
        dict(d.queued),
    )


class DispatchMachine(RuleBasedStateMachine):
    """Random operation sequences, checked against a model (rules 1-7)."""

    def __init__(self) -> None:
        super().__init__()
        # Dead letters are tested by example below; here hand-backs always requeue.
        self.d = Dispatcher(max_redeliveries=1_000_000)
        self.n = 0
        self.info: dict[str, tuple[str, str | None]] = {}  # id -> (queue, key)
        self.workers: dict[bytes, tuple[tuple[str, ...], int]] = {}  # id -> (queues, capacity)
        self.held: dict[bytes, set[str]] = {}
        self.holder: dict[str, bytes] = {}
        self.done_ids: set[str] = set()
        self.unkeyed_waiting: set[str] = set()
        self.pending: dict[str, deque[str]] = {k: deque() for k in KEYS if k}  # expected order
        self.running: dict[str, str | None] = dict.fromkeys(self.pending)

    # ---------------------------------------------------------- model updates

    def hand_back(self, lost: set[str]) -> None:
        """Rule 2: a handed-back task returns to the head of its lane."""
        for tid in lost:
            w = self.holder.pop(tid)
            self.held[w].discard(tid)
            key = self.info[tid][1]
            if key is None:
                self.unkeyed_waiting.add(tid)
            else:
                assert self.running[key] == tid
                self.running[key] = None
                self.pending[key].appendleft(tid)

    def apply(self, out: list) -> None:
        """Replay assignments; rules 1 (exclusive), 2 (ordered) and 3 (credit)."""
        for wid, task in out:
            assert wid in self.workers and task.worker == wid
            tid, key = task.id, task.key
            assert tid not in self.holder, f"{tid} assigned twice"
            if key is None:
                self.unkeyed_waiting.remove(tid)
            else:
                assert self.running[key] is None, f"key {key} assigned twice at once"
                assert self.pending[key] and self.pending[key][0] == tid, f"{tid} out of order"
                self.pending[key].popleft()
                self.running[key] = tid
            self.holder[tid] = wid
            self.held[wid].add(tid)
            assert len(self.held[wid]) <= self.workers[wid][1], f"{wid!r} over capacity"

    # ------------------------------------------------------------------ rules

    @rule(queue=st.sampled_from(QUEUES), key=st.sampled_from(KEYS))
    def submit(self, queue: str, key: str | None) -> None:
        self.n += 1
        tid = f"t{self.n}"
        self.info[tid] = (queue, key)
        if key is None:
            self.unkeyed_waiting.add(tid)
        else:
            self.pending[key].append(tid)
        self.apply(self.d.submit(Task(tid, queue, key)))

    @rule(
        wid=st.sampled_from(WORKER_IDS), queues=queue_lists, cap=st.integers(1, 3), data=st.data()
    )
    def add_worker(self, wid: bytes, queues: tuple, cap: int, data: st.DataObject) -> None:
        """A new worker, or a re-READY listing a random subset of its tasks (plus strays)."""
        mine = sorted(self.held.get(wid, ()))
        others = sorted(set(self.info) - set(mine))
        keep = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        stray = data.draw(st.lists(st.sampled_from(others), max_size=2)) if others else []
        lost = set(mine) - set(keep)
        out = self.d.add_worker(wid, queues, cap, running=keep + stray)
        self.workers[wid] = (queues, cap)
        self.held.setdefault(wid, set())
        self.hand_back(lost)
        for tid in lost:
            assert self.d.tasks[tid].redeliveries >= 1
        self.apply(out)

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def remove_worker(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.workers)))
        lost, out = self.d.remove_worker(wid)
        assert {t.id for t in lost} == self.held[wid]
        del self.workers[wid]
        self.hand_back(set(self.held[wid]))
        del self.held[wid]
        self.apply(out)

    @precondition(lambda self: self.holder)
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        """Also rule 4 (sticky), when its conditions hold."""
        tid = data.draw(st.sampled_from(sorted(self.holder)))
        wid = self.holder[tid]
        queue, key = self.info[tid]
        nxt = self.pending[key][0] if key and self.pending[key] else None
        sticky = (
            nxt is not None
            and self.info[nxt][0] == queue
            and not self.d.ready.get(queue)
            and queue in self.workers[wid][0]
            and len(self.held[wid]) <= self.workers[wid][1]  # a slot is free after done
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
            assert (wid, nxt) in [(w, t.id) for w, t in out], "sticky rule broken"

    @rule(data=st.data())
    def done_wrong_worker(self, data: st.DataObject) -> None:
        """Rule 7: done()/started() from a worker not holding the task change nothing."""
        if not self.info:
            return
        tid = data.draw(st.sampled_from(sorted(self.info)))
        wid = data.draw(
            st.sampled_from([w for w in (*WORKER_IDS, b"x") if w != self.holder.get(tid)])
        )
        before = snapshot(self.d)
        assert self.d.done(wid, tid) == (None, [])
        assert self.d.started(wid, tid) is False
        assert snapshot(self.d) == before

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
        """Rule 1, read from the dispatcher's own tasks."""
        busy = [t.key for t in self.d.tasks.values() if t.key and t.worker is not None]
        assert len(busy) == len(set(busy))

    @invariant()
    def nothing_lost(self) -> None:
        """Rule 6: every task is exactly one of waiting, assigned or done."""
        waiting = set(self.unkeyed_waiting).union(*self.pending.values())
        assert waiting.isdisjoint(self.holder) and waiting.isdisjoint(self.done_ids)
        assert len(self.info) == len(waiting) + len(self.holder) + len(self.done_ids)
        assert set(self.d.tasks) == waiting | set(self.holder)
        for tid, t in self.d.tasks.items():
            assert t.worker == self.holder.get(tid)
        # Each waiting task is findable exactly once, in a ready deque or a lane.
        found = [e.id for r in self.d.ready.values() for e in r if isinstance(e, Task)]
        found += [t.id for ln in self.d.lanes.values() for t in ln.waiting]
        assert sorted(found) == sorted(waiting)
        for q in QUEUES:
            n = sum(1 for tid in waiting if self.info[tid][0] == q)
            assert self.d.queued.get(q, 0) == n
        for wid, tids in self.held.items():
            assert set(self.d.workers[wid].running) == tids

    @invariant()
    def work_conserving(self) -> None:
        """Rule 5: no worker with a free slot while its queue has an eligible task."""
        eligible = {self.info[t][0] for t in self.unkeyed_waiting}
        eligible |= {
            self.info[p[0]][0] for k, p in self.pending.items() if p and self.running[k] is None
        }
        for wid, (queues, cap) in self.workers.items():
            if len(self.held[wid]) < cap:
                assert not eligible.intersection(queues), f"{wid!r} idle with work waiting"


TestDispatchMachine = DispatchMachine.TestCase
TestDispatchMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
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
    """Rules 2 and 3: a re-READY keeps what it lists, the rest is redelivered first."""
    d = Dispatcher()
    d.add_worker(b"w1", ["a"], 2)
    d.submit(Task("t1", "a", "k"))
    d.submit(Task("t2", "a", "j"))
    d.submit(Task("t3", "a", "k"))
    out = d.add_worker(b"w1", ["a"], 2, running=["t2", "nonexistent"])
    assert [(w, t.id) for w, t in out] == [(b"w1", "t1")]  # t1 again, before t3
    assert d.tasks["t1"].redeliveries == 1 and d.tasks["t2"].redeliveries == 0
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
