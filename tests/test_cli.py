"""The zq command and the top-level scripts, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zq.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["broker", "worker", "call", "status", "demo", "client", "revoke", "periodic"]


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs
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
    assert "is a broker running" in out.stderr


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
