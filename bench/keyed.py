"""Keyed scheduling efficiency: makespan of a keyed workload against its ideal bound.

A seeded workload of sleeps (log-uniform between 10 and 500 ms) spread uniformly over
``keys`` keys, about ``work`` seconds of sleep in all, runs on ``workers`` worker
processes of ``slots`` thread slots each. The client submits every task at once and
waits for all results. Each round draws a new workload (seeds ``seed``,
``seed + 1``, ...), so the medians are not one lucky or unlucky draw.

* **makespan**: first submit to last result received, in this process.
* **ideal bound**: ``max(total work / slots, longest key's total work)``; no schedule
  can beat it (tasks of one key run one at a time, in order). The work is what the
  tasks measured themselves (their sleep plus its overshoot).
* **FIFO bound**: the same workload on a zero-overhead simulation of zq's policy
  (ready lanes first come first served, a key's next task queued behind the lanes
  already ready), so the gap splits into policy (FIFO vs bound) and overhead
  (zq vs FIFO).
* **other policies** (simulated on the same tasks, zero overhead, for reference):
  *most waiting first* (a free slot takes the ready key with the most tasks queued,
  the only hint a broker has without knowing run times) and *knowing run times* (the
  ready key with the most work left; no real scheduler knows that). They say how much
  of the gap a different policy could close, at the cost of FIFO order across keys.
* **utilisation**: total work / (slots x makespan).
* **FIFO policy by workload size** (simulated, 15 draws per size): the bound leaves
  out the end of a run, when fewer keys than slots have work left and slots idle (up
  to a longest task's worth); FIFO order does nothing to shorten it, and it weighs
  less the longer the run. So the default workload is 96 s of sleep (a makespan of
  ~12 s on 8 slots, 24 times the longest task), and this row says what the same
  policy gives on shorter and longer ones.

The task records also give a check of the promise itself: no two runs of one key
overlap and a key's tasks start in submission order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from bench.common import (
    Row,
    gather,
    median,
    start_broker,
    start_client,
    start_worker,
    wait_for_workers,
)

TARGET_OVER_IDEAL = 0.05
#: Policies simulated on each round's tasks: (label, summary field, note).
_SIMULATED = (
    ("FIFO policy", "fifo_over_ideal", "zq's policy with zero overhead"),
    ("most-waiting-first policy", "most_waiting_over_ideal", "not FIFO across keys"),
    ("policy knowing run times", "knowing_over_ideal", "needs run times in advance"),
)
SHORTEST, LONGEST = 0.010, 0.500
#: Seconds of work at which the FIFO policy's gap is simulated, and draws per size.
_SIZES, _DRAWS = (24.0, 48.0, 96.0, 192.0), 15


def workload(work: float, keys: int, seed: int) -> list[tuple[str, float]]:
    """(key, seconds) in submission order, adding up to about ``work`` seconds."""
    rng = random.Random(seed)
    tasks: list[tuple[str, float]] = []
    total = 0.0
    while total < work:
        seconds = round(math.exp(rng.uniform(math.log(SHORTEST), math.log(LONGEST))), 4)
        tasks.append((f"k{rng.randrange(keys):03d}", seconds))
        total += seconds
    return tasks


def ideal_bound(tasks: list[tuple[str, float]], slots: int) -> float:
    """``max(total / slots, longest key's total)``."""
    per_key: dict[str, float] = defaultdict(float)
    for key, seconds in tasks:
        per_key[key] += seconds
    return max(sum(per_key.values()) / slots, max(per_key.values()))


def fifo_makespan(tasks: list[tuple[str, float]], slots: int) -> float:
    """The makespan of zq's policy with zero overhead: an event simulation.

    Keys' lanes enter a FIFO of ready lanes when their head may run; a free slot takes
    the first ready lane's head; when a task ends its lane, if not empty, rejoins the
    FIFO at the back."""
    return _simulate(tasks, slots, None)


def policy_makespan(tasks: list[tuple[str, float]], slots: int, policy: str) -> float:
    """The makespan, with zero overhead, of a policy that gives a free slot the ready
    key with the most tasks waiting (``"most-waiting"``) or the most work left
    (``"knowing-run-times"``); ties go to the key submitted first."""
    return _simulate(tasks, slots, len if policy == "most-waiting" else sum)


def _simulate(
    tasks: list[tuple[str, float]], slots: int, left: Callable[[deque[float]], float] | None
) -> float:
    """Run ``tasks`` (key, seconds) on ``slots``, one task per key at a time: a free
    slot takes the first ready key (``left`` None) or the one whose waiting tasks
    score highest by ``left`` (ties: the key that came first)."""
    lanes: dict[str, deque[float]] = defaultdict(deque)
    for key, seconds in tasks:
        lanes[key].append(seconds)
    first = {key: index for index, key in enumerate(lanes)}
    ready = list(lanes)  # in the order the keys first appear
    running: list[tuple[float, str]] = []  # (end, key) heap
    now = 0.0
    free = slots
    while ready or running:
        while free and ready:
            if left is None:
                key = ready.pop(0)
            else:
                key = min(ready, key=lambda k: (-left(lanes[k]), first[k]))
                ready.remove(key)
            heapq.heappush(running, (now + lanes[key][0], key))
            free -= 1
        now, key = heapq.heappop(running)
        free += 1
        lanes[key].popleft()
        if lanes[key]:
            ready.append(key)
    return now


def fifo_gap_by_size(keys: int, slots: int) -> dict[float, float]:
    """Seconds of work -> median over draws of the FIFO policy's makespan over the
    ideal bound (zero overhead), on workloads like the bench's."""
    gaps = {}
    for work in _SIZES:
        loads = [workload(work, keys, seed) for seed in range(1, _DRAWS + 1)]
        gaps[work] = median([fifo_makespan(t, slots) / ideal_bound(t, slots) - 1 for t in loads])
    return gaps


def violations(records: list[dict[str, Any]], order: dict[str, list[int]]) -> int:
    """Runs of one key that overlap or start out of submission order."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for index, record in enumerate(records):
        by_key[record["key"]].append({**record, "seq": index})
    bad = 0
    for key, runs in by_key.items():
        runs.sort(key=lambda r: r["start"])
        bad += sum(b["start"] < a["end"] for a, b in itertools.pairwise(runs))
        bad += [r["seq"] for r in runs] != order[key]
    return bad


def one_round(app: Any, tasks: list[tuple[str, float]], slots: int) -> dict[str, Any]:
    """Submit the workload at once, wait for all of it; the round's figures."""
    start = time.perf_counter()
    results = [app.send_task("bench.keyed_sleep", (k, s), key=k) for k, s in tasks]
    records = gather(results, timeout=10 * sum(s for _, s in tasks) / slots + 30)
    makespan = time.perf_counter() - start
    measured = [(r["key"], r["end"] - r["start"]) for r in records]
    work = sum(s for _, s in measured)
    ideal = ideal_bound(measured, slots)
    fifo = fifo_makespan(measured, slots)
    waiting = policy_makespan(measured, slots, "most-waiting")
    knowing = policy_makespan(measured, slots, "knowing-run-times")
    order: dict[str, list[int]] = defaultdict(list)
    for index, (key, _) in enumerate(tasks):
        order[key].append(index)
    return {
        "makespan_s": makespan,
        "ideal_s": ideal,
        "fifo_s": fifo,
        "work_s": work,
        "over_ideal": makespan / ideal - 1,
        "over_fifo": makespan / fifo - 1,
        "fifo_over_ideal": fifo / ideal - 1,
        "most_waiting_over_ideal": waiting / ideal - 1,
        "knowing_over_ideal": knowing / ideal - 1,
        "utilisation": work / (slots * makespan),
        "key_violations": violations(records, order),
        "workers_used": len({r["pid"] for r in records}),
    }


def run(
    *,
    work: float,
    keys: int,
    workers: int,
    slots: int,
    repeats: int,
    seed: int = 1,
    log: Any = print,
) -> tuple[dict[str, Any], list[Row]]:
    """``repeats`` rounds of the same workload on one broker and ``workers`` workers."""
    total_slots = workers * slots
    with contextlib.ExitStack() as stack:
        broker = start_broker(stack, False)
        for _ in range(workers):
            start_worker(stack, broker.endpoint, pool="thread", concurrency=slots)
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, workers)
        app.send_task("bench.keyed_sleep", ("warm-up", 0.01), key="warm-up").get(timeout=10)
        loads = [workload(work, keys, seed + i) for i in range(repeats)]
        rounds = [one_round(app, tasks, total_slots) for tasks in loads]
    summary = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    by_size = fifo_gap_by_size(keys, total_slots)
    log(
        f"  keyed: makespan {summary['makespan_s']:.2f}s, ideal {summary['ideal_s']:.2f}s "
        f"(+{summary['over_ideal']:.1%}), FIFO policy {summary['fifo_s']:.2f}s, "
        f"utilisation {summary['utilisation']:.0%}"
    )
    result = {
        "tasks": [len(tasks) for tasks in loads],
        "keys": keys,
        "nominal_work_s": [sum(s for _, s in tasks) for tasks in loads],
        "seeds": [seed + i for i in range(repeats)],
        "slots": total_slots,
        "workers": workers,
        "rounds": rounds,
        "fifo_over_ideal_by_work_s": by_size,
        **summary,
    }
    over = summary["over_ideal"]
    rows = [
        Row(
            "keyed",
            f"makespan (~{len(loads[0])} tasks, {keys} keys, {total_slots} slots)",
            summary["makespan_s"],
            "s",
            note=f"ideal bound {summary['ideal_s']:.2f} s",
            samples=[r["makespan_s"] for r in rounds],
        ),
        Row(
            "keyed",
            "makespan over ideal bound",
            over * 100,
            "%",
            target=f"<= {TARGET_OVER_IDEAL:.0%}",
            met=over <= TARGET_OVER_IDEAL,
            samples=[r["over_ideal"] * 100 for r in rounds],
        ),
        Row(
            "keyed",
            "makespan over zero-overhead FIFO policy",
            summary["over_fifo"] * 100,
            "%",
            note=f"FIFO policy {summary['fifo_s']:.2f} s",
            samples=[r["over_fifo"] * 100 for r in rounds],
        ),
        *(
            Row(
                "keyed",
                f"{policy} over ideal bound (simulated)",
                summary[field] * 100,
                "%",
                note=note,
                samples=[r[field] * 100 for r in rounds],
            )
            for policy, field, note in _SIMULATED
        ),
        Row(
            "keyed",
            f"FIFO policy over ideal bound, {min(by_size):.0f} s of work (simulated)",
            by_size[min(by_size)] * 100,
            "%",
            note="by seconds of work, median of 15 draws: "
            + ", ".join(f"{w:.0f} s {gap:.1%}" for w, gap in by_size.items()),
        ),
        Row(
            "keyed",
            "worker utilisation",
            summary["utilisation"] * 100,
            "%",
            samples=[r["utilisation"] * 100 for r in rounds],
        ),
        Row(
            "keyed",
            "key exclusivity/order violations",
            sum(r["key_violations"] for r in rounds),
            "",
            target="0",
            met=not any(r["key_violations"] for r in rounds),
        ),
    ]
    return result, rows
