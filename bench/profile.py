"""Where the time goes: py-spy on the broker, the worker and the client under load.

Only with ``python -m bench --profile`` and py-spy installed (``pip install py-spy``).
While this process runs throughput rounds (thread pool, 4 slots, journal off or on),
py-spy samples each of the three processes for ``seconds``; the report lists, per
process, the functions with the most samples on top of the stack (self) and on the
stack at all (inclusive), as percentages of the samples in which the process was
active (py-spy leaves out idle threads, e.g. one blocked in ``poll``). With
``--profile-native`` py-spy also shows C frames (libzmq, libc system calls), at the
price of pausing the processes for each sample; it then counts idle threads too
(blocked in ``poll``, ``read`` or a futex), so read those percentages against the
busy ones only. The client's figures include this process's own helper threads.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Proc, start_broker, start_client, start_worker, wait_for_workers
from bench.throughput import one_round

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH), or None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def parse(path: Path) -> dict[str, Any]:
    """Self and inclusive sample counts by function (file and name, line numbers dropped)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        stack, count = match.group(1), int(match.group(2))
        frames = [_FRAME_LINE.sub(")", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {"samples": total, "self": own, "inclusive": inclusive}


def top(profile: dict[str, Any], kind: str, n: int, below: float = 0.97) -> list[tuple[str, float]]:
    """The ``n`` functions with the most ``kind`` samples, as % of the samples (for
    inclusive, leaving out the frames present in nearly every sample: the loop's callers)."""
    total = profile["samples"] or 1
    rows = [(f, 100 * c / total) for f, c in profile[kind].most_common()]
    if kind == "inclusive":
        rows = [r for r in rows if r[1] < below * 100]
    return rows[:n]


def run(
    *,
    seconds: float,
    journal: bool = False,
    rate: int = 250,
    native: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Profile the three processes during ``seconds`` of throughput rounds."""
    exe = py_spy()
    if exe is None:
        log("  profile: skipped, py-spy is not installed (pip install py-spy)")
        return {"skipped": "py-spy not installed"}
    result: dict[str, Any] = {
        "seconds": seconds,
        "journal": journal,
        "rate_hz": rate,
        "native": native,
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zq-bench-spy-")))
        broker = start_broker(stack, journal)
        worker = start_worker(stack, broker.endpoint, pool="thread", concurrency=4)
        app = start_client(stack, broker.endpoint)
        wait_for_workers(app, 1)
        one_round(app, 1000, 60)
        spies = {}
        for name, pid in (("broker", broker.pid), ("worker", worker.pid), ("client", os.getpid())):
            args = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds))]
            args += ["--rate", str(rate), "--format", "raw"]
            # --native (C frames: libzmq, syscalls) needs py-spy to pause the process.
            args += ["--native"] if native else ["--nonblocking"]
            args += ["--output", str(tmp / f"{name}.raw")]
            spies[name] = stack.enter_context(Proc(args, f"py-spy-{name}"))
        time.sleep(0.5)  # let py-spy attach
        rounds = []
        deadline = time.monotonic() + seconds + 1
        while time.monotonic() < deadline:
            rounds.append(one_round(app, 2000, 60))
        for spy in spies.values():
            assert spy.proc is not None
            spy.proc.wait(30)
        result["tasks_per_s_during"] = rounds
        for name in spies:
            path = tmp / f"{name}.raw"
            if not path.exists():
                said = "".join(spies[name].output)
                log(f"  profile: py-spy wrote nothing for the {name}:\n{said}")
                continue
            profile = parse(path)
            active = profile["samples"] / (seconds * rate)
            result[name] = {
                "samples": profile["samples"],
                "active_fraction": active,
                "self_top": top(profile, "self", 15),
                "inclusive_top": top(profile, "inclusive", 25),
            }
            log(
                f"  profile {name}: {profile['samples']} samples (~{active:.0%} of the time active)"
            )
            for func, pct in result[name]["self_top"][:12]:
                log(f"    self {pct:5.1f}%  {func}")
    return result
