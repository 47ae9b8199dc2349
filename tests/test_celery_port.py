"""Porting from Celery: the App takes Celery's first lines or says what to change,
and docs/celery.md is true: its zq examples run against a real broker and worker,
and the module it shows is docs/examples/shop.py, word for word."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

import zq

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "celery.md"
EXAMPLES = ROOT / "docs" / "examples"
MODULE_HEAD = "# shop.py, with zq"


def blocks(kind: str) -> list[str]:
    """The doc's code blocks of one kind: ``python`` (zq, run) or ``python celery``."""
    found = re.findall(r"^```(python(?: celery)?)\n(.*?)^```", DOC.read_text(), re.M | re.S)
    return [code for info, code in found if info == kind]


# ---------------------------------------------------------------- the App


def test_the_broker_may_be_the_second_argument_as_in_celery():
    app = zq.App("tasks", "tcp://10.0.0.5:5555")
    assert (app.name, app.broker) == ("tasks", "tcp://10.0.0.5:5555")


@pytest.mark.parametrize("backend", ["redis://", "rpc://", None])
def test_backend_is_refused_saying_why_and_what_to_do(backend):
    with pytest.raises(TypeError) as raised:
        zq.App("tasks", "tcp://127.0.0.1:5555", backend=backend)
    message = str(raised.value)
    assert message.startswith(f"zq.App() takes no backend (got backend={backend!r})")
    assert "results come back through the zq broker" in message
    assert message.endswith("so delete the argument")


def test_celerys_first_line_is_answered_one_change_at_a_time():
    with pytest.raises(TypeError, match="takes no backend"):
        zq.App("tasks", broker="redis://localhost:6379/1", backend="redis://")
    with pytest.raises(ValueError, match="is a Redis URL, but zq has its own broker: start it"):
        zq.App("tasks", broker="redis://localhost:6379/1")
    assert zq.App("tasks", broker="tcp://localhost:5555").broker == "tcp://localhost:5555"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("conf", "zq has no settings object: options go where they apply"),
        ("config_from_object", "zq has no settings object"),
        ("autodiscover_tasks", "zq does not look for tasks: import the modules"),
    ],
)
def test_celerys_app_attributes_say_where_they_went(name, says):
    app = zq.App("tasks")
    with pytest.raises(AttributeError, match=f"^zq.App has no {name} \\(Celery's\\): {says}"):
        getattr(app, name)
    assert not hasattr(app, name)


# ---------------------------------------------------------------- docs/celery.md


def test_the_module_shown_is_the_example_file():
    shown = [code for code in blocks("python") if code.startswith(MODULE_HEAD)]
    assert shown == [(EXAMPLES / "shop.py").read_text()]


def test_the_celery_side_is_python():
    celery = blocks("python celery")
    assert len(celery) >= 2
    for number, code in enumerate(celery, 1):
        ast.parse(code, f"{DOC.name}, Celery block {number}")


def test_the_examples_run_against_a_real_broker_and_worker(broker, start_worker, monkeypatch):
    examples = [code for code in blocks("python") if not code.startswith(MODULE_HEAD)]
    assert len(examples) >= 7
    monkeypatch.setenv("ZQ_BROKER", broker.endpoint)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("shop", None)
    shop = importlib.import_module("shop")
    # The doc's command: zq worker shop -Q default,payments,celery (a process pool, for
    # the time limits).
    start_worker(
        "shop",
        pool="process",
        concurrency=2,
        queues=("default", "payments", "celery"),
        env={"PYTHONPATH": str(EXAMPLES)},
    )
    try:
        for number, code in enumerate(examples, 1):
            exec(compile(code, f"{DOC.name}, example {number}", "exec"), {"__name__": "example"})
    finally:
        shop.app.close()
        sys.modules.pop("shop", None)
