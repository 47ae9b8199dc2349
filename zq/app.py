"""The application object: a task registry plus a lazily started client.

::

    app = zq.App("tasks", broker="tcp://10.0.0.5:5555")

    @app.task(queue="scoring", key=lambda order: order["customer_id"])
    def score(order): ...

    res = score.delay(order)
    res.get(timeout=60)
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from zq import protocol as p
from zq.address import check_broker_url
from zq.canvas import Signature
from zq.client import AsyncResult, Client
from zq.message import seconds, task_message, timing
from zq.schedule import Schedule
from zq.security import ClientCurve
from zq.timers import backoff

F = TypeVar("F", bound=Callable[..., Any])

#: Where peers find the broker when neither the code nor a flag says.
DEFAULT_BROKER = "tcp://127.0.0.1:5555"
#: The queue tasks go to unless the task or the call names another.
DEFAULT_QUEUE = "default"


def default_broker() -> str:
    """``$ZQ_BROKER`` if set, else ``tcp://127.0.0.1:5555``; :class:`ValueError` if
    ``$ZQ_BROKER`` is not a broker address (see :func:`zq.address.check_broker_url`)."""
    env = os.environ.get("ZQ_BROKER")
    return check_broker_url(env, what="$ZQ_BROKER") if env else DEFAULT_BROKER


#: Passed for ``backend`` when the caller gave none (None is a value Celery users pass).
_NO_BACKEND: Any = object()

_NO_SETTINGS = (
    "zq has no settings object: options go where they apply, @app.task(queue=, "
    "time_limit=, retries=, ...) and the flags of `zq worker` and `zq broker`"
)


class _CeleryOnly:
    """An attribute of Celery's app that zq lacks: reading it raises AttributeError
    saying what to do instead (a descriptor, not ``__getattr__``, which would hide
    an AttributeError raised inside any property of App)."""

    def __init__(self, hint: str) -> None:
        self.hint = hint

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        hint = f"{self.hint}; see docs/celery.md"
        raise AttributeError(f"zq.App has no {self.name} (Celery's): {hint}")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When and how soon a task runs again after it failed (see :meth:`App.task`)."""

    retries: int = 3
    autoretry_for: tuple[type[BaseException], ...] = ()
    delay: float = 1.0
    backoff: float = 0.0  # 0: a fixed ``delay``; else the base of exponential backoff
    backoff_max: float = 600.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {self.retries!r}")
        # As seconds (a timedelta is fine), checked: a task must not fail to retry later.
        for field in ("delay", "backoff", "backoff_max"):
            value = retry_seconds(f"retry_{field}", getattr(self, field))
            object.__setattr__(self, field, value)  # (a frozen dataclass)

    def countdown(self, attempt: int, asked: Any = None) -> float:
        """Seconds before retry number ``attempt + 1``; ``asked`` is Retry(countdown=),
        checked here (a ValueError says what is wrong with it)."""
        if asked is not None:
            return retry_seconds("Retry(countdown=...)", asked)
        if not self.backoff:
            return self.delay
        return backoff(attempt, base=self.backoff, cap=self.backoff_max, jitter=self.jitter)


class Task:
    """A registered task. Call it to run it here; ``delay()`` to run it on a worker."""

    def __init__(
        self,
        app: App,
        fn: Callable[..., Any],
        *,
        name: str,
        queue: str,
        key: Callable[..., Any] | None,
        ignore_result: bool,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.retry = retry or RetryPolicy()
        self.name = name
        self.queue = queue
        self.key = key
        self.ignore_result = ignore_result
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<zq task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task to a worker with these arguments; returns at once."""
        return self.apply_async(args, kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature for workflows; in a chain it gets the previous result first."""
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: it ignores the previous step's result."""
        return Signature(self, args, kwargs, immutable=True)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        key: Any = None,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: _dt.datetime | None = None,
        expires: float | _dt.datetime | None = None,
        priority: int | None = None,
    ) -> AsyncResult:
        """Send the task with options: ``queue`` and ``key`` override the task's own.

        ``countdown`` (seconds) or ``eta`` (a datetime) hold the task in the broker
        until then; ``expires`` (seconds from now, or a datetime) ends it EXPIRED if no
        worker has started it by then; ``priority`` 0..9 (9 first, default 0) orders
        the tasks waiting in one queue. Raises :class:`TypeError` here, in the caller,
        if an argument cannot be encoded, :class:`ValueError` for a bad option.
        """
        kwargs = kwargs or {}
        if key is None and self.key is not None:
            key = self.key(*args, **kwargs)
        return self.app.send_task(
            self.name,
            args,
            kwargs,
            queue=queue or self.queue,
            key=key,
            task_id=task_id,
            ignore_result=self.ignore_result,
            countdown=countdown,
            eta=eta,
            expires=expires,
            priority=priority,
        )


class App:
    """A zq application: the tasks it registers and the broker it talks to."""

    def __init__(
        self,
        name: str = "zq",
        broker: str | None = None,
        *,
        backend: Any = _NO_BACKEND,
        curve_secret: str | None = None,
        broker_key: str | None = None,
    ) -> None:
        """``broker`` (``App("tasks", "tcp://10.0.0.5:5555")`` works too, as in Celery)
        defaults to ``$ZQ_BROKER``, else ``tcp://127.0.0.1:5555``; a :class:`ValueError`
        says what is wrong with one that is not a broker address. For a CURVE broker,
        ``curve_secret`` is this peer's ``.key_secret`` file and ``broker_key`` the
        broker's ``.key`` file (defaults: ``$ZQ_CURVE_SECRET``, ``$ZQ_BROKER_KEY``).

        ``backend`` is Celery's, and a :class:`TypeError` here: zq's results come back
        through its broker, so there is no backend to name.
        """
        if backend is not _NO_BACKEND:
            # A TypeError, as for any argument a function does not take: no value of
            # it would do. The message says why and what to do, which Python's would not.
            raise TypeError(
                f"zq.App() takes no backend (got backend={backend!r:.60}): results come "
                "back through the zq broker, which keeps them for `zq broker --result-ttl` "
                "(24 h), so delete the argument"
            )
        self.name = name
        self.broker = broker or default_broker()
        self.curve_secret = curve_secret or os.environ.get("ZQ_CURVE_SECRET") or None
        self.broker_key = broker_key or os.environ.get("ZQ_BROKER_KEY") or None
        self._curve = ClientCurve.from_files(self.curve_secret, self.broker_key)
        self.tasks: dict[str, Task] = {}
        self.schedules: dict[str, Schedule] = {}  # periodic tasks, fired by the broker
        self._client: Client | None = None
        self._client_pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<zq.App {self.name} broker={self.broker}>"

    @property
    def broker(self) -> str:
        """The broker's address; set it to another (checked) before the client starts."""
        return self._broker

    @broker.setter
    def broker(self, url: str) -> None:
        self._broker = check_broker_url(url)

    conf = _CeleryOnly(_NO_SETTINGS)
    config_from_object = _CeleryOnly(_NO_SETTINGS)
    autodiscover_tasks = _CeleryOnly(
        "zq does not look for tasks: import the modules that define them from the module "
        "you give `zq worker`"
    )

    @overload
    def task(self, fn: F) -> Task: ...
    @overload
    def task(
        self,
        *,
        name: str | None = ...,
        queue: str = ...,
        key: Callable[..., Any] | None = ...,
        ignore_result: bool = ...,
        time_limit: float | None = ...,
        soft_time_limit: float | None = ...,
        retries: int = ...,
        autoretry_for: tuple[type[BaseException], ...] = ...,
        retry_delay: float = ...,
        retry_backoff: bool | float = ...,
        retry_backoff_max: float = ...,
        retry_jitter: bool = ...,
    ) -> Callable[[F], Task]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        key: Callable[..., Any] | None = None,
        ignore_result: bool = False,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        retries: int = 3,
        autoretry_for: tuple[type[BaseException], ...] = (),
        retry_delay: float = 1.0,
        retry_backoff: bool | float = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., key=...)``.

        ``key`` is a function of the task's arguments that returns the key (e.g. the
        customer id): tasks with the same key never run at the same time and start
        in the order they were sent. ``name`` defaults to ``module.function``.
        ``soft_time_limit`` (seconds) raises :class:`zq.SoftTimeLimitExceeded` inside
        the task; ``time_limit`` kills the process running it (process pool only).

        Retries: a task that raises :class:`zq.Retry`, or an exception in
        ``autoretry_for``, runs again (at most ``retries`` times) after ``retry_delay``
        seconds, or with ``retry_backoff`` (True, or a base in seconds) after an
        exponential, jittered delay capped at ``retry_backoff_max``. The broker holds
        the delay, and the task keeps its key until it has run.
        """

        def register(fn: Callable[..., Any]) -> Task:
            task_name = name or _task_name(fn)
            if task_name in self.tasks:
                raise ValueError(f"task {task_name!r} is already registered in {self!r}")
            task = Task(
                self,
                fn,
                name=task_name,
                queue=queue,
                key=key,
                ignore_result=ignore_result,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
                retry=RetryPolicy(
                    retries=retries,
                    autoretry_for=tuple(autoretry_for),
                    delay=retry_delay,
                    backoff=1.0 if retry_backoff is True else retry_backoff or 0.0,
                    backoff_max=retry_backoff_max,
                    jitter=retry_jitter,
                ),
            )
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        every: float | _dt.timedelta | None = None,
        cron: str | None = None,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        key: str | None = None,
        queue: str | None = None,
        name: str | None = None,
    ) -> Callable[[Any], Task]:
        """Run a task on a schedule: ``every`` seconds (or a timedelta), or on a ``cron``
        expression (``"*/5 * * * *"``, in the broker's local time)::

            @app.periodic(every=60, key="cleanup")
            @app.task
            def cleanup(): ...

        Workers announce the app's schedules; the broker fires them (so never twice,
        however many workers run) and journals each fire. With a ``key``, a run is
        skipped while the previous one has not ended. ``name`` defaults to the task
        name. Decorates a task (or a plain function, which it registers as a task).
        """
        fields = {
            "every": None if every is None else seconds("every", every),
            "cron": cron,
            "payload": p.encode_call(args, kwargs or {}),  # TypeError here, at import
            "key": None if key is None else str(key),
        }

        def register(target: Any) -> Task:
            registered = isinstance(target, Task)
            task_name = target.name if registered else _task_name(target)
            schedule = Schedule(  # ValueError here, before a function is registered
                name=name or task_name,
                task=task_name,
                queue=queue or (target.queue if registered else DEFAULT_QUEUE),
                **fields,
            )
            if schedule.name in self.schedules:
                raise ValueError(f"periodic schedule {schedule.name!r} is already declared")
            task = target if registered else self.task(target)
            self.schedules[schedule.name] = schedule
            return task

        return register

    @property
    def client(self) -> Client:
        """This process's connection to the broker, started on first use."""
        with self._lock:
            # A forked child must not use its parent's client (its I/O thread did not
            # survive the fork, and its ZeroMQ context must not cross one).
            if self._client is None or self._client_pid != os.getpid():
                self._client = Client(self.broker, curve=self._curve)
                self._client_pid = os.getpid()
            return self._client

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        key: Any = None,
        task_id: str | None = None,
        ignore_result: bool = False,
        countdown: float | None = None,
        eta: _dt.datetime | None = None,
        expires: float | _dt.datetime | None = None,
        priority: int | None = None,
    ) -> AsyncResult:
        """Send a task by name, registered here or not (e.g. from ``zq call``): a task's
        name is ``module.function`` unless it was registered with ``name=``. The
        options are those of :meth:`Task.apply_async`."""
        header, payload = task_message(
            name,
            args,
            kwargs,
            queue=queue,
            key=key,
            task_id=task_id,
            ignore_result=ignore_result,
            **timing(countdown=countdown, eta=eta, expires=expires, priority=priority),
        )
        return self.submit(header, payload)

    def submit(self, header: dict[str, Any], payload: bytes) -> AsyncResult:
        """Send a task made by :func:`task_message` (and the workflow fields)."""
        client = self.client
        slot = client.submit(header, payload)
        ignored = header.get("ignore_result", False)
        return AsyncResult(header["id"], client, _slot=slot, ignore_result=ignored)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        """A handle on a task sent by any process, by its id."""
        return AsyncResult(task_id, self.client)

    def revoke(
        self, task_ids: str | list[str], *, terminate: bool = False, timeout: float = 5.0
    ) -> dict[str, str]:
        """Revoke tasks by id (see :meth:`zq.AsyncResult.revoke`); returns each id's
        outcome: ``revoked``, ``terminating``, ``running``, ``finished`` or ``unknown``."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        return self.client.revoke(ids, terminate=terminate, timeout=timeout)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's view: workers, queue depths, keys in flight."""
        return self.client.status(timeout)

    def close(self, *, flush: bool = True) -> None:
        """Stop this process's client thread, first giving unaccepted submits up to 5 s
        to be accepted (``flush=False``: not waiting)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close(flush_timeout=5.0 if flush else 0.0)


def _task_name(fn: Callable[..., Any]) -> str:
    """The name a function registered as a task gets by default."""
    return f"{fn.__module__}.{fn.__qualname__}"


def retry_seconds(name: str, value: Any) -> float:
    """``value`` as seconds a task may wait to be retried (0 to MAX_RETRY_COUNTDOWN):
    the broker holds the task, and its key, that long."""
    value = seconds(name, value)
    if value > p.MAX_RETRY_COUNTDOWN:
        raise ValueError(
            f"{name} must be at most {p.MAX_RETRY_COUNTDOWN:g} seconds (7 days), got {value!r}"
        )
    return value


def load_app(spec: str) -> App:
    """Import ``module:attr`` (or ``module``, finding its App) and return the App.

    Only called with a spec from the command line, never from a message.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        app = getattr(module, attr, None)
        if not isinstance(app, App):
            raise ValueError(f"{spec!r}: {attr!r} is not a zq.App in {module_name}")
        return app
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) != 1:
        found = "none" if not apps else f"{len(apps)}"
        raise ValueError(
            f"{spec!r}: expected one zq.App in {module_name}, found {found}; "
            "name it as MODULE:ATTRIBUTE"
        )
    return apps[0]
