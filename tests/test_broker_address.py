"""Broker addresses are checked where they are given: App(), app.broker, $ZQ_BROKER.

A bad one used to reach the client's I/O thread, which died on a raw ZMQError while
the caller's get() timed out. Now it is a ValueError naming the accepted forms.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import zq
from tests import payload_tasks
from zq.address import ACCEPTED, check_broker_url
from zq.testing import BrokerProcess, WorkerProcess


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:5555", "has no scheme: did you mean 'tcp://127.0.0.1:5555'?"),
        ("localhost", "has no scheme."),
        ("redis://localhost:6379/1", "is a Redis URL, but zq has its own broker"),
        ("amqp://guest@rabbit//", "is an AMQP (RabbitMQ) URL, but zq has its own broker"),
        ("sqla+sqlite:///celery.db", "is an SQLAlchemy URL, but zq has its own broker"),
        ("tcp://localhost", "has no port"),
        ("tcp://:5555", "has no port"),
        ("tcp://bad host:5555", "has a host 'bad host' that is not a host name"),
        ("tcp://-bad:5555", "has a host '-bad' that is not a host name"),
        ("tcp://999.1.1.1:5555", "has a host '999.1.1.1' that is not an IPv4 address"),
        ("tcp://127.0.0.1:*", "is a bind address"),
        ("tcp://*:5555", "is a bind address"),
        ("tcp://127.0.0.1:http", "has a port 'http' that is not a number"),
        ("tcp://127.0.0.1:0", "has a port 0 that is not in 1..65535"),
        ("tcp://127.0.0.1:70000", "has a port 70000 that is not in 1..65535"),
        ("tcp://localhost:5555/0", "has a path"),
        ("tcp://10.0.0.1;10.0.0.5:5555", "has a source address"),
        ("tcp://[::1]:5555", "has an IPv6 address, and zq's sockets do not enable IPv6"),
        ("TCP://127.0.0.1:5555", "has an upper-case scheme: write 'tcp://'"),
        (" tcp://127.0.0.1:5555", "has spaces around it"),
        ("ipc://", "has no path"),
        ("ipc://*", "is a bind address"),
        ("ipc:///tmp/" + "x" * 120, "has a path longer than 107 bytes"),
        ("inproc://broker", "cannot reach a broker: inproc:// joins sockets of one ZeroMQ"),
        ("udp://127.0.0.1:5555", "has an unknown scheme 'udp'"),
    ],
)
def test_app_refuses_what_no_peer_can_connect_to(url, says):
    threads = threading.active_count()
    with pytest.raises(ValueError) as raised:
        zq.App("t", broker=url)
    assert str(raised.value).startswith(f"broker {url!r} {says}")
    assert str(raised.value).endswith(ACCEPTED)
    assert threading.active_count() == threads  # refused before any I/O thread


@pytest.mark.parametrize(
    "url",
    [
        "tcp://10.0.0.5:5555",
        "tcp://127.0.0.1:1",
        "tcp://localhost:65535",
        "tcp://broker.lan.example:5555",
        "tcp://broker.lan.:5555",
        "tcp://build_box-2:5555",
        "ipc:///run/zq/broker.sock",
        "ipc://relative.sock",
        "ipc://@abstract-name",
    ],
)
def test_connectable_addresses_pass_unchanged(url):
    assert check_broker_url(url) == url
    assert zq.App("t", broker=url).broker == url


def test_a_non_string_is_a_type_error():
    with pytest.raises(TypeError, match="must be a string"):
        zq.App("t", broker=5555)  # type: ignore[arg-type]


def test_assigning_a_bad_broker_is_refused_and_keeps_the_old_one():
    app = zq.App("t", broker="tcp://127.0.0.1:5555")
    with pytest.raises(ValueError, match="has no scheme"):
        app.broker = "127.0.0.1:6000"
    assert app.broker == "tcp://127.0.0.1:5555"
    app.broker = "tcp://127.0.0.1:6000"
    assert app.broker == "tcp://127.0.0.1:6000"


def test_zq_broker_in_the_environment_is_checked_and_named(monkeypatch):
    monkeypatch.setenv("ZQ_BROKER", "redis://localhost:6379/0")
    with pytest.raises(ValueError, match=r"^\$ZQ_BROKER 'redis://localhost:6379/0' is a Redis"):
        zq.App("t")
    # An explicit broker wins, and the environment is not looked at.
    assert zq.App("t", broker="tcp://127.0.0.1:5555").broker == "tcp://127.0.0.1:5555"


def test_the_command_line_says_it_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "zq", "status", "--broker", "127.0.0.1:5555"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "did you mean 'tcp://127.0.0.1:5555'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_ipc_broker_is_reachable_end_to_end(tmp_path):
    """The accepted forms are real: a task over ipc:// (tcp:// is in every other test)."""
    endpoint = f"ipc://{tmp_path}/broker.sock"
    with (
        BrokerProcess(endpoint) as broker,
        WorkerProcess("tests.payload_tasks", broker.endpoint, pool="thread", concurrency=1),
    ):
        assert broker.endpoint == endpoint
        payload_tasks.app.broker = endpoint
        try:
            assert payload_tasks.echo.delay({"over": "ipc"}).get(timeout=20) == {"over": "ipc"}
        finally:
            payload_tasks.app.close()
