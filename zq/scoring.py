"""The payment-scoring tasks of the demo, shipped in the package so every machine has them.

``python worker.py`` (or ``zq worker zq.scoring``) serves them. Each scoring burns CPU
for the order's ``work`` seconds and returns its own start/end record, from which
the demo and the tests check per-customer exclusivity and order.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from zq.app import App

app = App("zq.scoring")


@app.task(name="scoring.score", queue="default", key=lambda order: order["customer"])
def score(order: dict[str, Any]) -> dict[str, Any]:
    """Score one order: CPU-bound for ``order["work"]`` seconds, keyed by customer."""
    start = time.time()
    digest = hashlib.sha256(repr(sorted(order.items())).encode()).digest()
    deadline = time.monotonic() + float(order.get("work", 0.05))
    while time.monotonic() < deadline:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()
    return {
        "order": order.get("id"),
        "key": order["customer"],
        "seq": order.get("seq", 0),
        "score": digest[0] / 255,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
    }


@app.task(name="scoring.add")
def add(x: float, y: float) -> float:
    """Add two numbers (for ``zq call scoring.add 1 4``)."""
    return x + y
