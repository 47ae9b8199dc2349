"""`zq demo` as a user runs it: what it says while it scores and in its summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from zq.demo import ProgressLines

ROOT = Path(__file__).resolve().parent.parent


def test_progress_lines_come_every_interval_and_at_the_end():
    now = [0.0]
    said: list[str] = []
    lines = ProgressLines(10, label="scoring", echo=said.append, every=1.0, clock=lambda: now[0])
    for step in range(10):
        now[0] = 0.4 * (step + 1)  # one item done every 0.4 s
        lines.update(1)
    assert said == [
        "scoring: 3/10 (30%) after 1.2s",
        "scoring: 6/10 (60%) after 2.4s",
        "scoring: 9/10 (90%) after 3.6s",
        "scoring: 10/10 (100%) after 4.0s",
    ]


def test_demo_piped_to_a_file_shows_progress_while_it_scores():
    """Piped (not a terminal), click's bar printed only 'scoring' until the end."""
    # 40 orders of 0.05 s on one process: 2 s of scoring at the least.
    options = ["--orders", "40", "--customers", "4", "--workers", "1", "--concurrency", "1"]
    options += ["--min-work", "0.05", "--max-work", "0.05"]
    out = subprocess.run(
        [sys.executable, "-m", "zq", "demo", *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "1 worker online, 1 scoring process each" in lines
    progress = [line for line in lines if re.fullmatch(r"scoring: \d+/40 \(\d+%\) after .*s", line)]
    assert len(progress) >= 2, out.stdout  # at least one while scoring, and the last
    assert not progress[0].startswith("scoring: 40/40")
    assert progress[-1].startswith("scoring: 40/40 (100%)")
    summary = lines.index(next(line for line in lines if line.startswith("orders scored:")))
    assert lines.index(progress[-1]) < summary
    assert "40/40 in" in lines[summary] and lines[summary].endswith("by 1 scoring process")
