"""Harnesses for testing code that uses zq: real brokers and workers, bounded waits.

::

    from zq.testing import BrokerProcess, WorkerProcess

    with BrokerProcess() as broker, WorkerProcess("myapp.tasks", broker.endpoint):
        app = zq.App("t", broker=broker.endpoint)
        ...

Every process is started on a random loopback port, waited for with a deadline and
killed by its pid on exit. :func:`check_key_records` checks the scheduling promises
from records the tasks wrote themselves.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

_LISTENING = re.compile(r"listening on (\S+) \(results and events on (\S+)\)")
_WORKER_STARTED = re.compile(r"^zq worker \S+ for ")


def wait_for(condition: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class OutputReader:
    """Reads a child's output on a daemon thread from the start, so that a chatty child
    never blocks on a full pipe: keeps its last lines in ``lines``, and lets a caller
    wait for a line that matches."""

    def __init__(self, stream: IO[str], keep: int = 2000) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        # Bounded: after start-up nobody may ever ask for them.
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=10_000)
        self._stream = stream
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._stream:
                self.lines.append(line)
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(line)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # end of output: the child exited

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The next line matching ``pattern``; None after ``timeout`` s or at the end."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            match = pattern.search(line)
            if match:
                return match
        return None


class _Process:
    """A zq command run as a child process, killed by pid on close."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._reader: OutputReader | None = None
        self._earlier: list[str] = []  # output of previous runs (before a restart)

    @property
    def output(self) -> list[str]:
        """The last lines it printed (across restarts)."""
        return self._earlier + list(self._reader.lines if self._reader else ())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> _Process:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zq", *self.args],
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if self._reader is not None:
            self._earlier += list(self._reader.lines)
        assert self.proc.stdout is not None
        self._reader = OutputReader(self.proc.stdout)
        return self

    def read_until(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for a line of the process's output to match; raise with the output if not."""
        assert self._reader is not None
        match = self._reader.wait_for(pattern, timeout)
        if match is None:
            said = "".join(self._reader.lines)
            raise AssertionError(f"{self.args} never printed {pattern.pattern!r}:\n{said}")
        return match

    def _started(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for the start-up line; a process that never prints it is killed."""
        try:
            return self.read_until(pattern, timeout)
        except BaseException:
            self.close()
            raise

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process (if still running) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self._reader is not None:
            # EOF comes once the process and any children holding the pipe are gone;
            # closing the pipe under a blocked reader would wait for it anyway.
            self._reader.thread.join(5)
        if (
            self.proc is not None
            and self.proc.stdout is not None
            and not (self._reader is not None and self._reader.thread.is_alive())
        ):
            self.proc.stdout.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrokerProcess(_Process):
    """``zq broker`` on a random loopback port (or ``bind``); ``endpoint`` once started.

    ``journal`` is the journal file; by default a fresh one in a temporary directory
    that is removed on exit, kept across :meth:`restart`."""

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:*",
        *extra: str,
        journal: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._tmp = None if journal else tempfile.TemporaryDirectory(prefix="zq-test-")
        if self._tmp is not None:
            journal = os.path.join(self._tmp.name, "journal.db")
        super().__init__(["broker", "--bind", bind, "--journal", str(journal), *extra], env)
        self.endpoint = self.pub_endpoint = ""
        self.start()

    def start(self) -> BrokerProcess:
        super().start()
        match = self._started(_LISTENING, 20)
        self.endpoint, self.pub_endpoint = match.group(1), match.group(2)
        return self

    def restart(self) -> BrokerProcess:
        """Start again on the same address (after a kill)."""
        self.close()
        self.args[2] = self.endpoint
        if "--pub" not in self.args:
            self.args += ["--pub", self.pub_endpoint]
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class WorkerProcess(_Process):
    """``zq worker SPEC`` connected to ``broker``; started at once."""

    def __init__(
        self,
        spec: str,
        broker: str,
        *,
        concurrency: int = 2,
        pool: str = "process",
        queues: Iterable[str] = ("default",),
        extra: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        args = [
            "worker",
            spec,
            "--broker",
            broker,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--queues",
            ",".join(queues),
            *extra,
        ]
        super().__init__(args, env)
        self.start()

    def start(self) -> WorkerProcess:
        super().start()
        self._started(_WORKER_STARTED, 30)
        return self


def check_key_records(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Violations of per-key exclusivity and order in task records.

    Each record has ``key``, ``seq`` (the order the key's tasks were submitted in),
    ``start`` and ``end`` (wall-clock times the task wrote). Returns one line per
    violation: two runs of a key overlapping, or a key's tasks starting out of order.
    """
    by_key: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    problems = []
    for key, runs in by_key.items():
        runs.sort(key=lambda r: r["start"])
        for before, after in itertools.pairwise(runs):
            if after["start"] < before["end"]:
                problems.append(f"key {key!r}: seq {before['seq']} and {after['seq']} overlap")
            if after["seq"] < before["seq"]:
                problems.append(f"key {key!r}: seq {after['seq']} started after {before['seq']}")
    return problems
