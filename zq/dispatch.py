"""Pure scheduling state: queues, key lanes, worker credits, affinity, in-flight tasks.

No sockets here. The broker calls these methods and sends the assignments they
return. The rules (docs/design.md, Scheduling):

1. **Exclusive**: a key has at most one task assigned to a worker at any moment.
2. **Ordered**: a key's tasks are assigned in the order they were submitted; a task
   handed back by a dead worker goes to the head of its lane.
3. **Sticky**: when a key's next task becomes ready and nothing else is waiting in
   its queue, it goes to the worker that ran the key last if that worker has a free
   slot, else to the worker with the most free slots.
4. **No head-of-line blocking**: a task whose key is busy waits in its key's lane,
   not in the queue; only lanes whose head may run sit in a queue's ready deque.
5. **Priority**: within a queue, a ready task of priority 9 goes before one of 8, and
   so on down to 0 (the default); equal priorities go first in, first out. A lane
   waits at the priority of its head task: a key's order is never overtaken.

6. **By name**: a task goes only to a worker that serves its queue and registered its
   task name; one no connected worker takes waits (:meth:`Dispatcher.unserved`).

Credit: a worker has ``capacity`` slots (concurrency + prefetch) and is sent at most
that many tasks at once; the broker may change it (:meth:`Dispatcher.set_capacity`).
Ready work is indexed by what a worker can take, (queue, task name), and the
invariant is: entries of one (queue, name) wait in the ready structure only while no
worker that takes them has a free slot. So every operation is O(1) amortised in
queued tasks and keys (worker selection is linear in the workers of one (queue, name),
and a worker's pop looks at the names that have work waiting in its queues).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: How many key -> last-worker affinities to remember after their lanes empty.
AFFINITY_MEMORY = 100_000

#: Automatic prefetch: a worker is sent enough tasks beyond its slots to keep them busy
#: for about this many seconds at the run time its recent tasks took. That covers the
#: round trip to the broker (a fraction of a millisecond on a LAN, plus the journal's
#: disk sync before TASK and before the acknowledgement) for short tasks, and comes to
#: nothing for tasks that run longer than this per slot.
PREFETCH_COVER = 0.002
#: Most tasks beyond its slots a worker may be sent (``--prefetch`` or automatic): what
#: a worker holds must fit in its READY when it re-attaches after a broker restart. The
#: cover, not this, bounds automatic prefetch but for the shortest tasks (a cap of 64
#: left 4 threads of no-op tasks waiting on the round trip: 1000 measured +35% tasks/s
#: without the journal, +20% with it).
PREFETCH_MAX = 1000
#: Weight of a new run time in a worker's moving average.
_RUNTIME_WEIGHT = 0.2


class RunTimes:
    """A moving average of one worker's task run times, and the automatic prefetch it
    gives. A new worker gets none until a run time is known, and one long task is
    enough to take it away: a task that waits in a busy worker while another could
    run it costs more than a round trip saved. A worker that stalled (gave prefetched
    tasks back) gets none until a task ends there again."""

    __slots__ = ("mean", "stuck")

    def __init__(self) -> None:
        self.mean: float | None = None
        self.stuck = False

    def add(self, seconds: float) -> None:
        """A task ran for ``seconds``."""
        self.stuck = False
        if self.mean is None or seconds > self.mean:
            self.mean = seconds  # up at once: a long task may be the start of many
        else:
            self.mean += _RUNTIME_WEIGHT * (seconds - self.mean)

    def stalled(self, seconds: float) -> None:
        """No slot of the worker freed for ``seconds``: it gave its waiting tasks back."""
        self.stuck = True
        self.mean = max(self.mean or 0.0, seconds)

    def prefetch(self, slots: int) -> int:
        """Tasks to send beyond ``slots``: slots x cover / mean run time, capped."""
        if self.mean is None or self.stuck:
            return 0
        return min(PREFETCH_MAX, int(slots * PREFETCH_COVER / max(self.mean, 1e-6)))


class Task:
    """One accepted task as the scheduler sees it; ``data`` is the broker's, opaque here."""

    __slots__ = (
        "data",
        "delivery",
        "id",
        "key",
        "name",
        "priority",
        "progress",
        "queue",
        "ready_seq",
        "redeliveries",
        "retries",
        "retrying",
        "started",
        "worker",
    )

    def __init__(
        self,
        id: str,
        queue: str,
        key: str | None = None,
        data: Any = None,
        priority: int = 0,
        name: str | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.key = key
        self.data = data
        self.priority = priority  # 0..9, higher first within its queue
        self.name = name  # the task's name: only a worker that registered it is sent it
        self.ready_seq = 0  # its place among a queue's ready entries (see ReadyQueue)
        self.progress: Any = None  # the latest progress report of the run in progress
        self.worker: bytes | None = None  # the worker holding it, None while queued
        self.started = False
        self.redeliveries = 0  # times handed back because its worker (process) died
        self.retries = 0  # times the task asked to be run again (zq.Retry, autoretry)
        self.retrying = False  # waiting out a retry delay: no worker, key still held
        self.delivery = 0  # how many times it was assigned to a worker

    def __repr__(self) -> str:
        return f"Task({self.id!r}, queue={self.queue!r}, key={self.key!r}, worker={self.worker!r})"


class Lane:
    """The tasks of one key: at most one running, the rest waiting in order."""

    __slots__ = ("in_ready", "key", "ready_seq", "running", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.waiting: deque[Task] = deque()
        self.running: Task | None = None
        self.in_ready = False  # the lane sits in its head's queue's ready deque
        self.ready_seq = 0


class WorkerState:
    """What the scheduler knows of one connected worker."""

    __slots__ = ("capacity", "id", "names", "queues", "running")

    def __init__(
        self,
        id: bytes,
        queues: Iterable[str],
        capacity: int,
        names: Iterable[str | None] = (None,),
    ) -> None:
        self.id = id
        self.queues = tuple(queues)
        self.names = frozenset(names)  # the task names it registered
        self.capacity = capacity
        self.running: dict[str, Task] = {}

    def routes(self) -> Iterator[tuple[str, str | None]]:
        """Every (queue, task name) this worker takes."""
        return ((q, n) for q in self.queues for n in self.names)

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)


Assignment = tuple[bytes, Task]
_Entry = Task | Lane  # what a ready deque holds: an unkeyed task, or a lane whose head may run


def _priority(entry: _Entry) -> int:
    return entry.waiting[0].priority if isinstance(entry, Lane) else entry.priority


class _Levels:
    """The ready entries of one task name in one queue: a FIFO per priority level,
    highest level first. Most use one level, so the levels present are kept sorted in a
    short list and a pop looks at its first element only."""

    __slots__ = ("fifos", "order")

    def __init__(self) -> None:
        self.fifos: dict[int, deque[_Entry]] = {}
        self.order: list[int] = []  # the levels present, highest first

    def head(self) -> _Entry:
        return self.fifos[self.order[0]][0]

    def push(self, entry: _Entry, priority: int, front: bool) -> None:
        fifo = self.fifos.get(priority)
        if fifo is None:
            fifo = self.fifos[priority] = deque()
            self.order.append(priority)
            self.order.sort(reverse=True)
        if front:
            fifo.appendleft(entry)
        else:
            fifo.append(entry)

    def pop(self) -> _Entry:
        level = self.order[0]
        fifo = self.fifos[level]
        entry = fifo.popleft()
        if not fifo:
            self._drop(level)
        return entry

    def remove(self, entry: _Entry, priority: int) -> None:
        fifo = self.fifos[priority]
        fifo.remove(entry)
        if not fifo:
            self._drop(priority)

    def _drop(self, level: int) -> None:
        del self.fifos[level]
        self.order.remove(level)


class ReadyQueue:
    """One queue's ready entries, indexed by task name so that a worker is only ever
    handed a name it registered: per name, a FIFO per priority level.

    Among the names a worker serves, a pop takes the highest priority head, and among
    equal priorities the one pushed first (``Task.ready_seq``: a back push counts up,
    a front push counts down, so a hand-back still goes first), as one FIFO would.
    A queue has few names with waiting work (only those no free worker serves), so a
    pop looks at a handful of heads."""

    __slots__ = ("_back", "_front", "_names")

    def __init__(self) -> None:
        self._names: dict[str | None, _Levels] = {}  # names with ready entries only
        self._back = 0
        self._front = 0

    def __len__(self) -> int:
        return sum(len(d) for levels in self._names.values() for d in levels.fifos.values())

    def __bool__(self) -> bool:
        return bool(self._names)

    def __iter__(self) -> Iterator[_Entry]:
        """Every entry, in the order one worker serving every name would take them."""
        entries = [e for levels in self._names.values() for d in levels.fifos.values() for e in d]
        entries.sort(key=lambda e: (-_priority(e), e.ready_seq))
        return iter(entries)

    def has(self, name: str | None) -> bool:
        """True if entries of task ``name`` wait here."""
        return name in self._names

    def any_of(self, names: frozenset[str | None]) -> bool:
        """True if entries of one of ``names`` wait here."""
        return any(name in names for name in self._names)

    def names(self) -> Iterator[str | None]:
        """The task names that have entries waiting here."""
        return iter(self._names)

    def count(self, name: str | None) -> int:
        """Tasks of ``name`` waiting here, a lane counting all its waiting tasks."""
        levels = self._names.get(name)
        if levels is None:
            return 0
        return sum(_size(e) for d in levels.fifos.values() for e in d)

    def push(self, entry: _Entry, front: bool = False) -> None:
        head = _head(entry)
        if front:
            self._front -= 1
            entry.ready_seq = self._front
        else:
            self._back += 1
            entry.ready_seq = self._back
        levels = self._names.get(head.name)
        if levels is None:
            levels = self._names[head.name] = _Levels()
        levels.push(entry, head.priority, front)

    def pop(self, names: frozenset[str | None] | None = None) -> _Entry | None:
        """Take the next entry of one of ``names`` (None: of any); None if none waits."""
        best: _Levels | None = None
        best_name: str | None = None
        for name, levels in self._names.items():
            if names is not None and name not in names:
                continue
            if best is None or _before(levels.head(), levels.order[0], best):
                best, best_name = levels, name
        if best is None:
            return None
        entry = best.pop()
        if not best.order:
            del self._names[best_name]
        return entry

    def remove(self, entry: _Entry, priority: int) -> None:
        """Take ``entry`` out (O(position): cancelled tasks are mostly near the front)."""
        name = _head(entry).name
        levels = self._names[name]
        levels.remove(entry, priority)
        if not levels.order:
            del self._names[name]


def _before(head: _Entry, priority: int, than: _Levels) -> bool:
    """``head`` (at ``priority``) goes before the head of ``than``."""
    other = than.order[0]
    return priority > other or (priority == other and head.ready_seq < than.head().ready_seq)


def _head(entry: _Entry) -> Task:
    return entry.waiting[0] if isinstance(entry, Lane) else entry


def _size(entry: _Entry) -> int:
    return len(entry.waiting) if isinstance(entry, Lane) else 1


class Dispatcher:
    """The broker's scheduling state. Every mutator returns the assignments to send."""

    def __init__(self, *, max_redeliveries: int = 3) -> None:
        #: A task handed back more often than this (its worker died under it each
        #: time) is given up on: it goes to ``dead`` instead of looping forever.
        self.max_redeliveries = max_redeliveries
        self.dead: list[Task] = []  # given up on; the broker takes them after each call
        self.tasks: dict[str, Task] = {}  # every queued or assigned task, by id
        self.workers: dict[bytes, WorkerState] = {}
        self.lanes: dict[str, Lane] = {}  # keys with a waiting or running task
        self.ready: dict[str, ReadyQueue] = {}
        self.queued: dict[str, int] = {}  # tasks waiting (in deques or lanes) per queue
        #: (queue, task name) -> the workers that take it
        self._by_route: dict[tuple[str, str | None], dict[bytes, WorkerState]] = {}
        self._affinity: OrderedDict[str, bytes] = OrderedDict()

    # ------------------------------------------------------------------ tasks

    def submit(self, task: Task) -> list[Assignment]:
        """Accept a new task. Its id must not be known (the broker deduplicates)."""
        self.tasks[task.id] = task
        self.queued[task.queue] = self.queued.get(task.queue, 0) + 1
        out: list[Assignment] = []
        if task.key is None:
            self._make_ready(task, None, out)
            return out
        lane = self._lane(task.key)
        lane.waiting.append(task)
        if lane.running is None and not lane.in_ready:
            self._make_ready(lane, self._affinity.get(task.key), out)
        return out

    def retry(
        self, worker_id: bytes, task_id: str, delivery: int | None = None
    ) -> tuple[Task | None, list[Assignment]]:
        """The task asked to be run again later. It leaves the worker but keeps its
        key (so the key's later tasks still wait behind it) until :meth:`release`."""
        taken = self._take(worker_id, task_id, delivery)
        if taken is None:
            return None, []
        task, worker = taken
        task.worker = None
        task.started = False
        task.progress = None
        task.retrying = True
        task.retries += 1
        out: list[Assignment] = []
        self._pump(worker, out)
        return task, out

    def release(self, task_id: str) -> list[Assignment]:
        """A retry delay ran out: the task goes to the head of its lane (or queue)."""
        task = self.tasks.get(task_id)
        if task is None or not task.retrying:
            return []
        task.retrying = False
        out: list[Assignment] = []
        self._requeue([task], out, handed_back=False)
        return out

    def cancel(self, task_id: str) -> tuple[Task | None, list[Assignment]]:
        """Remove a task that waits for a worker (queued, or waiting out a retry delay),
        e.g. revoked or expired. Returns the task, or None if it is unknown or a worker
        holds it, and the assignments that follow (its key's next task may now run)."""
        task = self.tasks.get(task_id)
        if task is None or task.worker is not None:
            return None, []
        out: list[Assignment] = []
        if task.retrying:  # holds its key, and is in no queue
            task.retrying = False
            self._release(task, None, out)
            return task, out
        del self.tasks[task_id]
        self._unqueue(task)
        if task.key is None:
            self._drop_ready(task.queue, task, task.priority)
            return task, out
        lane = self.lanes[task.key]
        ready_head = lane.in_ready and lane.waiting[0] is task
        if ready_head:  # out of the ready structure while the task still heads it
            self._drop_ready(task.queue, lane, task.priority)
            lane.in_ready = False
        lane.waiting.remove(task)
        if ready_head and lane.waiting:
            self._make_ready(lane, self._affinity.get(task.key), out, front=True)
        if not lane.waiting and lane.running is None:
            del self.lanes[task.key]
        return task, out

    def _drop_ready(self, queue: str, entry: _Entry, priority: int) -> None:
        ready = self.ready[queue]
        ready.remove(entry, priority)
        if not ready:
            del self.ready[queue]

    def started(self, worker_id: bytes, task_id: str, delivery: int | None = None) -> bool:
        """Mark a task started; False if ``worker_id`` does not hold it."""
        task = self.held(worker_id, task_id, delivery)
        if task is None:
            return False
        task.started = True
        return True

    def done(
        self, worker_id: bytes, task_id: str, delivery: int | None = None
    ) -> tuple[Task | None, list[Assignment]]:
        """A worker finished a task. Returns the task (None if the worker did not hold it,
        e.g. it was handed to another worker meanwhile) and the assignments that follow."""
        taken = self._take(worker_id, task_id, delivery)
        if taken is None:
            return None, []
        task, worker = taken
        out: list[Assignment] = []
        self._release(task, worker_id, out)
        self._pump(worker, out)
        return task, out

    def lost(
        self, worker_id: bytes, task_id: str, delivery: int | None = None, *, counts: bool = True
    ) -> tuple[Task | None, list[Assignment]]:
        """The worker says the process running the task died: hand the task back (to the
        head of its lane), or give up on it after ``max_redeliveries``. ``counts``: False
        when the worker stopped it on purpose (fencing, shutdown), not a crash."""
        tasks, out = self._hand_back(worker_id, [(task_id, delivery)], counts)
        return (tasks[0] if tasks else None), out

    def give_back(
        self, worker_id: bytes, items: list[tuple[str, int | None]]
    ) -> tuple[list[Task], list[Assignment]]:
        """The worker gives back tasks it has not started, as (id, delivery): they go
        back to the head of their lanes (or queues) in this order, not counted as
        redeliveries. Returns the tasks it held, and the assignments that follow."""
        return self._hand_back(worker_id, items, False)

    def _hand_back(
        self, worker_id: bytes, items: list[tuple[str, int | None]], counts: bool
    ) -> tuple[list[Task], list[Assignment]]:
        """Take the tasks ``worker_id`` holds under those deliveries back to the head of
        their lanes, in order, then refill the worker's free slots."""
        taken = [self._take(worker_id, task_id, delivery) for task_id, delivery in items]
        tasks = [t[0] for t in taken if t is not None]
        out: list[Assignment] = []
        if not tasks:
            return tasks, out
        self._requeue(tasks, out, handed_back=counts)
        self._pump(self.workers[worker_id], out)
        return tasks, out

    def _release(self, task: Task, preferred: bytes | None, out: list[Assignment]) -> None:
        """Forget a finished task; its key's next task becomes ready."""
        del self.tasks[task.id]
        if task.key is not None:
            lane = self.lanes[task.key]
            lane.running = None
            if lane.waiting:
                self._make_ready(lane, preferred, out)
            else:
                del self.lanes[task.key]

    def _take(
        self, worker_id: bytes, task_id: str, delivery: int | None
    ) -> tuple[Task, WorkerState] | None:
        """Remove a task from the worker holding it under that delivery, if it does."""
        task = self.held(worker_id, task_id, delivery)
        if task is None:
            return None
        worker = self.workers[worker_id]
        del worker.running[task_id]
        return task, worker

    def set_capacity(self, worker_id: bytes, capacity: int) -> list[Assignment]:
        """Change a worker's credit (slots + prefetch); more credit is filled at once.
        Less takes nothing back: the worker keeps what it holds and gets no more until
        it is under the new capacity."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.capacity == capacity:
            return []
        worker.capacity = capacity
        out: list[Assignment] = []
        self._pump(worker, out)
        return out

    def held(self, worker_id: bytes, task_id: str, delivery: int | None) -> Task | None:
        """The task if ``worker_id`` holds it under this delivery (None: any delivery).

        A delivery number tells a report about the current assignment from a late one
        about an earlier assignment of the same task to the same worker."""
        task = self.tasks.get(task_id)
        if task is None or task.worker != worker_id:
            return None
        if delivery is not None and delivery != task.delivery:
            return None
        return task

    # ---------------------------------------------------------------- workers

    def add_worker(
        self,
        worker_id: bytes,
        queues: Iterable[str],
        capacity: int,
        running: Iterable[str] | Mapping[str, int | None] = (),
        names: Iterable[str | None] = (None,),
    ) -> list[Assignment]:
        """A worker said READY: it takes tasks of ``names`` from ``queues``. ``running``
        names the tasks it still runs (or holds a result for), as ids or as a map id ->
        delivery; those this scheduler still assigns to ``worker_id`` under that delivery
        stay attached, the rest it held are handed back, not counted as redeliveries:
        the same worker (its id names one process) claims every task it started,
        running or ended, so the rest never reached it (e.g. it gave up a connection
        with them unread). Returns the assignments that fill its free slots."""
        old = self.workers.get(worker_id)
        out: list[Assignment] = []
        if old is not None:
            claims = running if isinstance(running, Mapping) else dict.fromkeys(running)

            def kept(task: Task) -> bool:
                if task.id not in claims:
                    return False
                delivery = claims[task.id]
                return delivery is None or delivery == task.delivery

            lost = [t for t in old.running.values() if not kept(t)]
            self._forget_worker(old)
            worker = WorkerState(worker_id, queues, capacity, names)
            worker.running = {k: t for k, t in old.running.items() if kept(t)}
            self._register(worker)
            self._requeue(lost, out, handed_back=False)
        else:
            worker = WorkerState(worker_id, queues, capacity, names)
            self._register(worker)
        self._pump(worker, out)
        return out

    def restore(self, task: Task, worker_id: bytes | None) -> None:
        """Put back a task from the journal at start-up, before any worker connects
        (a task with ``retrying`` set waits for :meth:`release`).

        A task that a worker held stays held by a placeholder for that worker (no
        slots, no queues), so its key stays busy until the worker says READY again
        (and re-attaches it) or is given up on with :meth:`remove_worker`. Restore the
        held tasks first, then the waiting ones in the order they were accepted."""
        if worker_id is None and not task.retrying:
            self.submit(task)
            return
        self.tasks[task.id] = task
        if task.key is not None:
            self._lane(task.key).running = task  # held: by a worker, or a retry delay
        if worker_id is None:  # waiting out a retry delay, on no worker
            return
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = WorkerState(worker_id, (), 0, ())
            self._register(worker)
        task.worker = worker_id
        worker.running[task.id] = task

    def _lane(self, key: str) -> Lane:
        """The lane of ``key``, made if it has none."""
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(key)
        return lane

    def remove_worker(
        self, worker_id: bytes, *, counts: bool = True
    ) -> tuple[list[Task], list[Assignment]]:
        """A worker died or left: its tasks go back to the head of their lanes.
        ``counts``: False when it left on purpose (shutdown), so the hand-backs do not
        count towards making the tasks dead letters."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return [], []
        self._forget_worker(worker)
        lost = list(worker.running.values())
        out: list[Assignment] = []
        self._requeue(lost, out, handed_back=counts)
        return lost, out

    def drop_name(
        self, worker_id: bytes, task_id: str, delivery: int | None
    ) -> tuple[Task | None, list[Assignment]]:
        """The worker cannot run this task's name after all (it answered UnknownTask):
        it is sent no more tasks of that name, and the task goes back to the head of its
        lane (not counted as a redelivery) for a worker that has the name."""
        task = self.held(worker_id, task_id, delivery)
        worker = self.workers.get(worker_id)
        if task is None or worker is None:
            return None, []
        if task.name in worker.names:
            self._forget_worker(worker)
            worker.names = worker.names - {task.name}
            self._register(worker)
        tasks, out = self._hand_back(worker_id, [(task_id, delivery)], False)
        return tasks[0], out

    def _register(self, worker: WorkerState) -> None:
        self.workers[worker.id] = worker
        for route in worker.routes():
            self._by_route.setdefault(route, {})[worker.id] = worker

    def _forget_worker(self, worker: WorkerState) -> None:
        del self.workers[worker.id]
        for route in worker.routes():
            members = self._by_route.get(route)
            if members is not None:
                members.pop(worker.id, None)
                if not members:
                    del self._by_route[route]

    def _requeue(self, lost: list[Task], out: list[Assignment], handed_back: bool = True) -> None:
        """Put tasks back at the head of their lanes (or queues). ``handed_back``: their
        worker died under them, which counts towards making them dead letters."""
        # Reversed so that pushing to the front keeps the tasks' relative order; all are
        # pushed before any is assigned, so the free slots go to the highest priority
        # and oldest of them (assigning while pushing gave a slot to the last one).
        touched: set[tuple[str, str | None]] = set()
        for task in reversed(lost):
            task.worker = None
            task.started = False
            task.progress = None
            task.redeliveries += handed_back
            if task.redeliveries > self.max_redeliveries:
                self.dead.append(task)
                self._release(task, None, out)
                continue
            self.queued[task.queue] = self.queued.get(task.queue, 0) + 1
            touched.add((task.queue, task.name))
            if task.key is None:
                self._push_ready(task, front=True)
                continue
            lane = self.lanes[task.key]
            lane.running = None
            lane.waiting.appendleft(task)
            self._push_ready(lane, front=True)
        for route in touched:
            for worker in list(self._by_route.get(route, {}).values()):
                if worker.free > 0:
                    self._pump(worker, out)

    # ---------------------------------------------------------------- routing

    def _make_ready(
        self, entry: _Entry, preferred: bytes | None, out: list[Assignment], front: bool = False
    ) -> None:
        head = _head(entry)
        ready = self.ready.get(head.queue)
        # By the invariant, a backlog of its name means no worker that takes it is free.
        if ready is None or not ready.has(head.name):
            worker = self._pick_worker(head.queue, head.name, preferred)
            # A worker freed by the call in progress (done, retry) may find work of its
            # other names waiting in this queue, maybe of a higher priority: then the
            # entry queues up and the caller's pump takes the best of them.
            if worker is not None and (ready is None or not ready.any_of(worker.names)):
                out.append(self._assign(worker, entry))
                return
        self._push_ready(entry, front)

    def _push_ready(self, entry: _Entry, front: bool = False) -> None:
        """Put an entry in its queue's ready structure (no worker is picked here)."""
        queue = _head(entry).queue
        ready = self.ready.get(queue)
        if ready is None:
            ready = self.ready[queue] = ReadyQueue()
        if isinstance(entry, Lane):
            entry.in_ready = True
        ready.push(entry, front)

    def _pick_worker(
        self, queue: str, name: str | None, preferred: bytes | None
    ) -> WorkerState | None:
        members = self._by_route.get((queue, name))
        if not members:
            return None
        if preferred is not None:
            worker = members.get(preferred)
            if worker is not None and worker.free > 0:
                return worker
        best = None
        for worker in members.values():
            if worker.free > 0 and (best is None or worker.free > best.free):
                best = worker
        return best

    def _pump(self, worker: WorkerState, out: list[Assignment]) -> None:
        """Fill a worker's free slots from the ready deques of its queues."""
        while worker.free > 0:
            entry = self._next_entry(worker)
            if entry is None:
                return
            out.append(self._assign(worker, entry))

    def _next_entry(self, worker: WorkerState) -> _Entry | None:
        """The next ready entry the worker takes: from its first queue that has one of
        its task names waiting."""
        for queue in worker.queues:
            ready = self.ready.get(queue)
            if ready:
                entry = ready.pop(worker.names)
                if entry is None:
                    continue
                if not ready:
                    del self.ready[queue]
                return entry
        return None

    def _assign(self, worker: WorkerState, entry: _Entry) -> Assignment:
        if isinstance(entry, Lane):
            task = entry.waiting.popleft()
            entry.running = task
            entry.in_ready = False
            self._remember(entry.key, worker.id)
        else:
            task = entry
        task.worker = worker.id
        task.delivery += 1
        worker.running[task.id] = task
        self._unqueue(task)
        return worker.id, task

    def _unqueue(self, task: Task) -> None:
        self.queued[task.queue] -= 1
        if not self.queued[task.queue]:
            del self.queued[task.queue]

    def _remember(self, key: str, worker_id: bytes) -> None:
        self._affinity[key] = worker_id
        self._affinity.move_to_end(key)
        if len(self._affinity) > AFFINITY_MEMORY:
            self._affinity.popitem(last=False)

    # ------------------------------------------------------------ inspection

    def keys_in_flight(self) -> Iterator[str]:
        """Keys that have a task assigned to a worker right now."""
        return (key for key, lane in self.lanes.items() if lane.running is not None)

    def unserved(self) -> Iterator[tuple[str, str | None, int]]:
        """(queue, task name, tasks waiting) for work that no connected worker takes."""
        for queue, ready in self.ready.items():
            for name in ready.names():
                if (queue, name) not in self._by_route:
                    yield queue, name, ready.count(name)

    def serves(self, queue: str, name: str | None) -> bool:
        """True if a connected worker takes tasks of ``name`` from ``queue``."""
        return (queue, name) in self._by_route

    def check(self) -> None:
        """Verify the internal invariants; raises AssertionError. For tests."""
        for key, lane in self.lanes.items():
            assert lane.waiting or lane.running, f"empty lane {key!r} kept"
            if lane.running is not None:
                assert not lane.in_ready, f"running lane {key!r} is in a ready deque"
                assert lane.running.worker is not None or lane.running.retrying
        for queue, ready in self.ready.items():
            assert ready, f"empty ready deque {queue!r} kept"
            for name in ready.names():
                for worker in self._by_route.get((queue, name), {}).values():
                    assert worker.free <= 0, f"worker free while {queue!r} {name!r} waits"
        held = {t.id for w in self.workers.values() for t in w.running.values()}
        assigned = {t.id for t in self.tasks.values() if t.worker is not None}
        assert held == assigned, "assignment and worker views disagree"
        for worker in self.workers.values():
            assert worker.free >= 0 or worker.running, "negative credit"
