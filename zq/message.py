"""Task messages: what a call to a task becomes (a header and a payload), and what a
workflow step's arguments become on the worker, with its parents' results in front.

:func:`task_message` and :func:`timing` build what :meth:`zq.App.send_task` and the
workflow signatures (:mod:`zq.canvas`) submit; :func:`with_inputs` is their
counterpart on the worker. Pure functions: this module imports neither the app, the
canvas nor the client, so each of those can import it.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

from zq import protocol as p
from zq.ids import new_id


def task_message(
    name: str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    queue: str,
    key: Any = None,
    task_id: str | None = None,
    ignore_result: bool = False,
    **fields: Any,
) -> tuple[dict[str, Any], bytes]:
    """A task's header and payload, ready for :meth:`zq.App.submit`; ``fields`` are
    further header fields (see :func:`timing`). Raises :class:`TypeError` here, in
    the caller, for an argument that cannot be encoded, ValueError for a bad id."""
    if task_id is not None and not (isinstance(task_id, str) and 0 < len(task_id) <= p.MAX_ID_LEN):
        raise ValueError(f"task_id must be a string of 1..{p.MAX_ID_LEN} characters")
    payload = p.encode_call(args, kwargs or {})
    header: dict[str, Any] = {
        "id": task_id or new_id(),
        "name": name,
        "queue": queue,
        **fields,
    }
    if key is not None:
        header["key"] = str(key)
    if ignore_result:
        header["ignore_result"] = True
    return header, payload


def timing(
    *,
    countdown: float | None = None,
    eta: _dt.datetime | None = None,
    expires: float | _dt.datetime | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """The header fields for these options: ``eta`` and ``expires`` as Unix times.

    Times are taken from this machine's clock, so keep the clocks of a cluster in
    step (NTP). Raises :class:`ValueError` for a bad value."""
    fields: dict[str, Any] = {}
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    if countdown is not None:
        fields["eta"] = time.time() + seconds("countdown", countdown)
    elif eta is not None:
        fields["eta"] = _unix_time("eta", eta)
    if expires is not None:
        if isinstance(expires, _dt.datetime):
            fields["expires"] = _unix_time("expires", expires)
        else:
            fields["expires"] = time.time() + seconds("expires", expires)
    if priority is not None:
        if type(priority) is not int or not p.MIN_PRIORITY <= priority <= p.MAX_PRIORITY:
            raise ValueError(
                f"priority must be an integer {p.MIN_PRIORITY}..{p.MAX_PRIORITY}, got {priority!r}"
            )
        if priority:
            fields["priority"] = priority
    return fields


def seconds(name: str, value: Any) -> float:
    """``value`` (a number or a timedelta) as seconds >= 0; ValueError names ``name``."""
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


def _unix_time(name: str, value: Any) -> float:
    """A datetime as a Unix time; a naive one is local time, as in ``datetime.timestamp``."""
    if not isinstance(value, _dt.datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    stamp = value.timestamp()
    if not 0 <= stamp < p.MAX_TIMESTAMP:
        raise ValueError(f"{name} is out of range: {value!r}")
    return stamp


def with_inputs(header: dict[str, Any], payload: bytes, inputs: list[Any]) -> bytes:
    """A workflow step's arguments with its parents' results in front (worker side)."""
    args, kwargs = p.decode(payload)
    values = [p.decode(body) for body in inputs]
    first = values[0] if header.get("pass") == "one" else values
    return p.encode([[first, *args], kwargs])
