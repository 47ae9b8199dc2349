"""The broker opens itself to the network only when asked: loopback by default."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from zq.broker import BrokerSettings
from zq.testing import BrokerProcess, OutputReader

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_ONLY = "traffic is plain, from this machine only (loopback)"
OPEN = "traffic is plain and open: anyone who reaches these ports can submit and read tasks"


def test_every_default_bind_is_loopback():
    """The settings, the command (and so `python broker.py`) and its help agree."""
    assert BrokerSettings().bind == "tcp://127.0.0.1:5555"
    env = {k: v for k, v in os.environ.items() if k != "ZQ_BIND"}
    for command in ([sys.executable, "-m", "zq", "broker"], [sys.executable, "broker.py"]):
        out = subprocess.run(
            [*command, "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env
        )
        assert out.returncode == 0, out.stderr
        assert "[default: tcp://127.0.0.1:5555]" in " ".join(out.stdout.split()), out.stdout
        assert "0.0.0.0:5555 takes them from the network" in " ".join(out.stdout.split())


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_broker_started_with_no_bind_listens_on_loopback_only(tmp_path):
    """The real default, run: port 5555 (and 5556 for results), so skipped if taken."""
    if not (_port_free(5555) and _port_free(5556)):
        pytest.skip("ports 5555/5556 are in use on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZQ_")}
    env.update(PYTHONUNBUFFERED="1", ZQ_DATA_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker.py")],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    reader = OutputReader(proc.stdout)
    try:
        said = reader.wait_for(re.compile(re.escape(LOOPBACK_ONLY) + "|cannot start"), 20)
        if "already in use" in "".join(reader.lines):
            pytest.skip("ports 5555/5556 were taken meanwhile")
        assert said is not None and said.group(0) != "cannot start", "".join(reader.lines)
        lines = "".join(reader.lines)
        assert (
            "listening on tcp://127.0.0.1:5555 (results and events on tcp://127.0.0.1:5556)"
            in lines
        ), lines
        assert OPEN not in lines
    finally:
        proc.kill()
        proc.wait(10)
        reader.thread.join(5)
        proc.stdout.close()


def test_all_interfaces_must_be_asked_for_and_keep_the_warning():
    with BrokerProcess("tcp://127.0.0.1:*") as local:
        local.read_until(re.compile(re.escape(LOOPBACK_ONLY)), 10)
        assert OPEN not in "".join(local.output)
    with BrokerProcess("tcp://0.0.0.0:*") as everyone:
        assert everyone.endpoint.startswith("tcp://0.0.0.0:")
        everyone.read_until(re.compile(re.escape(OPEN)), 10)
        assert LOOPBACK_ONLY not in "".join(everyone.output)
