"""A client's newer submit never overtakes an older unacknowledged one, even when the
broker restarts under the older one (zq.sequence)."""

from __future__ import annotations

import signal

import pytest

from tests import tasks
from tests.tasks import read_records
from zq.sequence import SubmitOrder
from zq.testing import check_key_records, wait_for

pytestmark = pytest.mark.timeout(60)


def test_submit_order_takes_in_order_and_refuses_a_gap() -> None:
    order = SubmitOrder()
    assert order.take("c", 1, 1)  # nothing older unacknowledged
    assert order.take("c", 2, 1)  # follows the last one taken
    assert not order.take("c", 4, 3)  # 3 is missing (and unacknowledged)
    assert order.take("c", 5, 5)  # a full resend: starts afresh
    assert order.take("c", 6, 5)
    fresh = SubmitOrder()  # a restarted broker: knows nothing of the client
    assert not fresh.take("c", 7, 6)
    assert fresh.take("c", 8, 8)


def test_a_submit_lost_in_a_broker_crash_still_runs_before_a_later_one_of_its_key(
    app, broker, start_worker, tmp_path
):
    """A reaches the broker's socket and dies with it; B is submitted while the broker
    is down, and reaches the restarted broker first, before the client noticed the
    restart (well within its silence limit). B must not run before A."""
    start_worker(concurrency=2)
    assert tasks.keyed.delay("c-42", 0, 0.0, str(tmp_path)).get(timeout=20)["seq"] == 0
    broker.signal(signal.SIGSTOP)
    a = tasks.keyed.delay("c-42", 1, 0.3, str(tmp_path))
    wait_for(lambda: a.id in app.client._unacked, 5, "A handed to the socket")
    broker.kill()
    b = tasks.keyed.delay("c-42", 2, 0.0, str(tmp_path))
    wait_for(lambda: b.id in app.client._unacked, 5, "B handed to the socket")
    broker.restart()
    assert a.get(timeout=20)["seq"] == 1
    assert b.get(timeout=20)["seq"] == 2
    records = read_records(tmp_path)
    assert sorted(r["seq"] for r in records) == [0, 1, 2]
    assert check_key_records(records) == []
