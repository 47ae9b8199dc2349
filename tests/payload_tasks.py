"""Tasks for tests/test_payloads.py (``zq worker tests.payload_tasks``)."""

from __future__ import annotations

from typing import Any

import zq

app = zq.App("payload-tests")  # the broker address comes from $ZQ_BROKER or the test


@app.task
def echo(value: Any) -> Any:
    return value


@app.task
def totals_by_pair() -> dict[str, Any]:
    """A result msgpack packs but the client could not decode: a tuple as a key."""
    return {"totals": {(1, 2): 3}}
