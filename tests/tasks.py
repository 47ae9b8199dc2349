"""Tasks the tests run on real workers (``zq worker tests.tasks``).

Keyed tasks leave their own records: a JSON file per run with key, seq, start, end
and pids, written by the task itself. While it runs, a task holds a non-blocking
``flock`` on a file named after its key: if another run of the same key holds it,
the overlap is recorded, so exclusivity is checked by the kernel, not by timestamps.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import zq
from tests.records import write_record

app = zq.App("tests")


@app.task
def add(x: float, y: float) -> float:
    return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task
def nap_and_mark(seconds: float, mark_dir: str) -> float:
    """Sleep, leaving a file in ``mark_dir`` as it starts (``start-*``) and another as
    it ends (``end-*``), so a test can tell where the runs are."""
    run = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    Path(mark_dir, f"start-{run}").touch()
    time.sleep(seconds)
    Path(mark_dir, f"end-{run}").touch()
    return seconds


@app.task
def unencodable() -> object:
    return object()


@app.task
def whoami() -> dict[str, int]:
    return {"pid": os.getpid(), "worker": os.getppid()}


@app.task
def linger(seconds: float) -> int:
    """Leave a non-daemon thread running for ``seconds`` after the task returns."""
    threading.Thread(target=time.sleep, args=(seconds,), daemon=False).start()
    return os.getpid()


@app.task
def die() -> None:
    """Kill the process running it (an unkeyed crash)."""
    os.kill(os.getpid(), 9)


@app.task
def whoami_after(seconds: float) -> dict[str, int]:
    time.sleep(seconds)
    return {"pid": os.getpid(), "worker": os.getppid()}


@app.task(queue="other")
def other_queue() -> str:
    return "other"


@app.task(key=lambda key, seq, seconds, record_dir: key)
def keyed(key: str, seq: int, seconds: float, record_dir: str) -> dict[str, Any]:
    """Run for ``seconds`` holding the key's lock; write a record of the run."""
    directory = Path(record_dir)
    start = time.time()
    with open(directory / f"lock-{key}", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            overlap = False
        except BlockingIOError:
            overlap = True
        time.sleep(seconds)
        end = time.time()
    record = {
        "key": key,
        "seq": seq,
        "start": start,
        "end": end,
        "overlap": overlap,
        "pid": os.getpid(),
        "worker": os.getppid(),
    }
    write_record(directory / f"run-{key}-{seq}-{os.getpid()}-{start}.json", record)
    return record


def read_records(record_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in Path(record_dir).glob("run-*.json")]


@app.task
def burn(seconds: float) -> dict[str, int]:
    """Hold the CPU (and, in a thread pool, the GIL most of the time) for ``seconds``."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += sum(range(1000))
    return {"pid": os.getpid(), "worker": os.getppid()}


@app.task(key=lambda key, antidote: key)
def poison(key: str, antidote: str) -> str:
    """Kill the process running it, unless the file ``antidote`` exists."""
    if not Path(antidote).exists():
        os.kill(os.getpid(), 9)
    return "cured"


@app.task(soft_time_limit=0.5)
def soft_limited(catch: bool) -> str:
    try:
        time.sleep(10)
    except zq.SoftTimeLimitExceeded:
        if catch:
            return "cleaned up"
        raise
    return "not interrupted"


@app.task(time_limit=1.0)
def hard_limited(seconds: float) -> int:
    time.sleep(seconds)  # in C: only a kill stops it
    return os.getpid()


@app.task
def hog(mib: int) -> int:
    block = bytearray(mib * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it counts in RSS
    return os.getpid()


def _record_run(record_dir: str, key: str, seq: int, start: float, tag: str = "") -> None:
    record = {
        "key": key,
        "seq": seq,
        "start": start,
        "end": time.time(),
        "overlap": False,
        "pid": os.getpid(),
        "worker": os.getppid(),
    }
    write_record(Path(record_dir) / f"run-{key}-{seq}-{tag}{os.getpid()}-{start}.json", record)


@app.task(autoretry_for=(ConnectionError,), retries=2, retry_delay=0.1)
def flaky(counter: str, failures: int) -> int:
    """Raise ConnectionError on the first ``failures`` attempts (counted in a file)."""
    path = Path(counter)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt} failed")
    return attempt


@app.task(key=lambda key, seq, record_dir, countdown: key, retries=1)
def retry_once(key: str, seq: int, record_dir: str, countdown: float) -> str:
    """First run: record it and ask to be retried after ``countdown`` s; then succeed."""
    start = time.time()
    marker = Path(record_dir) / f"tried-{key}-{seq}"
    first = not marker.exists()
    marker.touch()
    _record_run(record_dir, key, seq, start, "first-" if first else "second-")
    if first:
        raise zq.Retry(countdown=countdown)
    return "second run"


@app.task
def blob(size: int) -> str:
    return "x" * size


@app.task
def stamp(label: str) -> list[Any]:
    """Return when it ran: [label, time.time()] (for start-order checks)."""
    return [label, time.time()]


@app.task
def redeliveries() -> int:
    """How many times the broker says this task's workers died under it."""
    return zq.current_task().redeliveries


@app.task
def progressing(steps: int, pause: float, gate: str = "") -> int:
    """Report progress ``steps`` times; with ``gate``, wait for that file before ending."""
    me = zq.current_task()
    for i in range(steps):
        me.progress(i + 1, steps, note=f"step {i + 1}")
        time.sleep(pause)
    while gate and not Path(gate).exists():
        time.sleep(0.02)
    return steps


@app.task
def pid_sleep(seconds: float, pid_file: str) -> int:
    """Write this process's pid to ``pid_file``, then sleep."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


@app.task
def mul(x: float, y: float) -> float:
    return x * y


@app.task
def total(values: list[float], offset: float = 0) -> float:
    return sum(values) + offset


@app.task
def fail_with(_previous: Any, message: str) -> None:
    """A chain step that fails (it takes the previous step's result)."""
    raise ValueError(message)


@app.task
def touch(previous: Any, path: str) -> Any:
    """A chain step that leaves a file behind, so a test can tell that it ran."""
    Path(path).write_text(json.dumps(previous))
    return previous
