"""The payment-scoring demo: orders from many customers, scored concurrently,
never two at once for one customer, each customer's orders in submission order.

:func:`run_orders` submits orders to a running broker and gathers the results;
:func:`run_demo` first starts an embedded broker and local worker processes.
Both finish with :func:`summarize`, computed from the tasks' own start/end records.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click

from zq.app import App
from zq.broker import Broker, BrokerSettings
from zq.client import AsyncResult
from zq.errors import TimeoutError as ZQTimeoutError
from zq.errors import ZQError
from zq.testing import check_key_records, wait_for

SCORE = "scoring.score"


@dataclass(frozen=True)
class Summary:
    orders: int
    failed: int
    seconds: float
    latencies: list[float]  # submit -> result known, seconds
    violations: list[str]
    pids: int

    @property
    def throughput(self) -> float:
        return self.orders / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def lines(self) -> list[str]:
        ok = "OK" if not self.violations and not self.failed else "FAILED"
        lat = ", ".join(f"p{q} {self.percentile(q) * 1000:.0f} ms" for q in (50, 95, 99))
        by = _plural(self.pids, "scoring process", "scoring processes")
        out = [
            f"orders scored:   {self.orders - self.failed}/{self.orders} "
            f"in {self.seconds:.2f}s by {by}",
            f"throughput:      {self.throughput:.1f} orders/s",
            f"latency:         {lat} (submit to result, all orders sent at once)",
            f"per-customer check ({ok}): no overlapping scorings, "
            f"orders started in submission order",
        ]
        out += [f"  violation: {v}" for v in self.violations[:20]]
        return out


def make_orders(
    n: int, customers: int, *, min_work: float, max_work: float, seed: int | None = None
) -> list[dict[str, Any]]:
    """``n`` orders spread over ``customers`` customers, with per-customer sequence numbers."""
    rng = random.Random(seed)
    seqs: dict[str, int] = {}
    orders = []
    for i in range(n):
        customer = f"c-{rng.randrange(customers):04d}"
        seqs[customer] = seqs.get(customer, 0) + 1
        orders.append(
            {
                "id": i,
                "customer": customer,
                "seq": seqs[customer],
                "amount": round(rng.uniform(5, 500), 2),
                "work": round(rng.uniform(min_work, max_work), 4),
            }
        )
    return orders


def run_orders(
    app: App,
    orders: list[dict[str, Any]],
    *,
    timeout: float = 600.0,
    on_result: Callable[[dict[str, Any], Any], None] | None = None,
) -> Summary:
    """Submit every order, wait for all results, call ``on_result`` as each arrives."""
    start = time.time()
    pending: dict[str, tuple[dict[str, Any], AsyncResult, float]] = {}
    for order in orders:
        res = app.send_task(SCORE, [order], key=order["customer"])
        pending[res.id] = (order, res, time.time())
    records, latencies, failed = [], [], 0
    deadline = time.monotonic() + timeout
    while pending:
        for task_id, (order, res, submitted) in list(pending.items()):
            if not res.ready_here():
                continue
            del pending[task_id]
            outcome = res.get(propagate=False)
            if isinstance(outcome, ZQError):
                failed += 1
            else:
                records.append(outcome)
            latencies.append((res.date_done or time.time()) - submitted)
            if on_result is not None:
                on_result(order, outcome)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} orders unfinished after {timeout}s")
            # Wait on the oldest order; later ones are picked up by the next scan.
            # (get() falls back to FETCH if the PUB message was lost.)
            with contextlib.suppress(ZQTimeoutError):
                next(iter(pending.values()))[1].get(timeout=0.05, propagate=False)
    seconds = time.time() - start
    return Summary(
        len(orders),
        failed,
        seconds,
        latencies,
        check_key_records(records),
        len({r["pid"] for r in records}),
    )


@contextlib.contextmanager
def demo_cluster(*, workers: int, concurrency: int, echo: Callable[[str], None]) -> Iterator[App]:
    """An embedded broker and ``workers`` local worker processes; yields a client App."""
    broker = Broker(BrokerSettings(bind="tcp://127.0.0.1:*")).start()
    echo(f"embedded broker on {broker.endpoint} (results on {broker.pub_endpoint})")
    command = [sys.executable, "-m", "zq", "--log-level", "warning", "worker", "zq.scoring"]
    command += ["--broker", broker.endpoint, "--concurrency", str(concurrency)]
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(workers)]
    app = App("zq.demo", broker=broker.endpoint)
    try:
        wait_for(lambda: len(app.status()["workers"]) == workers, 30, "workers online")
        each = _plural(concurrency, "scoring process", "scoring processes")
        echo(f"{_plural(workers, 'worker', 'workers')} online, {each} each")
        yield app
    finally:
        app.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        broker.stop()


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


class ProgressLines:
    """Progress as a line every ``every`` seconds, and one at the end.

    For output that is not a terminal (a file, a pipe, a CI log): click's bar redraws
    one line in place, so there it shows nothing until it ends."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        echo: Callable[[str], None],
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self._echo = echo
        self._every = every
        self._clock = clock
        self._start = self._last = clock()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; print a line if ``every`` has passed, or at the end."""
        self.done += n
        now = self._clock()
        if self.done >= self.total or now - self._last >= self._every:
            self._last = now
            percent = 100 * self.done // max(self.total, 1)
            self._echo(
                f"{self.label}: {self.done}/{self.total} ({percent}%) "
                f"after {now - self._start:.1f}s"
            )


@contextlib.contextmanager
def progress(total: int, *, label: str) -> Iterator[Callable[[int], None]]:
    """Yields a function to count finished items: it moves click's progress bar on a
    terminal, else prints :class:`ProgressLines`."""
    if sys.stdout is not None and sys.stdout.isatty():
        with click.progressbar(length=total, label=label, show_pos=True) as bar:
            yield bar.update
    else:
        yield ProgressLines(total, label=label, echo=click.echo).update
