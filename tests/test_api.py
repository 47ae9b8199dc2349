"""The public API: the names users and later issues rely on exist and are exported."""

from __future__ import annotations

import zq


def test_public_names_are_exported():
    for name in zq.__all__:
        assert hasattr(zq, name), name
    expected = {
        "App",
        "AsyncResult",
        "TaskFailed",
        "TimeoutError",
        "ZQError",
        "BrokerUnavailable",
        "ProtocolError",
        "Broker",
        "Worker",
    }
    assert expected <= set(zq.__all__)


def test_exceptions_form_one_tree():
    for name in (
        "TaskFailed",
        "TaskRejected",
        "TimeoutError",
        "BrokerUnavailable",
        "ProtocolError",
        "ResultUnavailable",
        "TaskError",
    ):
        assert issubclass(getattr(zq, name), zq.ZQError), name
    assert issubclass(zq.TaskFailed, zq.TaskError)


def test_task_decorator_forms_and_options():
    app = zq.App("api-test", broker="tcp://127.0.0.1:1")

    @app.task
    def plain(x):
        return x

    @app.task(name="custom.name", queue="q", key=lambda order: order["c"], ignore_result=True)
    def keyed(order):
        return order

    assert plain.name.endswith("test_task_decorator_forms_and_options.<locals>.plain")
    assert plain(3) == 3  # calling a task runs it here
    assert app.tasks["custom.name"] is keyed
    assert (keyed.queue, keyed.ignore_result) == ("q", True)
    assert keyed.key({"c": "c-1"}) == "c-1"


def test_broker_address_defaults_to_env(monkeypatch):
    monkeypatch.setenv("ZQ_BROKER", "tcp://10.1.2.3:7000")
    assert zq.App("env").broker == "tcp://10.1.2.3:7000"
    monkeypatch.delenv("ZQ_BROKER")
    assert zq.App("default").broker == "tcp://127.0.0.1:5555"


def test_import_zq_loads_only_the_client_side():
    """A web process that only submits tasks pays for the client: ``import zq`` loads
    neither the broker, its journal (sqlite3), the worker nor its process pool, until
    one of them is used."""
    import subprocess
    import sys

    heavy = ["zq.broker", "zq.journal", "sqlite3", "zq.worker", "zq.procpool", "zq.pool"]
    code = (
        "import sys, zq; zq.App('t'); "
        f"print([m for m in {heavy!r} if m in sys.modules]); "
        "zq.Broker; zq.WorkerSettings; "
        f"print([m for m in {heavy!r} if m not in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.splitlines() == ["[]", "[]"], out.stdout + out.stderr
