"""The zq command and the top-level scripts, run as a user runs them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zq
from zq.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["broker", "worker", "call", "status", "demo", "client", "revoke", "periodic"]


def run(*args: str, timeout: float = 30, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, **kwargs
    )


def test_top_level_help_lists_every_command():
    out = run("-m", "zq", "--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_its_options(command):
    out = run("-m", "zq", command, "--help")
    assert out.returncode == 0, out.stderr
    options = [line for line in out.stdout.splitlines() if line.strip().startswith("-")]
    assert options, out.stdout
    # Every option line carries a help text (more than the flag itself).
    for line in options:
        if "--help" in line:
            continue
        assert len(line.split(None, 1)) == 2 or "  " in line.strip(), line


@pytest.mark.parametrize("script", ["broker.py", "worker.py", "client.py"])
def test_scripts_are_the_commands(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "--broker" in out.stdout or "--bind" in out.stdout


def test_call_and_status_against_a_running_broker(broker, start_worker):
    worker = start_worker(concurrency=1)
    out = run("-m", "zq", "call", "tests.tasks.add", "1", "4", "--broker", broker.endpoint)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 5

    out = run("-m", "zq", "call", "tests.tasks.fail", '"nope"', "--broker", broker.endpoint)
    assert out.returncode == 1
    assert "ValueError: nope" in out.stderr

    out = run("-m", "zq", "status", "--broker", broker.endpoint)
    assert out.returncode == 0, out.stderr
    assert f"pid={worker.pid}" in out.stdout and "slots=1" in out.stdout
    out = run("-m", "zq", "status", "--json", "--broker", broker.endpoint)
    assert json.loads(out.stdout)["counters"]["done"] == 2


def test_call_says_when_no_worker_serves_the_queue_or_the_task(broker, start_worker):
    """A queue or task name no connected worker serves fails in seconds, sending
    nothing, instead of waiting out --timeout; status names the waiting work."""
    start_worker(concurrency=1)  # tests.tasks, queue "default"
    out = run("-m", "zq", "call", "tests.tasks.add", "1", "4", "--queue", "celery",
              "--broker", broker.endpoint, timeout=20)  # fmt: skip
    assert out.returncode == 1
    assert "no connected worker serves queue 'celery' (workers serve default)" in out.stderr
    assert "--queues celery" in out.stderr and "nothing was sent" in out.stderr
    out = run("-m", "zq", "call", "tasks.add", "--broker", broker.endpoint, timeout=20)
    assert out.returncode == 1
    assert "no worker on queue 'default' has task 'tasks.add'" in out.stderr
    assert "tests.tasks.add" in out.stderr  # what it does have
    out = run("-m", "zq", "call", "tasks.add", "--no-wait", "--broker", broker.endpoint)
    assert out.returncode == 0 and "it waits until one does" in out.stderr
    out = run("-m", "zq", "status", "--broker", broker.endpoint)
    assert "no worker serves tasks.add on queue default: 1 task(s) wait" in out.stdout


def test_revoke_and_task_status(app, broker, start_worker, tmp_path):
    from tests import tasks

    start_worker(pool="thread")
    gate = tmp_path / "gate"
    running = tasks.progressing.delay(3, 0.0, str(gate))
    later = tasks.add.apply_async((1, 2), countdown=60)
    wait_for(lambda: (running.progress or {}).get("done") == 3, 15, "progress 3/3")
    out = run("-m", "zq", "status", running.id, "--broker", broker.endpoint)
    assert out.returncode == 0, out.stderr
    assert f"{running.id}: STARTED" in out.stdout and "progress: 3/3 (step 3)" in out.stdout

    out = run("-m", "zq", "revoke", later.id, "nope", "--broker", broker.endpoint)
    assert out.returncode == 1  # one id was unknown
    assert f"{later.id}: revoked" in out.stdout and "nope: unknown" in out.stdout
    out = run("-m", "zq", "status", later.id, "--json", "--broker", broker.endpoint)
    assert json.loads(out.stdout)["state"] == "REVOKED"

    gate.touch()
    assert running.get(timeout=10) == 3
    out = run("-m", "zq", "status", running.id, "--broker", broker.endpoint)
    assert f"{running.id}: SUCCESS" in out.stdout and "outcome: 3" in out.stdout


def test_status_without_a_broker_fails_clearly():
    out = run("-m", "zq", "status", "--broker", "tcp://127.0.0.1:9", "--timeout", "0.5")
    assert out.returncode == 1
    assert "no broker answered at tcp://127.0.0.1:9 within 0.5s: is one running?" in out.stderr


def _unused_port() -> int:
    """A loopback port nothing listens on (free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "command, waits",
    [
        (["-m", "zq", "call", "tests.tasks.add", "1", "4"], 5),  # its --timeout is 60 s
        (["client.py", "--orders", "1"], 5),  # its --timeout is 600 s
        (["-m", "zq", "status"], 5),
        (["-m", "zq", "status", "01a2356eb806482d3cb8b4622ea8f795", "--timeout", "2"], 2),
        (["-m", "zq", "revoke", "01a2356eb806482d3cb8b4622ea8f795", "--timeout", "2"], 2),
        (["-m", "zq", "periodic", "--timeout", "2"], 2),
        (["-m", "zq", "dead", "list", "--timeout", "2"], 2),
    ],
    ids=["call", "client.py", "status", "status ID", "revoke", "periodic", "dead list"],
)
def test_a_command_fails_within_seconds_when_no_broker_answers(command, waits):
    """Not after its whole result timeout (`zq call` waited 60 s), and with an error
    that says what is missing and how to start it."""
    url = f"tcp://127.0.0.1:{_unused_port()}"
    started = time.monotonic()
    out = run(*command, "--broker", url, timeout=30)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"no broker answered at {url} within {waits}s: is one running?" in out.stderr
    assert f"start one with `zq broker --bind {url}`" in out.stderr
    assert took < waits + 8, took  # (the interpreter's start-up: slow on a busy machine)
    # The client's own "reconnecting" warnings would only repeat the error, vaguer.
    assert "reconnecting" not in out.stderr, out.stderr


def test_revoke_says_a_running_task_runs_on_and_how_to_stop_it(broker, start_worker):
    """Revoke without --terminate does not stop a running task: not a success."""
    start_worker(concurrency=1)
    app = zq.App("t", broker=broker.endpoint)
    try:
        running = app.send_task("tests.tasks.sleep", [30])
        wait_for(lambda: running.status == "STARTED", 15, "the task started")
        out = run("-m", "zq", "revoke", running.id, "--broker", broker.endpoint)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"{running.id}: running: still running" in out.stdout
        assert f"`zq revoke --terminate {running.id}` stops it" in out.stdout

        out = run("-m", "zq", "revoke", "--terminate", running.id, "--broker", broker.endpoint)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{running.id}: terminating" in out.stdout
        with pytest.raises(zq.TaskFailed, match=r"zq\.Revoked"):
            running.get(timeout=15)

        out = run("-m", "zq", "revoke", running.id, "--broker", broker.endpoint)
        assert out.returncode == 1 and f"{running.id}: finished" in out.stdout
    finally:
        app.close()


def test_status_of_an_id_the_broker_does_not_know_says_so(broker):
    out = run("-m", "zq", "status", "not-an-id", "--broker", broker.endpoint)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the broker at {broker.endpoint} does not know task not-an-id" in out.stderr
    assert "PENDING" not in out.stdout  # the state of a task not yet accepted, not this
    out = run("-m", "zq", "status", "not-an-id", "--json", "--broker", broker.endpoint)
    assert out.returncode == 1 and json.loads(out.stdout)["state"] == "PENDING"


def test_removing_a_schedule_that_is_not_there_fails(broker):
    out = run("-m", "zq", "periodic", "--remove", "nope", "--broker", broker.endpoint)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "nope: no such schedule" in out.stdout


def test_call_help_says_what_a_task_is_called():
    out = run("-m", "zq", "call", "--help")
    assert "`module.function` by default" in out.stdout
    assert "`myapp.tasks.add`" in out.stdout


BROKEN_MODULES = {
    # name: (source, the line its traceback must show)
    "broken_syntax": ("import zq\napp = zq.App('x')\n\ndef f(:\n    pass\n", "line 4"),
    "broken_import": ("import zq\napp = zq.App('x')\nimport no_such_dependency\n", "line 3"),
    "broken_top": ("import zq\napp = zq.App('x')\n\n\n1 / 0\n", "line 5"),
}


@pytest.mark.parametrize("how", [["-m", "zq", "worker"], [str(ROOT / "worker.py")]])
@pytest.mark.parametrize("module", sorted(BROKEN_MODULES))
def test_a_task_module_that_fails_to_import_shows_where(tmp_path, module, how):
    """File and line of the module's own code, as `python` would show them, without
    the frames of zq and importlib; the worker does not start."""
    source, line = BROKEN_MODULES[module]
    (tmp_path / f"{module}.py").write_text(source)
    url = f"tcp://127.0.0.1:{_unused_port()}"
    out = run(*how, module, "--broker", url, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(f"Error: cannot import {module}:\n"), out.stderr
    assert f'File "{tmp_path / module}.py", {line}' in out.stderr, out.stderr
    assert "importlib" not in out.stderr and "zq/cli.py" not in out.stderr, out.stderr
    assert "zq worker" not in out.stdout  # it never started


def test_a_task_module_that_is_not_there_is_one_line(tmp_path):
    url = f"tcp://127.0.0.1:{_unused_port()}"
    out = run("-m", "zq", "worker", "no_such_tasks.module", "--broker", url, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(
        "Error: cannot import no_such_tasks.module: no module named 'no_such_tasks'"
    ), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr


def test_a_liveness_under_3_is_refused_with_the_reason():
    out = run("-m", "zq", "broker", "--liveness", "2", "--bind", "tcp://127.0.0.1:*")
    assert out.returncode == 2 and "'--liveness': 2 is not in the range x>=3" in out.stderr
    assert "at least 3" in run("-m", "zq", "broker", "--help").stdout
    from zq.broker import BrokerSettings

    with pytest.raises(ValueError, match="liveness must be >= 3"):
        BrokerSettings(liveness=2)


@pytest.mark.parametrize(
    "option, value, field",
    [("--heartbeat", "0.001", "heartbeat"), ("--max-message-size", "2048", "max_message_size")],
)
def test_a_setting_the_brokers_peers_would_refuse_is_refused_by_the_broker(option, value, field):
    """Workers and clients refuse a WELCOME outside these bounds (a heartbeat that short
    had a worker renew its connection without end): the broker must not start with one."""
    out = run("-m", "zq", "broker", option, value, "--bind", "tcp://127.0.0.1:*")
    assert out.returncode == 2 and f"'{option}': {value} is not in the range" in out.stderr
    from zq.broker import BrokerSettings

    with pytest.raises(ValueError, match=f"{field} must be"):
        BrokerSettings(**{field: type(getattr(BrokerSettings(), field))(float(value))})


def test_client_script_scores_orders(broker, start_worker):
    start_worker("zq.scoring", concurrency=2)  # what `python worker.py` serves
    out = run(
        "client.py",
        "--broker",
        broker.endpoint,
        "--orders",
        "40",
        "--customers",
        "5",
        "--max-work",
        "0.01",
        "--seed",
        "1",
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("score ") == 40
    assert "per-customer check (OK)" in out.stdout


def test_demo_runs_and_checks_itself():
    out = run(
        "-m",
        "zq",
        "demo",
        "--orders",
        "60",
        "--customers",
        "6",
        "--workers",
        "1",
        "--concurrency",
        "2",
        "--max-work",
        "0.01",
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "60/60" in out.stdout
    assert "per-customer check (OK)" in out.stdout
    assert "latency:" in out.stdout and "throughput:" in out.stdout
