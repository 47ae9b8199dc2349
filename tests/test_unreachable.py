"""With no broker: get() says BrokerUnavailable, and the client logs the outage once
and the broker's return once."""

from __future__ import annotations

import logging
import socket
import time

import pytest

import zq
from zq.client import Client
from zq.testing import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_get_says_broker_unavailable_when_no_broker_ever_answers():
    app = zq.App("nobody-home", broker=f"tcp://127.0.0.1:{free_port()}")
    try:
        res = app.send_task("tests.tasks.add", [1, 2])
        started = time.monotonic()
        with pytest.raises(zq.BrokerUnavailable, match="is a broker running there"):
            res.get(timeout=1)
        assert time.monotonic() - started < 5  # the wait, plus one short probe
    finally:
        app.client.close(flush_timeout=0)


def test_an_outage_is_logged_once_and_the_return_once(caplog):
    caplog.set_level(logging.INFO, logger="zq.client")
    port = free_port()
    client = Client(f"tcp://127.0.0.1:{port}", heartbeat=0.2)  # silent after 0.6 s
    try:
        # An outage of several silence limits: the client reconnects at each.
        time.sleep(2.5)
        with BrokerProcess(f"tcp://127.0.0.1:{port}"):
            wait_for(lambda: "answers again" in caplog.text, 20, "the return logged")
            client.status(timeout=10)
    finally:
        client.close(flush_timeout=0)
    lost = [r for r in caplog.records if "no word from broker" in r.getMessage()]
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(lost) == 1 and len(back) == 1
