"""The zq exception tree, named by who is at fault.

::

    ZQError
     ├── ProtocolError          a peer sent bytes that are not ZQ/1 (keeps the raw frames)
     ├── BrokerUnavailable      the broker could not be reached in time
     ├── TimeoutError           a wait ran out (also a builtin TimeoutError)
     ├── SoftTimeLimitExceeded  raised inside a task that reached its soft time limit
     ├── Retry                  raised by a task to be run again later
     └── TaskError              something happened to one task
          ├── TaskFailed        the task raised; carries the remote type, message, traceback
          ├── TaskRejected      the broker refused the submit; carries the reason
          └── ResultUnavailable the task runs with ignore_result, so there is nothing to get

Encoding errors for task arguments are plain :class:`TypeError`, raised in the
caller's process at ``delay()`` time, as Python users expect.
"""

from __future__ import annotations

import builtins


class ZQError(Exception):
    """Base of every error zq raises on purpose."""


class ProtocolError(ZQError):
    """A message that does not follow ZQ/1. ``frames`` keeps the raw bytes for the log."""

    def __init__(self, reason: str, frames: list[bytes] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frames = frames or []


class BrokerUnavailable(ZQError, builtins.ConnectionError):
    """The broker did not answer within the time allowed (also a builtin
    ConnectionError). ``get()`` raises it, rather than TimeoutError, when the broker
    said nothing at all during the wait."""


class WorkerError(ZQError):
    """A worker stopped on its own: it cannot run tasks (e.g. its pool's processes die
    loading the app)."""


class TimeoutError(ZQError, builtins.TimeoutError):
    """A wait for a task's result ran out before the task finished."""


class SoftTimeLimitExceeded(ZQError):
    """Raised inside a running task when it reaches its soft time limit: catch it to
    clean up before the hard limit kills the process."""


class Retry(ZQError):
    """Raise inside a task to have it run again after ``countdown`` seconds (default:
    the task's retry delay or backoff). The broker holds the delay; the task keeps its
    key meanwhile. Past the task's ``retries`` it fails with ``exc`` (or this error)."""

    def __init__(self, countdown: float | None = None, exc: BaseException | None = None) -> None:
        super().__init__(f"retry in {countdown}s" if countdown is not None else "retry")
        self.countdown = countdown
        self.exc = exc


class TaskError(ZQError):
    """Base of the errors about one task; ``task_id`` names it."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskFailed(TaskError):
    """The task raised an exception in the worker.

    ``exc_type`` is the remote exception's qualified type name, ``exc_message`` its
    message and ``remote_traceback`` the formatted traceback from the worker.
    """

    def __init__(
        self, task_id: str, exc_type: str, exc_message: str, remote_traceback: str = ""
    ) -> None:
        super().__init__(task_id, f"{exc_type}: {exc_message}")
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"task {self.task_id} failed: {self.exc_type}: {self.exc_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class TaskRejected(TaskError):
    """The broker refused to accept the task; ``reason`` says why."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(task_id, f"task {task_id} rejected: {reason}")
        self.reason = reason


class ResultUnavailable(TaskError):
    """The task was sent with ``ignore_result``, so the broker keeps no result for it."""
