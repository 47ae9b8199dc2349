"""Shared pieces: child processes killed by pid, /proc readings, statistics, the machine.

Every process a benchmark starts is a :class:`Proc` entered on an
:class:`contextlib.ExitStack`, so it is killed (its whole process group, by the pid it
was started with) in a ``finally`` whatever happens; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zq
from zq.testing import OutputReader

#: The repository root: children run here, so ``bench.tasks`` is importable.
ROOT = Path(__file__).resolve().parent.parent
#: Loopback only, a random port.
LOOPBACK = "tcp://127.0.0.1:*"

_LISTENING = re.compile(r"listening on (\S+) \(results and events on (\S+)\)")
_WORKER_STARTED = re.compile(r"^zq worker \S+ for ")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for children: ``bench`` importable, zq logging at warnings."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "PYTHONUNBUFFERED": "1",
        "ZQ_LOG_LEVEL": os.environ.get("ZQ_LOG_LEVEL", "warning"),
        **extra,
    }


class Proc:
    """A child process in its own session, killed with its process group on exit.

    ``__enter__`` only starts it (so the kill is registered as soon as it exists);
    :meth:`wait_line` then waits, with a deadline, for a line of its output."""

    def __init__(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.name = name
        self.env = env or child_env()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: OutputReader | None = None

    @property
    def output(self) -> deque[str]:
        """Its last lines of output."""
        return self._reader.lines if self._reader is not None else deque()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Proc:
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: pool children die with it
        )
        assert self.proc.stdout is not None
        self._reader = OutputReader(self.proc.stdout, keep=200)
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def wait_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line of output matching ``pattern``; raises after ``timeout`` s."""
        assert self._reader is not None
        match = self._reader.wait_for(pattern, timeout)
        if match is None:
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) never printed {pattern.pattern!r}; "
                f"its last output:\n{''.join(self.output)}"
            )
        return match

    def terminate(self, timeout: float) -> None:
        """SIGTERM the process (graceful stop), wait up to ``timeout`` s, then kill."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process group led by our pid, then reap the process."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# ------------------------------------------------------------------ zq processes


@dataclass
class Broker:
    """A running ``zq broker`` child."""

    proc: Proc
    endpoint: str
    journal: str

    @property
    def pid(self) -> int:
        return self.proc.pid


#: How the benchmarks run the ``zq`` command.
ZQ = (sys.executable, "-m", "zq")


def start_broker(
    stack: contextlib.ExitStack, journal: bool, *extra: str, zq: Sequence[str] = ZQ
) -> Broker:
    """``zq broker`` on a random loopback port; ``journal`` False is ``:memory:``,
    True a SQLite file in a temporary directory (removed with the stack)."""
    if journal:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="zq-bench-"))
        path = os.path.join(tmp, "journal.db")
    else:
        path = ":memory:"
    args = [*zq, "broker", "--bind", LOOPBACK, "--journal", path, *extra]
    proc = stack.enter_context(Proc(args, "broker"))
    match = proc.wait_line(_LISTENING, 20)
    return Broker(proc, match.group(1), path)


def start_worker(
    stack: contextlib.ExitStack,
    endpoint: str,
    *,
    pool: str = "thread",
    concurrency: int = 1,
    spec: str = "bench.tasks",
    zq: Sequence[str] = ZQ,
) -> Proc:
    """``zq worker bench.tasks`` for the broker at ``endpoint``; waits for its banner."""
    args = [*zq, "worker", spec, "--broker", endpoint]
    args += ["--pool", pool, "--concurrency", str(concurrency)]
    proc = stack.enter_context(Proc(args, f"worker-{pool}{concurrency}"))
    proc.wait_line(_WORKER_STARTED, 30)
    return proc


def start_client(stack: contextlib.ExitStack, endpoint: str) -> zq.App:
    """A client App for ``endpoint``, closed with the stack (before its processes end)."""
    app = zq.App("bench-client", broker=endpoint)
    stack.callback(app.close)
    return app


def wait_for_workers(app: zq.App, count: int, timeout: float = 30.0) -> None:
    """Poll the broker's STATUS until it lists ``count`` workers."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = len(app.status(timeout=5.0)["workers"])
        if seen >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the broker lists {seen} worker(s) after {timeout}s, expected {count}")


def gather(results: Iterable[Any], timeout: float) -> list[Any]:
    """``get()`` every AsyncResult within one overall deadline."""
    deadline = time.monotonic() + timeout
    return [r.get(timeout=max(0.001, deadline - time.monotonic())) for r in results]


# ---------------------------------------------------------------------- /proc


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (utime + stime in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every live process in process group ``pgid`` (a :class:`Proc` and,
    e.g., a worker's pool children), from /proc/*/stat."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


class CpuMeter:
    """CPU seconds spent by process groups (our children: each leads its own) and by
    single processes (this one), summed over ``start()``/``stop()`` intervals."""

    def __init__(self, groups: dict[str, int], processes: dict[str, int]) -> None:
        self.readers: dict[str, Callable[[], float]] = {
            **{name: functools.partial(group_cpu_seconds, pid) for name, pid in groups.items()},
            **{name: functools.partial(cpu_seconds, pid) for name, pid in processes.items()},
        }
        self.totals = dict.fromkeys(self.readers, 0.0)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: read() for name, read in self.readers.items()}

    def stop(self) -> None:
        for name, read in self.readers.items():
            self.totals[name] += read() - self._start[name]

    def per_task_us(self, tasks: int) -> dict[str, float]:
        """Microseconds of CPU per task, per process and in all."""
        out = {name: 1e6 * seconds / tasks for name, seconds in self.totals.items()}
        out["total"] = sum(out.values())
        return out


def describe_cpu(per_task: dict[str, float]) -> str:
    """``CPU/task: broker 120 us + ...`` for a table note."""
    parts = [f"{name} {us:.0f}" for name, us in per_task.items() if name != "total"]
    return f"CPU us/task: {' + '.join(parts)} = {per_task['total']:.0f}"


# ----------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the two nearest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def repeat(times: int, run: Callable[[], float]) -> list[float]:
    """``run()`` ``times`` times; the values it returned."""
    return [run() for _ in range(times)]


# -------------------------------------------------------------------- machine


def _git(*args: str) -> str:
    """Output of a git command in the repository, or "" if git is unavailable."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, CPU model, load, Python, pyzmq, libzmq, msgpack."""
    import msgpack
    import zmq

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load: list[str] = []
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "zq": zq.__version__,
        "loadavg_at_start": " ".join(load),
        "zq_commit": _git("rev-parse", "--short", "HEAD"),
        "zq_uncommitted_changes": bool(_git("status", "--porcelain", "--", "zq")),
        "tmpdir": tempfile.gettempdir(),
    }


# ---------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: a figure, what it is compared with, and its target."""

    bench: str
    metric: str
    value: float
    unit: str
    reference: float | None = None  # the limit measured in the same run, if any
    ratio: float | None = None  # value / reference
    target: str = ""
    met: bool | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def timed(label: str, log: Callable[[str], None]) -> Iterator[None]:
    """Log how long a block took."""
    start = time.monotonic()
    try:
        yield
    finally:
        log(f"  {label}: {time.monotonic() - start:.1f}s")
