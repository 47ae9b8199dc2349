"""The ``zq`` command. Configuration: flags, then ``ZQ_*`` environment variables, then defaults."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from zq import protocol as p
from zq.app import DEFAULT_BROKER, DEFAULT_QUEUE, App
from zq.broker import BrokerSettings
from zq.errors import WorkerError
from zq.procpool import Limits
from zq.settings import described
from zq.worker import WorkerSettings


def _declared(settings: type, name: str, env: str | None = None, **instead: Any) -> dict[str, Any]:
    """``click.option`` arguments for the field ``name`` of a settings dataclass: its
    default and help, as declared there once (:func:`zq.settings.setting`), and
    ``env``, the variable that sets it. ``instead`` replaces the field's ``help``,
    ``shown`` or ``default`` where the command line takes the setting in another form
    (a list as text, another unit)."""
    field = described(settings, name)._replace(**instead)
    tags = [f"env {env}"] if env else []
    if field.shown is not None:  # else click shows the value itself
        tags.append(f"default: {field.shown}")
    text = f"{field.help} [{'; '.join(tags)}]" if tags else field.help
    return {
        "default": field.default,
        "help": text,
        "show_default": field.shown is None,
        "envvar": env,
    }


class _Prefetch(click.ParamType):
    """``auto`` (None) or a number of tasks, 0..PREFETCH_MAX."""

    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        from zq.dispatch import PREFETCH_MAX

        if value is None or value == "auto":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not 'auto' or a whole number", param, ctx)
        if not 0 <= number <= PREFETCH_MAX:
            self.fail(f"{number} is not in 0..{PREFETCH_MAX}", param, ctx)
        return number


def _peer_curve_options(fn: Any) -> Any:
    """--curve-secret and --broker-key, for commands that connect to a CURVE broker."""
    fn = click.option(
        "--broker-key",
        envvar="ZQ_BROKER_KEY",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="The broker's public .key file, for a CURVE broker. [env ZQ_BROKER_KEY]",
    )(fn)
    return click.option(
        "--curve-secret",
        envvar="ZQ_CURVE_SECRET",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="This peer's .key_secret file, for a CURVE broker. [env ZQ_CURVE_SECRET]",
    )(fn)


def _app(name: str, broker: str, curve_secret: str | None, broker_key: str | None) -> App:
    try:
        return App(name, broker=broker, curve_secret=curve_secret, broker_key=broker_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@contextlib.contextmanager
def _session(
    name: str, broker: str, curve_secret: str | None, broker_key: str | None
) -> Iterator[App]:
    """An App for one command, closed after it; a zq error is a clean message.

    Commands call :func:`_reach_broker` first, so an error here comes from a broker
    that did answer (and then did not, or said no): the error says what happened."""
    from zq.errors import ZQError

    app = _app(name, broker, curve_secret, broker_key)
    try:
        yield app
    except ZQError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        app.close()


#: Seconds ``zq call`` and ``zq client`` wait for the broker's first answer before
#: they send anything (the other commands wait their --timeout). A running broker
#: answers at once; without this, a missing broker cost a whole result timeout.
PROBE_TIMEOUT = 5.0


def _reach_broker(app: App, broker: str, timeout: float) -> dict[str, Any]:
    """Ask the broker for its STATUS snapshot and return it; if no answer comes within
    ``timeout`` seconds, stop the command with an error that says so.

    The snapshot (the workers, with their queues) is there for the caller to check
    further before it sends anything, e.g. that some worker serves the task."""
    from zq.errors import BrokerUnavailable

    deadline = time.monotonic() + timeout
    with _quiet_reconnects():
        while True:
            try:
                return app.status(max(deadline - time.monotonic(), 0.01))
            except BrokerUnavailable:
                # Also early: the client gives a silent connection up after three
                # heartbeats and fails what waited on it. Ask again on the new one.
                if time.monotonic() >= deadline:
                    break
    raise click.ClickException(_no_broker(broker, timeout, curve=app.curve_secret is not None))


def _no_broker(broker: str, timeout: float, *, curve: bool) -> str:
    start = "zq broker" if broker == DEFAULT_BROKER else f"zq broker --bind {broker}"
    why = (
        f"no broker answered at {broker} within {timeout:g}s: is one running? "
        f"start one with `{start}`"
    )
    if curve:
        why += " (with CURVE: is --broker-key its key, and is this peer's key authorized?)"
    return why


@contextlib.contextmanager
def _quiet_reconnects() -> Iterator[None]:
    """While waiting for a broker's first answer, the client's "reconnecting" warnings
    say only what the command's own error will say (kept with --log-level debug)."""
    logger = logging.getLogger("zq.client")
    before = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _timeout_option(fn: Any) -> Any:
    return click.option(
        "--timeout",
        type=float,
        default=5.0,
        show_default=True,
        help="Seconds to wait for the broker.",
    )(fn)


def _broker_option(fn: Any) -> Any:
    return click.option("--broker", **_declared(WorkerSettings, "broker", env="ZQ_BROKER"))(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="ZQ_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="How much to log to stderr. [env ZQ_LOG_LEVEL]",
)
@click.version_option(package_name="zq")
def main(log_level: str) -> None:
    """zq: a distributed task queue on ZeroMQ, with its own small broker.

    Start a broker, start workers anywhere that can reach it, send tasks:

    \b
      zq broker --bind tcp://0.0.0.0:5555
      zq worker myapp.tasks --broker tcp://HOST:5555
      zq call myapp.tasks.add 1 4 --broker tcp://HOST:5555

    Or see it all at once on this machine: zq demo
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _order_options(*, orders: int, customers: int) -> Any:
    """The options of the commands that make scoring orders."""
    options = [
        click.option(
            "--orders",
            type=click.IntRange(min=1),
            default=orders,
            show_default=True,
            help="Orders to score.",
        ),
        click.option(
            "--customers",
            type=click.IntRange(min=1),
            default=customers,
            show_default=True,
            help="Distinct customers the orders come from.",
        ),
        click.option(
            "--min-work",
            type=click.FloatRange(min=0),
            default=0.005,
            show_default=True,
            help="Least CPU seconds one scoring takes.",
        ),
        click.option(
            "--max-work",
            type=click.FloatRange(min=0),
            default=0.06,
            show_default=True,
            help="Most CPU seconds one scoring takes.",
        ),
        click.option("--seed", type=int, default=None, help="Random seed for the orders."),
    ]

    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _finish(summary: Any) -> None:
    """Print a run's summary; exit 1 if any order failed or the per-customer check did."""
    for line in summary.lines():
        click.echo(line)
    if summary.violations or summary.failed:
        sys.exit(1)


def _exposure(endpoint: str, pub: str, authorized_keys: str | None) -> str:
    """The start-up line that says who can reach a broker bound to these endpoints."""
    if authorized_keys is not None:
        return f"CURVE: traffic encrypted; only the keys in {authorized_keys} get in"
    if not (_local_only(endpoint) and _local_only(pub)):
        return (
            "traffic is plain and open: anyone who reaches these ports can submit and "
            "read tasks; bind to a trusted network, or use --curve-secret (docs/security.md)"
        )
    return (
        "traffic is plain, from this machine only (loopback): to take workers and clients "
        "on other machines, --bind tcp://0.0.0.0:5555, with --curve-secret unless the "
        "network is trusted (docs/security.md)"
    )


def _local_only(endpoint: str) -> bool:
    """True for an endpoint only this machine can connect to: a loopback TCP address,
    or an ipc:// or inproc:// one."""
    import ipaddress

    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # *, an interface name, a host name: maybe the network
        return False


def _stop_on_signals(stop: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


@main.command()
@click.option("--bind", **_declared(BrokerSettings, "bind", env="ZQ_BIND"))
@click.option("--pub", "pub_bind", **_declared(BrokerSettings, "pub_bind", env="ZQ_PUB"))
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=p.MIN_HEARTBEAT, max=p.MAX_HEARTBEAT),
    **_declared(BrokerSettings, "heartbeat"),
)
@click.option("--liveness", type=click.IntRange(min=3), **_declared(BrokerSettings, "liveness"))
@click.option(
    "--result-ttl", type=click.FloatRange(min=1), **_declared(BrokerSettings, "result_ttl")
)
@click.option("--prefetch", type=_Prefetch(), **_declared(BrokerSettings, "prefetch"))
@click.option(
    "--journal",
    # Not the dataclass's default (no journal): the command keeps one unless told not to.
    **_declared(
        BrokerSettings,
        "journal",
        env="ZQ_JOURNAL",
        shown="$ZQ_DATA_DIR, else ~/.local/share/zq, /journal-PORT.db",
    ),
)
@click.option(
    "--curve-secret",
    type=click.Path(exists=True, dir_okay=False),
    **_declared(BrokerSettings, "curve_secret", env="ZQ_CURVE_SECRET"),
)
@click.option(
    "--authorized-keys",
    type=click.Path(exists=True, file_okay=False),
    **_declared(BrokerSettings, "authorized_keys", env="ZQ_AUTHORIZED_KEYS"),
)
@click.option(
    "--max-message-size",
    type=click.IntRange(min=p.MIN_MAX_MESSAGE, max=p.PEER_MAX_MESSAGE),
    **_declared(BrokerSettings, "max_message_size"),
)
@click.option("--max-queued", type=click.IntRange(min=1), **_declared(BrokerSettings, "max_queued"))
@click.option(
    "--max-queued-per-queue",
    type=click.IntRange(min=1),
    **_declared(BrokerSettings, "max_queued_per_queue"),
)
@click.option(
    "--max-results", type=click.IntRange(min=1), **_declared(BrokerSettings, "max_results")
)
def broker(
    bind: str,
    pub_bind: str | None,
    heartbeat: float,
    liveness: int,
    result_ttl: float,
    prefetch: int | None,
    journal: str | None,
    curve_secret: str | None,
    authorized_keys: str | None,
    max_message_size: int,
    max_queued: int,
    max_queued_per_queue: int | None,
    max_results: int,
) -> None:
    """Run the broker: queues, customer-sticky routing, results. Stop with Ctrl-C/SIGTERM."""
    from zq.broker import Broker
    from zq.journal import default_journal_path

    try:
        settings = BrokerSettings(
            bind=bind,
            pub_bind=pub_bind,
            heartbeat=heartbeat,
            liveness=liveness,
            result_ttl=result_ttl,
            prefetch=prefetch,
            journal=journal or default_journal_path(bind),
            curve_secret=curve_secret,
            authorized_keys=authorized_keys,
            max_message_size=max_message_size,
            max_queued=max_queued,
            max_queued_per_queue=max_queued_per_queue,
            max_results=max_results,
        )
    except ValueError as exc:  # e.g. --curve-secret without --authorized-keys
        raise click.UsageError(str(exc)) from None
    b = Broker(settings)
    try:
        endpoint, pub = b.bind()
    except Exception as exc:  # zmq.ZMQError (address in use), a journal in use
        raise click.ClickException(f"cannot start the broker on {bind}: {exc}") from None
    _stop_on_signals(b.stop)
    signal.signal(signal.SIGHUP, lambda *_: b.reload_keys())
    click.echo(f"zq broker listening on {endpoint} (results and events on {pub})")
    if b.journal.durable:
        click.echo(f"journal {b.journal.path}: accepted tasks and results survive a crash")
    else:
        click.echo(
            "journal off (:memory:): accepted tasks and results are lost if the broker stops"
        )
    click.echo(_exposure(endpoint, pub, authorized_keys if curve_secret else None))
    b.run()
    click.echo("zq broker stopped")


@main.command()
@click.argument("app_spec", metavar="MODULE[:APP]", default="zq.scoring")
@_broker_option
@_peer_curve_options
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1, max=p.MAX_CONCURRENCY),
    **_declared(WorkerSettings, "concurrency"),
)
@click.option(
    "--pool",
    type=click.Choice(["process", "thread"]),
    **_declared(WorkerSettings, "pool"),
)
@click.option(
    "-Q",
    "--queues",
    **_declared(
        WorkerSettings,
        "queues",
        default=",".join(described(WorkerSettings, "queues").default),
        help="Comma-separated queues to take tasks from, in order of preference.",
    ),
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    **_declared(Limits, "soft_time_limit"),
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    **_declared(Limits, "time_limit"),
)
@click.option(
    "--max-tasks-per-child", type=click.IntRange(min=1), **_declared(Limits, "max_tasks_per_child")
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    # In MiB here (the limit is held in KiB, as the kernel reports peak memory).
    **_declared(
        Limits,
        "max_memory_per_child",
        help="Replace a child process after a task left its peak memory above this many MiB.",
    ),
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    **_declared(WorkerSettings, "shutdown_timeout"),
)
def worker(
    app_spec: str,
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    concurrency: int,
    pool: str,
    queues: str,
    soft_time_limit: float | None,
    time_limit: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    shutdown_timeout: float,
) -> None:
    """Run a worker for the tasks of MODULE[:APP] (default: the demo's zq.scoring).

    Time limits and child replacement apply to the process pool only."""
    from zq.security import ClientCurve
    from zq.worker import Worker

    sys.path.insert(0, os.getcwd())  # like `python -m`, so ./myapp.py is importable
    _import_tasks(app_spec)
    queue_list = tuple(q.strip() for q in queues.split(",") if q.strip())
    try:
        curve = ClientCurve.from_files(curve_secret, broker_key)
        settings = WorkerSettings(
            broker=broker,
            curve=curve,
            concurrency=concurrency,
            pool=pool,
            queues=queue_list,
            shutdown_timeout=shutdown_timeout,
            limits=Limits(
                soft_time_limit=soft_time_limit,
                time_limit=time_limit,
                max_tasks_per_child=max_tasks_per_child,
                max_memory_per_child=max_memory_per_child * 1024 if max_memory_per_child else None,
            ),
        )
        w = Worker(app_spec, settings)
    except (ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _stop_on_signals(w.stop)
    click.echo(f"zq worker {w.id} for {app_spec} ({len(w.app.tasks)} tasks) -> {broker}")
    try:
        w.run()
    except WorkerError as exc:
        raise click.ClickException(f"the worker stopped: {exc}") from None
    click.echo(f"zq worker {w.id} stopped")


def _import_tasks(spec: str) -> None:
    """Import the module of MODULE[:APP], before the worker looks for its App in it.

    A module that is not there is one line; one that fails while it is imported (a
    SyntaxError, an ImportError of its own, anything its top level raises) shows the
    traceback from the module's own code on, with its file and line, as ``python``
    would: a one-line "No module named 'requests'" hid which file asked for it."""
    import importlib

    module_name = spec.partition(":")[0]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise click.ClickException(
                f"cannot import {module_name}: no module named {exc.name!r} (run the worker "
                "from the directory that holds it, or put that directory on PYTHONPATH)"
            ) from None
        raise click.ClickException(_import_failure(module_name, exc)) from None
    except Exception as exc:
        raise click.ClickException(_import_failure(module_name, exc)) from None


def _import_failure(module_name: str, exc: BaseException) -> str:
    """The error of a task module that failed to import, with its traceback less the
    frames of zq and of the import machinery (they say nothing about the module)."""
    import importlib
    import traceback

    internal = tuple(
        os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep
        for module in (sys.modules[__package__], importlib)
    )
    failure = traceback.TracebackException.from_exception(exc)
    failure.stack = traceback.StackSummary.from_list(
        [frame for frame in failure.stack if not frame.filename.startswith((*internal, "<frozen "))]
    )
    return f"cannot import {module_name}:\n" + "".join(failure.format()).rstrip()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@main.command()
@click.argument("task_name", metavar="TASK")
@click.argument("args", nargs=-1)
@_broker_option
@_peer_curve_options
@click.option(
    "--kwargs",
    "kwargs_json",
    default="{}",
    show_default=True,
    help="Keyword arguments as a JSON object.",
)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue to send to.")
@click.option("--key", default=None, help="Key: tasks with one key never run at once.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the result."
)
@click.option("--no-wait", is_flag=True, help="Print the task id and return at once.")
def call(
    task_name: str,
    args: tuple[str, ...],
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    kwargs_json: str,
    queue: str,
    key: str | None,
    timeout: float,
    no_wait: bool,
) -> None:
    """Send TASK with ARGS (each parsed as JSON, else a string) and print its result.

    TASK is the name the task is registered under: `module.function` by default, the
    module named as the worker imports it (`add` in myapp/tasks.py, served by
    `zq worker myapp.tasks`, is `myapp.tasks.add`), else the name given in
    @app.task(name=...). Fails within a few seconds if no broker answers."""
    from zq.errors import TaskError
    from zq.errors import TimeoutError as ResultTimeout

    try:
        kwargs = json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--kwargs") from None
    with _session("zq.call", broker, curve_secret, broker_key) as app:
        info = _reach_broker(app, broker, PROBE_TIMEOUT)
        unserved = _unserved_reason(info, task_name, queue, broker)
        if unserved is not None and not no_wait:
            raise click.ClickException(f"{unserved}; nothing was sent")
        if unserved is not None:
            click.echo(f"warning: {unserved}; it waits until one does", err=True)
        res = app.send_task(
            task_name, [_parse_value(a) for a in args], kwargs, queue=queue, key=key
        )
        if no_wait:
            if not app.client.flush(timeout):
                raise click.ClickException(f"broker {broker} did not accept the task in {timeout}s")
            click.echo(res.id)
            return
        try:
            click.echo(json.dumps(res.get(timeout=timeout), default=str))
        except TaskError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
        except ResultTimeout as exc:
            # The broker answered: what is missing is a worker that runs this task.
            raise click.ClickException(
                f"{exc}; the broker is up: `zq status --broker {broker}` lists the "
                "workers and the queues they serve"
            ) from None


def _unserved_reason(info: dict[str, Any], name: str, queue: str, broker: str) -> str | None:
    """Why no connected worker would run task ``name`` from ``queue`` (from a STATUS
    snapshot), or None if one would."""
    on_queue = [w for w in info["workers"] if queue in w.get("queues", ())]
    if any(name in w.get("names", ()) for w in on_queue):
        return None
    start = f"start one with `zq worker MODULE --queues {queue} --broker {broker}`"
    if not on_queue:
        served = sorted({q for w in info["workers"] for q in w.get("queues", ())})
        where = f"workers serve {', '.join(served)}" if served else "no worker is connected"
        return f"no connected worker serves queue {queue!r} ({where}); {start}"
    names = sorted({n for w in on_queue for n in w.get("names", ())})
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (
        f"no worker on queue {queue!r} has task {name!r} (they have: {shown or 'none'}); "
        f"is the name right (module.function), or {start}"
    )


@main.command()
@click.argument("task_id", metavar="[ID]", required=False)
@_broker_option
@_peer_curve_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@_timeout_option
def status(
    task_id: str | None,
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """Show workers (host, pid, slots, in flight), queue depths and keys in flight; or,
    given a task ID, that task's state, latest progress and outcome."""
    if task_id is not None:
        _task_status(task_id, broker, (curve_secret, broker_key), as_json, timeout)
        return
    with _session("zq.status", broker, curve_secret, broker_key) as app:
        info = _reach_broker(app, broker, timeout)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"broker {info['broker']} at {broker}")
    click.echo(f"workers: {len(info['workers'])}")
    for w in info["workers"]:
        click.echo(
            f"  {w['worker']:<36} host={w['host']} pid={w['pid']} "
            f"slots={w['concurrency']} in_flight={w['in_flight']} "
            f"queues={','.join(w['queues'])} tasks={w.get('tasks', 0)}"
        )
    queues = info["queues"] or {}
    click.echo("queued: " + (", ".join(f"{q}={n}" for q, n in queues.items()) or "none"))
    for item in info.get("unserved", ()):
        click.echo(
            f"  no worker serves {item['name']} on queue {item['queue']}: "
            f"{item['waiting']} task(s) wait for one"
        )
    click.echo(
        f"scheduled (ETA): {info.get('scheduled', 0)}; waiting to retry: "
        f"{info.get('retrying', 0)}; dead letters: {info.get('dead', 0)}"
    )
    keys = info["keys"]
    more = info["keys_in_flight"] - len(keys)
    click.echo(
        f"keys in flight: {info['keys_in_flight']}"
        + (f" ({', '.join(keys)}{f', +{more} more' if more else ''})" if keys else "")
    )
    counters = info.get("counters") or {}
    click.echo(
        "counters: " + (", ".join(f"{k}={v}" for k, v in sorted(counters.items())) or "none")
    )


def _task_status(
    task_id: str,
    broker: str,
    curve: tuple[str | None, str | None],
    as_json: bool,
    timeout: float,
) -> None:
    """Print one task's state; exit 1 if the broker does not know the id."""
    from zq.errors import TaskError

    with _session("zq.status", broker, *curve) as app:
        _reach_broker(app, broker, timeout)
        res = app.AsyncResult(task_id)
        state = res.status
        progress = res.progress
        outcome: Any = None
        if res.ready_here():
            try:
                outcome = res.get(timeout=0)
            except TaskError as exc:
                outcome = str(exc)
    if as_json:
        info = {"id": task_id, "state": state, "progress": progress, "outcome": outcome}
        click.echo(json.dumps(info, indent=2, default=str))
        if state == p.PENDING:
            sys.exit(1)
        return
    if state == p.PENDING:  # what the broker answers for an id it does not have
        raise click.ClickException(
            f"the broker at {broker} does not know task {task_id}: no task with this id "
            "was sent to it, or it ended long enough ago that its result is gone "
            "(kept for --result-ttl, a day by default)"
        )
    click.echo(f"{task_id}: {state}")
    if progress:
        total = progress.get("total")
        note = progress.get("note")
        click.echo(
            f"progress: {progress.get('done')}"
            + (f"/{total}" if total is not None else "")
            + (f" ({note})" if note else "")
        )
    if outcome is not None:
        click.echo(f"outcome: {outcome!r}" if state == "SUCCESS" else f"outcome: {outcome}")


@main.command()
@click.argument("task_ids", metavar="ID...", nargs=-1, required=True)
@_broker_option
@_peer_curve_options
@click.option(
    "--terminate",
    is_flag=True,
    help="Also stop tasks already running: their worker kills the process running each "
    "(process pool only).",
)
@_timeout_option
def revoke(
    task_ids: tuple[str, ...],
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    terminate: bool,
    timeout: float,
) -> None:
    """Revoke tasks: a waiting task ends REVOKED and never runs; a running one runs on
    unless --terminate. Prints each id's outcome; exits 1 unless every one was revoked
    (or, with --terminate, is being stopped)."""
    with _session("zq.revoke", broker, curve_secret, broker_key) as app:
        _reach_broker(app, broker, timeout)
        outcomes = app.revoke(list(task_ids), terminate=terminate, timeout=timeout)
    for task_id in task_ids:
        outcome = outcomes.get(task_id, "unknown")
        click.echo(f"{task_id}: {_REVOKE_SAYS[outcome].format(id=task_id)}")
    if not all(outcomes.get(task_id) in ("revoked", "terminating") for task_id in task_ids):
        sys.exit(1)


#: What ``zq revoke`` prints for each outcome the broker reports.
_REVOKE_SAYS = {
    "revoked": "revoked: it will not run",
    "terminating": "terminating: its worker is stopping it; it ends REVOKED",
    "running": "running: still running, a revoke without --terminate lets it finish; "
    "`zq revoke --terminate {id}` stops it (process pool)",
    "finished": "finished: it had already ended, nothing was revoked",
    "unknown": "unknown: the broker does not know this id",
}


@main.command()
@_broker_option
@_peer_curve_options
@click.option(
    "--remove",
    "remove",
    multiple=True,
    metavar="NAME",
    help="Forget this schedule (e.g. one renamed in the code); may be repeated.",
)
@_timeout_option
def periodic(
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    remove: tuple[str, ...],
    timeout: float,
) -> None:
    """List the periodic schedules the broker fires: name, task, schedule, last and
    next fire times, runs skipped because the previous keyed run had not ended.
    With --remove, exits 1 if a NAME was not a schedule."""
    import datetime as dt

    from zq import protocol

    with _session("zq.periodic", broker, curve_secret, broker_key) as app:
        _reach_broker(app, broker, timeout)
        reply = app.client.request(protocol.PERIODIC, {"remove": list(remove)}, timeout)
    for name in remove:
        click.echo(f"{name}: {'removed' if name in reply['removed'] else 'no such schedule'}")

    def when(stamp: float | None) -> str:
        if stamp is None:
            return "never"
        return dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")

    for entry in sorted(reply["periodic"], key=lambda e: (e["next"] is None, e["next"] or 0)):
        click.echo(
            f"{entry['name']}  {entry['task']}  {entry['schedule']}  queue={entry['queue']}"
            f"  key={entry['key']}  last={when(entry['last'])}  next={when(entry['next'])}"
            f"  skipped={entry['skipped']}"
        )
    click.echo(f"{len(reply['periodic'])} schedule(s)")
    if set(remove) - set(reply["removed"]):
        sys.exit(1)


@main.command()
@_order_options(orders=300, customers=30)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Local worker processes to start.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Child processes per worker. [default: CPU count]",
)
def demo(
    orders: int,
    customers: int,
    workers: int,
    concurrency: int | None,
    min_work: float,
    max_work: float,
    seed: int | None,
) -> None:
    """Score orders end to end on an embedded broker and local workers, then check that
    no customer was ever scored twice at once and that orders started in order."""
    from zq.demo import demo_cluster, make_orders, progress, run_orders

    logging.getLogger("zq").setLevel(logging.WARNING)
    concurrency = concurrency or os.cpu_count() or 1
    batch = make_orders(
        orders, customers, min_work=min_work, max_work=max(min_work, max_work), seed=seed
    )
    with demo_cluster(workers=workers, concurrency=concurrency, echo=click.echo) as app:
        click.echo(f"scoring {orders} orders from {customers} customers")
        with progress(orders, label="scoring") as advance:
            summary = run_orders(app, batch, on_result=lambda order, outcome: advance(1))
    _finish(summary)


@main.command()
@_broker_option
@_peer_curve_options
@_order_options(orders=200, customers=20)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for all results.",
)
def client(
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    orders: int,
    customers: int,
    min_work: float,
    max_work: float,
    seed: int | None,
    timeout: float,
) -> None:
    """Submit scoring orders to a running broker and print results as they arrive."""
    from zq.demo import make_orders, run_orders
    from zq.errors import ZQError

    def show(order: dict[str, Any], outcome: Any) -> None:
        if isinstance(outcome, ZQError):
            click.echo(f"order {order['id']:>5} {order['customer']} FAILED {outcome}")
        else:
            click.echo(
                f"order {order['id']:>5} {order['customer']} #{order['seq']:<3} "
                f"score {outcome['score']:.3f} (pid {outcome['pid']})"
            )

    app = _app("zq.client", broker, curve_secret, broker_key)
    batch = make_orders(
        orders, customers, min_work=min_work, max_work=max(min_work, max_work), seed=seed
    )
    try:
        _reach_broker(app, broker, PROBE_TIMEOUT)
        summary = run_orders(app, batch, timeout=timeout, on_result=show)
    except TimeoutError as exc:
        raise click.ClickException(f"{exc} (are workers connected to {broker}?)") from None
    finally:
        app.close()
    _finish(summary)


@main.group()
def dead() -> None:
    """Dead letters: tasks given up on because the worker running them kept dying."""


def _dead_letters(
    broker: str, curve: tuple[str | None, str | None], requeue: list[str], timeout: float
) -> dict[str, Any]:
    from zq import protocol

    with _session("zq.dead", broker, *curve) as app:
        _reach_broker(app, broker, timeout)
        return app.client.request(protocol.DEAD_LETTERS, {"requeue": requeue}, timeout)


@dead.command("list")
@_broker_option
@_peer_curve_options
@_timeout_option
def dead_list(
    broker: str, curve_secret: str | None, broker_key: str | None, timeout: float
) -> None:
    """List the dead letters: id, task name, queue, key, times its worker died."""
    letters = _dead_letters(broker, (curve_secret, broker_key), [], timeout)["dead"]
    for t in letters:
        click.echo(
            f"{t['id']}  {t['name']}  queue={t['queue']}  key={t['key']}  died={t['redeliveries']}"
        )
    click.echo(f"{len(letters)} dead letter(s)")


@dead.command("requeue")
@click.argument("task_ids", metavar="ID...", nargs=-1, required=True)
@_broker_option
@_peer_curve_options
@_timeout_option
def dead_requeue(
    task_ids: tuple[str, ...],
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    timeout: float,
) -> None:
    """Queue dead letters again, under the same ids, with their redelivery count reset."""
    curve = (curve_secret, broker_key)
    requeued = _dead_letters(broker, curve, list(task_ids), timeout)["requeued"]
    for task_id in task_ids:
        click.echo(f"{task_id}: {'requeued' if task_id in requeued else 'not a dead letter'}")
    if len(requeued) != len(task_ids):
        sys.exit(1)


@main.group()
def keys() -> None:
    """CURVE key pairs for the broker, its workers and its clients (docs/security.md)."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
def keys_generate(directory: str, name: str) -> None:
    """Write NAME.key (public: hand it out) and NAME.key_secret (keep it, mode 0600)
    to DIRECTORY."""
    from zq.security import generate

    public, secret = generate(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret}")
