"""Task messages built and taken apart without a broker: what a call becomes (header
and payload), its timing fields, a workflow step's inputs; and the import arrows that
keep zq.message below the app, the canvas and the worker."""

from __future__ import annotations

import ast
import datetime as dt
import time
from pathlib import Path

import pytest

from zq import protocol as p
from zq.message import seconds, task_message, timing, with_inputs

ZQ = Path(__file__).resolve().parent.parent / "zq"


def test_a_call_becomes_a_header_and_its_arguments():
    header, payload = task_message("m.add", (1, 2), {"z": 3}, queue="q", key=42, task_id="t1")
    assert header == {"id": "t1", "name": "m.add", "queue": "q", "key": "42"}
    assert p.decode(payload) == [[1, 2], {"z": 3}]
    header, _ = task_message("m.add", queue="q", ignore_result=True, priority=5)
    assert len(header["id"]) == 32 and header["ignore_result"] and header["priority"] == 5


def test_a_bad_id_or_an_argument_that_cannot_be_encoded_fails_in_the_caller():
    with pytest.raises(ValueError, match="task_id"):
        task_message("m.add", queue="q", task_id="x" * (p.MAX_ID_LEN + 1))
    with pytest.raises(TypeError):
        task_message("m.add", (object(),), queue="q")


def test_timing_turns_delays_and_datetimes_into_unix_times():
    before = time.time()
    fields = timing(countdown=10, expires=dt.timedelta(minutes=1), priority=0)
    assert before + 10 <= fields["eta"] <= time.time() + 10
    assert before + 60 <= fields["expires"] <= time.time() + 60
    assert "priority" not in fields  # 0 is the default: not sent
    when = dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)
    assert timing(eta=when) == {"eta": when.timestamp()}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"countdown": 1, "eta": dt.datetime(2030, 1, 1)}, "not both"),
        ({"countdown": -1}, "countdown must be >= 0"),
        ({"expires": float("nan")}, "expires must be a number"),
        ({"eta": 1.5}, "eta must be a datetime"),
        ({"priority": 10}, "priority must be an integer"),
        ({"priority": True}, "priority must be an integer"),
    ],
)
def test_timing_refuses_a_bad_option_naming_it(options, message):
    with pytest.raises(ValueError, match=message):
        timing(**options)


def test_seconds_takes_numbers_and_timedeltas():
    assert seconds("x", dt.timedelta(seconds=1.5)) == 1.5 and seconds("x", 2) == 2.0
    with pytest.raises(ValueError, match="x must be a number"):
        seconds("x", True)


def test_a_steps_parents_results_come_before_its_own_arguments():
    payload = p.encode([[10], {"k": 1}])
    one = with_inputs({"pass": "one"}, payload, [p.encode(32)])
    assert p.decode(one) == [[32, 10], {"k": 1}]
    many = with_inputs({"pass": "list"}, payload, [p.encode(1), p.encode(2)])
    assert p.decode(many) == [[[1, 2], 10], {"k": 1}]


def _imports(module: str) -> set[str]:
    """The zq modules ``module`` imports when it runs (not for type checking only)."""
    tree = ast.parse((ZQ / f"{module}.py").read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zq"):
            found.add(node.module)
            found.update(f"zq.{a.name}" for a in node.names if node.module == "zq")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("zq."))
    return found


def test_the_message_builder_sits_below_the_app_the_canvas_and_the_worker():
    assert not _imports("message") & {"zq.app", "zq.canvas", "zq.client", "zq.worker"}
    assert "zq.app" not in _imports("canvas")  # (only for type checking): no cycle
    assert "zq.canvas" not in _imports("worker")
    for module in ("app", "canvas", "worker"):
        assert "zq.message" in _imports(module), module
